"""`influcoder prepare`, `--help`, exit codes and `status`."""

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.cli import STAGES, main


@pytest.mark.slow
def test_demo_corpora(demo_corpora, shared_data):
    """`prepare --data` on all of the shared data: every source row accounted for, the task's sizes."""
    from pipeline.prepare import ToxicitySplit

    counts = json.loads((demo_corpora / "PREPARED.json").read_text())["counts"]
    for name in ("bbh", "gsm8k", "t0", "toxigen"):
        assert counts[name] == pq.read_table(demo_corpora / name).num_rows > 0, name
    bbh_examples = sum(len(json.loads(p.read_text())["examples"]) for p in (shared_data / "bbh" / "bbh").glob("*.json"))
    assert counts["bbh"] == bbh_examples

    def lines(path):
        return sum(1 for line in open(path, encoding="utf-8") if line.strip())

    assert counts["toxigen"] == lines(shared_data / "toxigen" / "toxigen_statements.jsonl")
    assert counts["gsm8k"] == sum(lines(shared_data / "gsm8k" / f"{s}.jsonl") for s in ("train", "test"))
    assert counts["t0"] <= lines(shared_data / "t0" / "t0_train_50k.jsonl")  # empty completions are dropped
    bbh = pq.read_table(demo_corpora / "bbh").to_pylist()[0]
    assert "\n\nQ: " in bbh["prompt"] and bbh["prompt"].endswith("A:") and bbh["response"].startswith(" ")
    assert "BENCHMARK DATA" not in bbh["prompt"]  # the canary header is stripped
    t0 = pq.read_table(demo_corpora / "t0").column("response").to_pylist()
    assert not any("<|endoftext|>" in r for r in t0[:2000])
    tox = {role: pq.read_table(demo_corpora / "toxicity" / role) for role in ("anchors", "pool", "corpus", "queries")}
    ids = {role: set(t.column("id").to_pylist()) for role, t in tox.items()}
    texts = {role: {s.lower().strip() for s in t.column("text").to_pylist()} for role, t in tox.items()}
    roles = list(tox)
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            assert not ids[a] & ids[b] and not texts[a] & texts[b], (a, b)  # leak-free
    split = ToxicitySplit()
    labels = tox["corpus"].column("label").to_pylist()
    assert sum(labels) == split.corpus_hate
    assert len(labels) == split.corpus_hate + split.corpus_neutral + split.corpus_instructions
    assert tox["queries"].num_rows == split.query_hate and tox["anchors"].num_rows == split.anchor_hate
    assert tox["pool"].num_rows == split.pool_hate + split.pool_neutral + split.pool_instructions


def test_generic_prepare_records_rejects(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [{"k": "1", "t": "a"}, {"k": "1", "t": "b"}, {"k": "2", "t": ""}]))
    rc = main(
        ["prepare", "--input", str(src), "--out", str(tmp_path / "out"), "--id-column", "k", "--text-column", "t"]
    )
    assert rc == 0
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").column("id").to_pylist() == ["1"]
    reasons = [
        r.split(":")[0] for r in pq.read_table(tmp_path / "out" / "_rejects.parquet").column("reason").to_pylist()
    ]
    assert sorted(reasons) == ["duplicate_id", "empty_text"]


def _subcommands() -> dict:
    """name -> argparse subparser, from the CLI's own parser."""
    import argparse

    from pipeline.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings} | {
        a.dest for a in parser._actions if not a.option_strings
    }


def test_help_lists_every_subcommand():
    """`influcoder --help` (the real entry point) names every subcommand with its one-line help."""
    from pipeline.cli import STAGE_HELP

    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = {line.split()[0] for line in out.splitlines() if re.match(r"    \S", line)}  # not wrapped lines
    assert listed == set(_subcommands()) == {"prepare", "run", *STAGES, "status", "show"}
    flat = " ".join(out.split())  # argparse wraps long help lines
    for stage in STAGES:
        assert " ".join(STAGE_HELP[stage].split()) in flat, stage


# Each subcommand's own options (beyond -h): what the README and the docs tell users to type.
JOB_OPTIONS = {"job", "--set", "--overwrite"}
OPTIONS = {
    "prepare": {
        "--data",
        "--input",
        "--out",
        "--rows-per-file",
        "--id-column",
        "--prompt-column",
        "--response-column",
        "--text-column",
        "--encoder-text-column",
        "--label-column",
        "--positive-label",
    },
    "run": JOB_OPTIONS | {"--from", "--to"},
    **{stage: JOB_OPTIONS for stage in STAGES},
    "status": {"run_dir", "--set", "--json"},
    "show": {"run_dir", "--query", "--k"},
}


@pytest.mark.parametrize("cmd", sorted(OPTIONS))
def test_each_subcommand_help_shows_its_own_options(cmd, capsys):
    subparser = _subcommands()[cmd]
    assert _options(subparser) - {"-h", "--help", "help"} == OPTIONS[cmd]
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: influcoder {cmd} ")
    for opt in OPTIONS[cmd]:
        assert opt in out, (cmd, opt)
    if cmd == "run":  # --from/--to offer exactly the stages, in order
        for flag in ("from_stage", "to_stage"):
            (action,) = [a for a in subparser._actions if a.dest == flag]
            assert tuple(action.choices) == STAGES
    with pytest.raises(SystemExit) as e:  # an unknown option is a usage error
        main([cmd, "--no-such-option"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sketch", "nope.yaml"], "does not exist"),
        (["status", "/nonexistent/run"], "does not exist"),
    ],
)
def test_usage_errors_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_config_error_before_any_ray_work(tmp_path, capsys):
    job = tmp_path / "j.yaml"
    job.write_text(
        f"run_dir: {tmp_path}/run\ncorpus: {{path: {tmp_path}/missing}}\nanchors: {{path: {tmp_path}/missing}}\n"
    )
    assert main(["sketch", str(job), "--set", "sketch.batch_size=0"]) == 2
    assert "`sketch.batch_size`: got 0" in capsys.readouterr().err
    assert main(["sketch", str(job)]) == 2
    err = capsys.readouterr().err
    assert "anchors.path" in err and "does not exist" in err


def test_status(tmp_path, capsys):
    from pipeline import artifacts
    from pipeline.config import load_job

    job = load_job(data={"run_dir": str(tmp_path / "r"), "corpus": {"path": "c"}, "anchors": {"path": "a"}})
    artifacts.run_stage(job, "sketch", runner=lambda ctx: ctx.record(rows={"anchors": 3}))
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "sketch  done" in out and "fit     not run" in out


def test_preparing_the_same_rows_again_leaves_the_files_untouched(tmp_path):
    """Stages identify input files by size and mtime: `make demo` prepares before every run, and
    rewriting identical files made a rerun recompute every finished stage."""
    from pipeline.prepare import write_parts

    rows = [{"id": f"r{i}", "text": f"row {i}", "source": "s"} for i in range(25)]
    out = tmp_path / "role"
    write_parts(rows, str(out), rows_per_file=10)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    assert len(before) == 3
    write_parts(rows, str(out), rows_per_file=10)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()} == before
    assert not (tmp_path / "role.tmp").exists()
    rows[7]["text"] = "changed"
    write_parts(rows, str(out), rows_per_file=10)
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    assert after.keys() == before.keys() and after != before
    import pyarrow.parquet as pq

    assert "changed" in pq.read_table(out).column("text").to_pylist()
