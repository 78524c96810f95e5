"""Job config: defaults, validation messages naming key/value/allowed, overrides, hashing."""

import pytest

from pipeline.config import JobConfig, describe_fields, load_job, stage_config_hash
from pipeline.errors import ConfigError

MINIMAL = {"run_dir": "runs/x", "corpus": {"path": "c"}, "anchors": {"path": "a"}}


def test_minimal_job_gets_every_default():
    job = load_job(data=MINIMAL)
    assert isinstance(job, JobConfig)
    assert job.teacher.model == "smollm2-135m-instruct" and job.teacher.alpha == 16.0
    assert job.sketch.proj_dim == 8192 and job.fit.alpha == 0.5 and job.fit.tau == 0.05
    assert job.pool_dataset == job.corpus and job.lora_seed == job.seed


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["sketch.batch_size=-1"], "`sketch.batch_size`: got -1, expected a number > 0"),
        (["sketch.proj_dim=abc"], "`sketch.proj_dim`: got 'abc', expected an integer"),
        (["sketch.bogus=1"], "unknown config key `sketch.bogus`"),
        (["teacher.dtype=float64"], "`teacher.dtype`: got 'float64', expected one of"),
        (["fit.alpha=1.5"], "`fit.alpha`: got 1.5, expected a number in [0, 1]"),
        (["fit.hard_ratio=1.0"], "`fit.hard_ratio`: got 1.0, expected a number in [0, 1)"),
        (["teacher.trust_remote_code=yes please"], "`teacher.trust_remote_code`"),
        (["eval.methods=[gradient, nope]"], "`eval.methods`"),
        (["corpus=3"], "`corpus`: got 3, expected a mapping"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_job(data=MINIMAL, overrides=override)
    assert fragment in str(e.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required config key `anchors`"):
        load_job(data={"run_dir": "r", "corpus": {"path": "c"}})


def test_override_parsing_and_types():
    job = load_job(
        data=MINIMAL,
        overrides=["sketch.batch_size=3", "fit.lr=1e-4", "pool.path=p", "score.queries.path=q", "ray.address=null"],
    )
    assert job.sketch.batch_size == 3 and job.fit.lr == 1e-4 and job.pool.path == "p"
    assert job.score.queries.path == "q" and job.ray.address is None
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_job(data=MINIMAL, overrides=["sketch.batch_size"])


def test_execution_only_fields_do_not_change_the_hash():
    base = load_job(data=MINIMAL)
    assert stage_config_hash(base, "sketch") == stage_config_hash(
        load_job(data=MINIMAL, overrides=["sketch.batch_size=2"]), "sketch"
    )
    assert stage_config_hash(base, "sketch") != stage_config_hash(
        load_job(data=MINIMAL, overrides=["sketch.proj_dim=512"]), "sketch"
    )
    # A fit-only change leaves the sketch hash alone.
    assert stage_config_hash(base, "sketch") == stage_config_hash(
        load_job(data=MINIMAL, overrides=["fit.epochs=2"]), "sketch"
    )


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_reference_table_covers_every_contract_key():
    keys = {row[0] for row in describe_fields()}
    for k in [
        "run_dir",
        "seed",
        "corpus.path",
        "anchors.path",
        "teacher.model",
        "teacher.max_len",
        "teacher.lora_rank",
        "sketch.batch_size",
        "sketch.proj_dim",
        "sketch.train_anchors",
        "sketch.train_pool",
        "sketch.eval_anchors",
        "sketch.eval_pool",
        "encoder.model",
        "fit.epochs",
        "score.queries.path",
        "score.top_k",
        "corpus.id_column",
        "corpus.label_column",
    ]:
        assert k in keys, k


def test_a_dataclass_built_directly_raises_a_config_error_naming_the_field():
    """`prepare` builds a DatasetConfig itself: a bad value must still be a usage error (exit 2)."""
    from pipeline.config import DatasetConfig
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="`path`: got ''"):
        DatasetConfig(path="")


def test_prepare_with_an_empty_input_path_exits_2(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "prepare", "--input", "", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "path" in out.stderr and "Traceback" not in out.stderr


def test_a_retired_key_is_ignored_with_a_warning_that_says_why(caplog):
    """eval.timing_rows was documented but never read: jobs that set it still load, and are told."""
    import pipeline.config as config

    config._retired_warned.discard("eval.timing_rows")
    with caplog.at_level("WARNING", logger="influcoder.config"):
        job = load_job(data={**MINIMAL, "eval": {"timing_rows": 32, "recall_k": [5]}})
        load_job(data={**MINIMAL, "eval": {"timing_rows": 32}})  # e.g. a finished run's manifest, read again
    assert job.eval.recall_k == [5] and not hasattr(job.eval, "timing_rows")
    assert caplog.text.count("`eval.timing_rows` is ignored") == 1 and "never read" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key `eval.timing_row`"):
        load_job(data={**MINIMAL, "eval": {"timing_row": 32}})  # a typo is still an error
