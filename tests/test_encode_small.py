"""Small tables (the score stage's queries, encode's fidelity sample) are embedded in the calling
process by the same CodeEncoder that the actors run: same codes, same rejects, and a failure is a
StageError naming the stage and the input file, as an actor's is."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline import corpus
from pipeline.codestore import codes_from_arrow
from pipeline.config import load_job
from pipeline.errors import StageError
from pipeline.schema import CODE, ID
from pipeline.stages import shared_encode


def _job(tmp_path, fixture_corpora, encoder: str):
    queries = {"path": str(fixture_corpora / "queries"), "id_column": "id", "encoder_text_column": "text"}
    return load_job(
        data={
            "run_dir": str(tmp_path / "run"),
            "corpus": {**queries, "path": str(fixture_corpora / "corpus")},
            "anchors": {**queries, "path": str(fixture_corpora / "anchors")},
            "encoder": {"model": encoder, "max_len": 16},  # short: some queries are cut (truncated flags)
            "encode": {"batch_size": 4},
            "score": {"queries": queries},
            "ray": {"num_cpus": 2},
        }
    )


def _queries(job):
    files = corpus.discover(job.score.queries, "score.queries")
    return corpus.read_local(job.score.queries, files)


def _by_id(table):
    return table.take(pc.sort_indices(table, [(ID, "ascending")]))


@pytest.mark.parametrize("export", ["plain", "blended"])
def test_in_process_equals_the_actors(
    tmp_path, fixture_corpora, tiny_encoder_dir, ray_local, monkeypatch, export
) -> None:
    from tiny_models import build_blended_encoder

    from pipeline.encoder import TextEncoder

    model_dir = tiny_encoder_dir
    if export == "blended":  # fit's score-space blend: the actors load both halves from the folder
        model_dir = str(build_blended_encoder(tmp_path / "blended", tiny_encoder_dir, 0.3))
    job = _job(tmp_path, fixture_corpora, model_dir)
    table = _queries(job)
    args = (job, table, model_dir, "float32")
    here = _by_id(shared_encode.encode_small(*args, text_prefix="q: ", stage="score"))
    monkeypatch.setattr(shared_encode, "IN_PROCESS_MAX_ROWS", 0)  # the same table through the actors
    actors = _by_id(shared_encode.encode_small(*args, text_prefix="q: ", stage="score"))
    assert here.num_rows == actors.num_rows == table.num_rows > 0
    for name in here.column_names:
        if name != CODE:
            assert here.column(name).to_pylist() == actors.column(name).to_pylist(), name
    assert any(here.column(shared_encode.TRUNCATED).to_pylist())  # max_len 16 cuts some rows
    a, b = codes_from_arrow(here.column(CODE), "float32"), codes_from_arrow(actors.column(CODE), "float32")
    np.testing.assert_allclose(a, b, atol=1e-5)  # torch thread counts may differ between the processes
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    assert a.shape[1] == TextEncoder(model_dir, 16).dim == (64 if export == "blended" else 32)


def test_in_process_failure_is_a_stage_error_naming_the_file(tmp_path, fixture_corpora, tiny_encoder_dir) -> None:
    job = _job(tmp_path, fixture_corpora, tiny_encoder_dir)
    table = _queries(job)

    def explode(self, batch):
        raise OSError("tokenizer exploded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shared_encode.CodeEncoder, "_encode", explode)
        with pytest.raises(StageError, match=r"^score: .*queries.*tokenizer exploded"):
            shared_encode.encode_small(job, table, tiny_encoder_dir, "float32", stage="score")
