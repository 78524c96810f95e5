"""Real faults, real processes: kill a sketch actor, kill the driver, kill the Ray Train worker, then
check that nothing is lost or duplicated.

Each test runs `influcoder` in a subprocess (with its own in-process Ray) and kills real processes
found by pid; every process a test starts carries a tag so that leftovers are killed by pid
afterwards (tests/proc_util.py). The expected selection is recomputed independently of the stage
from the corpus and the seeded order (pipeline.sampling), so "every id exactly once" is checked
against ground truth rather than against the stage's own bookkeeping.

The models are the tiny random ones (tests/tiny_models.py): what is under test is Ray's and the
stages' recovery, not the models. Every test starts its own Ray in a subprocess: marked `slow`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import proc_util
from conftest import REPO

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

INFLUCODER = [str(Path(sys.executable).parent / "python"), "-m", "pipeline.cli"]


SHARDS = 18  # of 2 rows: 12 anchors + 24 pool rows


def _fault_job(tiny_job: dict, run_dir: Path) -> dict:
    """18 shards of 2 rows: with the tiny teacher, still long enough to kill something between the
    first and the last shard."""
    job = json.loads(json.dumps(tiny_job))
    job["run_dir"] = str(run_dir)
    job["teacher"]["max_len"] = 32
    job["sketch"].update(
        {
            "batch_size": 2,
            "proj_dim": 256,
            "train_anchors": 10,
            "eval_anchors": 2,
            "train_pool": 20,
            "eval_pool": 4,
            "rows_per_shard": 2,
            "fidelity_samples": 0,
        }
    )
    # No dashboard: it serves the State API that only fit (Ray Train) needs, and each `influcoder`
    # process here would start one (seconds of this 2-core machine per process).
    job["ray"]["include_dashboard"] = False
    return job


def _expected_ids(job: dict) -> dict[str, dict[str, set[str]]]:
    """role -> split -> ids, recomputed from the inputs (first occurrence of an id wins)."""
    from pipeline import corpus, sampling
    from pipeline.config import load_job

    cfg = load_job(data=job)
    out: dict[str, dict[str, set[str]]] = {}
    taken: set[str] = set()
    for role, ds, n_eval, n_train in (
        ("anchors", cfg.anchors, cfg.sketch.eval_anchors, cfg.sketch.train_anchors),
        ("pool", cfg.pool_dataset, cfg.sketch.eval_pool, cfg.sketch.train_pool),
    ):
        good, _ = corpus.split_rejects(corpus.read_local(ds, corpus.discover(ds, role)))
        rows, seen = [], set()
        for r in good.to_pylist():
            if r["id"] not in seen:
                seen.add(r["id"])
                rows.append(r)
        exclude = taken if ds.path == cfg.anchors.path else set()
        ordered = sampling.select(rows, cfg.sketch.split_seed, n_eval + n_train, exclude)
        out[role] = {
            "eval": {r["id"] for r in ordered[:n_eval]},
            "train": {r["id"] for r in ordered[n_eval : n_eval + n_train]},
        }
        taken |= out[role]["eval"] | out[role]["train"]
    return out


def _assert_exactly_once(run_dir: Path, expected: dict[str, dict[str, set[str]]]) -> None:
    for role, splits in expected.items():
        t = pq.read_table(run_dir / "sketch" / role)
        ids = t.column("id").to_pylist()
        assert len(ids) == len(set(ids)), f"{role}: duplicated ids {sorted(i for i in ids if ids.count(i) > 1)}"
        got = {s: {i for i, sp in zip(ids, t.column("split").to_pylist()) if sp == s} for s in ("eval", "train")}
        assert got == splits, f"{role}: ids lost or wrong split"
        vecs = np.asarray(t.column("sketch").combine_chunks().flatten()).reshape(t.num_rows, -1)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    manifest = json.loads((run_dir / "sketch" / "manifest.json").read_text())
    assert manifest["rejects"]["rows"] == 0


@pytest.fixture()
def tagged_env():
    """Environment for subprocesses: a tag for cleanup by pid, and Ray session files in a temp dir."""
    tmp = tempfile.mkdtemp(prefix="icft", dir="/tmp")
    tags: list[str] = []

    def make() -> dict:
        tag = proc_util.new_tag()
        tags.append(tag)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            {
                proc_util.TAG: tag,
                "RAY_TMPDIR": tmp,
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            }
        )
        return env

    yield make
    for tag in tags:
        proc_util.kill_tagged(tag)
        assert proc_util.tagged(tag) == []
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def _shard_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".work/sketch-*/shards/*.parquet"))


def _start(job_path: Path, env: dict, log_path: Path, stage: str = "sketch") -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(
        # -v: the per-shard "done" lines these tests count are debug lines.
        [*INFLUCODER, "-v", stage, str(job_path)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_sketch_actor_killed_mid_run(tiny_job, tmp_path, tagged_env):
    """SIGKILL the SketchActor process after its first shard: Ray restarts the actor and retries the
    lost batches (Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1); the stage
    finishes with every selected id exactly once."""
    job = _fault_job(tiny_job, tmp_path / "run")
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    log_path = tmp_path / "sketch.log"
    proc = _start(job_path, tagged_env(), log_path)
    try:
        proc_util.wait_for(
            lambda: _shard_files(tmp_path / "run") or proc.poll() is not None, 300, what="the first shard file"
        )
        actor = proc_util.find_worker(proc.pid, "SketchActor")
        assert actor is not None and proc.poll() is None, log_path.read_text()[-3000:]
        done_at_kill = len(_shard_files(tmp_path / "run"))
        actor.send_signal(signal.SIGKILL)
        actor.wait(timeout=30)
        # Ray starts a replacement actor process (a different pid) that finishes the work.
        replacement = proc_util.wait_for(
            lambda: (w := proc_util.find_worker(proc.pid, "SketchActor")) and w.pid != actor.pid and w,
            240,
            interval=0.2,
            what="a restarted SketchActor",
        )
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert rc == 0, log[-6000:]
    assert replacement.pid != actor.pid
    assert done_at_kill < SHARDS, "the kill came after the last shard: nothing was tested"
    assert len(re.findall(r"sketch: shard \S+ done", log)) == SHARDS
    _assert_exactly_once(tmp_path / "run", _expected_ids(job))


def test_driver_killed_mid_sketch_resumes(tiny_job, tmp_path, tagged_env):
    """SIGKILL the `influcoder sketch` driver after its first shard; the rerun recomputes only the
    missing shards (finished shard files are not rewritten) and the artifact has every id once."""
    job = _fault_job(tiny_job, tmp_path / "run")
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    proc = _start(job_path, tagged_env(), tmp_path / "first.log")
    try:
        proc_util.wait_for(
            lambda: _shard_files(tmp_path / "run") or proc.poll() is not None, 300, what="the first shard file"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert not (tmp_path / "run" / "sketch").exists()  # no half-finished artifact
    time.sleep(1.0)  # let the killed driver's Ray processes die (and stop writing) before snapshotting
    before = {p: p.stat().st_mtime_ns for p in _shard_files(tmp_path / "run")}
    assert 1 <= len(before) < SHARDS, f"the kill was not mid-run: {len(before)} of {SHARDS} shards done"

    rerun = _start(job_path, tagged_env(), tmp_path / "rerun.log")
    changed = []
    try:
        while rerun.poll() is None:  # watch the finished shards until the stage deletes its work dir
            for p, mtime in before.items():
                try:
                    if p.stat().st_mtime_ns != mtime:
                        changed.append(p.name)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)
        rerun.wait(timeout=300)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    log = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, log[-6000:]
    assert changed == [], f"finished shards were rewritten: {changed}"
    assert f"in {SHARDS} shards ({len(before)} already done)" in log
    recomputed = set(re.findall(r"sketch: shard (\S+) done", log))
    assert len(recomputed) == SHARDS - len(before)
    assert recomputed.isdisjoint({p.stem for p in before})
    _assert_exactly_once(tmp_path / "run", _expected_ids(job))


def _train_snapshot(run_dir: Path) -> dict | None:
    """Ray Train's checkpoint-manager snapshot of the fit stage, or None before the first checkpoint.

    The Train controller rewrites it each time it registers a checkpoint, i.e. once a checkpoint has
    been fully uploaded and is what a restarted worker group resumes from (a checkpoint directory can
    exist half-copied; this file cannot: it is written after the copy)."""
    for path in run_dir.glob(".work/fit-*/ray_train/fit-*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # being rewritten; the next poll reads it whole
            return None
    return None


def _checkpointed_epochs(snapshot: dict | None) -> list[int]:
    return sorted(r["metrics"]["epoch"] for r in (snapshot or {}).get("checkpoint_results", []))


def _planted_sketch(sizes: dict[str, int], dim: int = 16, seed: int = 0):
    """A stand-in sketch stage runner: short texts and random unit sketches in the artifact's
    contract (id, split, text, sketch), written with a real manifest by `artifacts.run_stage`."""
    import pyarrow as pa

    from pipeline.schema import ID, SKETCH, SPLIT, TEXT

    rng = np.random.default_rng(seed)
    words = "river stone cloud number vote season paper garden signal winter market theory".split()
    schema = pa.schema(
        [
            pa.field(ID, pa.string()),
            pa.field(SPLIT, pa.string()),
            pa.field(TEXT, pa.string()),
            pa.field(SKETCH, pa.list_(pa.float32(), dim)),
        ]
    )

    def run(ctx):
        for side in ("anchors", "pool"):
            rows = []
            for split in ("eval", "train"):
                for i in range(sizes[f"{split}_{side}"]):
                    v = rng.normal(size=dim)
                    rows.append(
                        {
                            ID: f"{side}-{split}-{i}",
                            SPLIT: split,
                            TEXT: " ".join(rng.choice(words, size=8)),
                            SKETCH: (v / np.linalg.norm(v)).astype(np.float32).tolist(),
                        }
                    )
            os.makedirs(os.path.join(ctx.out_dir, side))
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(ctx.out_dir, side, "part-0.parquet"))
        ctx.record(rows={side: sizes[f"train_{side}"] + sizes[f"eval_{side}"] for side in ("anchors", "pool")})

    return run


def test_ray_train_worker_killed_mid_fit_resumes_from_checkpoint(tmp_path, tagged_env, tiny_encoder_dir):
    """SIGKILL the real Ray Train worker process (`ray::RayTrainWorker`) once epoch 1's checkpoint is
    registered: Ray Train (FailureConfig.max_failures) starts a new worker group that resumes from
    that checkpoint, so `influcoder fit` still exits 0 with every epoch exactly once, and says it
    resumed.

    The upstream sketch artifact is a planted one (short texts, random unit sketches, a real
    manifest), written in well under a second: the teacher is not what is under test here, and a
    real sketch stage would add ~40 s on a 2-CPU machine. The encoder is the tiny one.
    """
    from pipeline import artifacts

    # An epoch is one optimiser step plus held-out eval plus a small checkpoint (tiny encoder: ~15 MB
    # of weights and AdamW state) written, copied and registered with Ray Train's controller. The kill
    # lands early in epoch 2, so epochs 2-6 are the margin (checked below: the registered
    # checkpoints at the kill stop short of the last).
    epochs = 6
    sizes = {"train_anchors": 4, "train_pool": 8, "eval_anchors": 2, "eval_pool": 4}
    run_dir = tmp_path / "run"
    job = {
        "run_dir": str(run_dir),
        "seed": 0,
        "corpus": {"path": "unused"},
        "anchors": {"path": "unused"},
        "sketch": {"proj_dim": 16, **sizes},
        "encoder": {"model": tiny_encoder_dir, "max_len": 32},
        # Every train row trains and the last epoch is exported (no validation split to choose on).
        "fit": {
            "epochs": epochs,
            "block_anchors": 4,
            "block_candidates": 8,
            "max_failures": 2,
            "val_frac": 0.0,
            "restore_best": False,
        },
        "ray": {"num_cpus": 2},
    }
    artifacts.run_stage(load_job_dict(job), "sketch", runner=_planted_sketch(sizes))
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    log_path = tmp_path / "fit.log"
    proc = _start(job_path, tagged_env(), log_path, "fit")

    def train_worker(not_pid: int | None = None):
        """The live Ray Train worker process under the fit driver (True once the driver has exited)."""
        w = proc_util.find_worker(proc.pid, "RayTrainWorker")
        return (w if w is not None and w.pid != not_pid else None) or proc.poll() is not None

    try:
        worker = proc_util.wait_for(train_worker, 360, interval=0.2, what="the Ray Train worker process")
        assert proc.poll() is None, log_path.read_text()[-4000:]
        first = proc_util.wait_for(
            lambda: _checkpointed_epochs(_train_snapshot(run_dir)) or proc.poll() is not None,
            240,
            interval=0.05,
            what="the first registered fit checkpoint",
        )
        assert proc.poll() is None and worker.is_running(), log_path.read_text()[-4000:]
        title = " ".join(worker.cmdline()).strip()  # Ray pads it: "ray::RayTrainWorker      ..."
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        at_kill = proc_util.wait_for(
            lambda: _checkpointed_epochs(_train_snapshot(run_dir)), 10, what="a readable checkpoint snapshot"
        )
        replacement = proc_util.wait_for(
            lambda: train_worker(not_pid=worker.pid), 240, interval=0.2, what="a restarted Ray Train worker"
        )
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    assert title.startswith("ray::RayTrainWorker"), title
    assert first == [1] and max(at_kill) < epochs, f"the kill came after the last epoch ({at_kill}): nothing tested"
    assert replacement is not True, "no new Ray Train worker was started before the fit ended"
    metrics = json.loads((run_dir / "fit" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1))
    # Resumed from a checkpoint (epoch 1 or a later one), not restarted from scratch.
    assert metrics["resumed_from_epochs"] and 1 <= metrics["resumed_from_epochs"][0] < epochs
    manifest = json.loads((run_dir / "fit" / "manifest.json").read_text())
    assert manifest["stage"] == "fit" and manifest["fit"]["resumed_from_epochs"] == metrics["resumed_from_epochs"]
    assert manifest["fit"]["selected_epoch"] == epochs
    assert (run_dir / "fit" / "encoder" / "model.safetensors").exists()
    assert not list(run_dir.glob(".work/fit-*")), "the fit work dir (checkpoints) outlived the committed stage"


@pytest.mark.parametrize("layout", ["same_run_dir", "shared_table_two_run_dirs"])
def test_two_encode_jobs_racing_on_one_table(tmp_path, tiny_encoder_dir, tagged_env, layout):
    """Two `influcoder encode` drivers writing one LanceDB table at once (from one run_dir, or from two
    run_dirs whose `encode.lancedb_uri` is the same): the table must end with exactly one row per
    corpus id (no corruption), and both runs succeed."""
    from test_encode_score import fake_upstream, make_job

    from pipeline.codestore import CodeStore

    data = make_job(tmp_path, tiny_encoder_dir, shards=2, rows_per_shard=20)  # 40 rows, one of them bad
    job = load_job_dict(data)
    data.setdefault("encode", {})["lancedb_uri"] = job.lancedb_uri
    fake_upstream(job)
    paths = []
    for i in range(2):
        d = json.loads(json.dumps(data))
        if layout == "shared_table_two_run_dirs" and i == 1:
            d["run_dir"] = str(tmp_path / "run_b")
            fake_upstream(load_job_dict(d))
        paths.append(tmp_path / f"job{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(d))
    first = _start(paths[0], tagged_env(), tmp_path / "encode0.log", "encode")
    second = None
    try:
        # The second driver starts once the first has created the table, long before it upserts.
        proc_util.wait_for(
            lambda: (Path(job.lancedb_uri) / "codes.lance").exists() or first.poll() is not None,
            240,
            what="the codes table",
        )
        second = _start(paths[1], tagged_env(), tmp_path / "encode1.log", "encode")
        rcs = [first.wait(timeout=300), second.wait(timeout=300)]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    assert rcs == [0, 0], [(tmp_path / f"encode{i}.log").read_text()[-3000:] for i in range(2)]
    ids = CodeStore(job.lancedb_uri, job.encode.table).table.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 39


def load_job_dict(data: dict):
    from pipeline.config import load_job

    return load_job(data=data)
