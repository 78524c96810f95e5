"""Benchmark: encode through Ray Data + LanceDB, full-corpus exact scoring, code storage per row.

    python bench/bench_encode_score.py                    # quick: ~1k T0 rows, 200k synthetic codes
    python bench/bench_encode_score.py --encode-rows 4000 --max-len 16 --score-rows 1000000 \
        --scale 1000000 --encoder-max-len 16             # the issue's scale run: ~75 min on 2 CPUs

Figures (printed, and written to bench/out/encode_score.json):
1. encode: rows/s of the encode stage (Ray Data actors -> writer tasks -> Lance fragments) vs a
   plain in-process batched loop of the same encoder on the same rows (target >= 0.8x).
2. score: rows/s and GB/s of code bytes of the score stage's scan loop over a Lance table, for 1
   and 16 queries, vs the memory bandwidth measured here with a numpy copy (target >= 0.5x of the
   bandwidth bound), with the Lance scan alone and the scoring kernel alone as ceilings; and side by
   side, the peer a user would pick for exact search: FAISS (`faiss-cpu`, the bench-only extra
   `pip install -e ".[bench]"`) on the same codes and queries, top-10, as `IndexFlatIP` (float32
   codes in memory: twice the bytes) and `IndexScalarQuantizer` QT_fp16 (the same float16 bytes).
   FAISS searches codes already in RAM and returns only the top-10; the score stage streams them
   from the Lance table and also writes every row's mean/max score (the full ranking).
3. storage: bytes per row on disk for float16 and int8 codes vs a LESS-style 8192-dim float16
   gradient (16 KiB).
4. --scale N: a T0 corpus of N rows (the sample replicated with distinct ids) encoded and scored by
   the real stages, with peak memory (PSS) of the driver + Ray processes, and cost per row at N vs N/10.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pipeline import artifacts  # noqa: E402
from pipeline.codes import exact_scores, quantize  # noqa: E402
from pipeline.codestore import CODE_SCALE, CodeSpec, CodeStore, code_array, codes_from_arrow  # noqa: E402
from pipeline.config import load_job  # noqa: E402
from pipeline.schema import CODE  # noqa: E402

from common import best_of, read_jsonl  # noqa: E402  (bench/ is the script's directory)

DATA = Path(os.environ.get("DATA", REPO.parent / "shared" / "data"))
LESS_BYTES = 8192 * 2


class PeakPSS:
    """Peak memory of this process and all its descendants (Ray's raylet, workers, actors).

    Sums PSS (proportional set size): pages shared between processes, such as Ray's object store
    in /dev/shm, count once in total rather than once per process that maps them (a plain RSS sum
    counts them several times). Also keeps the driver's own peak and the largest single process.
    """

    def __init__(self, every: float = 0.5):
        self.every, self._stop = every, threading.Event()
        self.peak = self.driver_peak = self.process_peak = 0

    @staticmethod
    def _pss(p: psutil.Process) -> int:
        try:
            return p.memory_full_info().pss
        except (psutil.Error, AttributeError):  # exited, or no smaps: fall back to RSS
            try:
                return p.memory_info().rss
            except psutil.Error:
                return 0

    def _sample(self) -> None:
        me = psutil.Process()
        mine = self._pss(me)
        others = [self._pss(c) for c in me.children(recursive=True)]
        self.peak = max(self.peak, mine + sum(others))
        self.driver_peak = max(self.driver_peak, mine)
        self.process_peak = max(self.process_peak, mine, *others)

    def __enter__(self):
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def summary(self, prefix: str) -> dict:
        return {
            f"{prefix}_peak_pss_mb": round(self.peak / 2**20),
            f"{prefix}_driver_peak_pss_mb": round(self.driver_peak / 2**20),
            f"{prefix}_largest_process_peak_pss_mb": round(self.process_peak / 2**20),
        }


def t0_rows(n: int) -> list[dict]:
    return [
        {"prompt": r["prompt"], "response": r["completion"]} for r in read_jsonl(DATA / "t0" / "t0_train_50k.jsonl", n)
    ]


def write_corpus(out: Path, n: int, base: int = 2000, rows_per_file: int = 50_000) -> Path:
    """N rows: the first `base` T0 rows replicated, each copy with distinct ids."""
    sample = t0_rows(min(n, base))
    out.mkdir(parents=True, exist_ok=True)
    written, part = 0, 0
    while written < n:
        m = min(rows_per_file, n - written)
        idx = [(written + i) % len(sample) for i in range(m)]
        t = pa.table(
            {
                "id": [f"r{written + i}" for i in range(m)],
                "prompt": [sample[i]["prompt"] for i in idx],
                "response": [sample[i]["response"] for i in idx],
            }
        )
        pq.write_table(t, out / f"part-{part:05d}.parquet", row_group_size=8192)
        written, part = written + m, part + 1
    return out


def make_job(tmp: Path, corpus: Path, max_len: int, **extra) -> dict:
    queries = tmp / "queries"
    queries.mkdir(parents=True, exist_ok=True)
    with open(DATA / "gsm8k" / "test.jsonl") as f:
        q = [json.loads(next(f)) for _ in range(16)]
    pq.write_table(
        pa.table(
            {
                "qid": [f"q{i}" for i in range(16)],
                "prompt": [r["question"] for r in q],
                "response": [r["answer"] for r in q],
            }
        ),
        queries / "q.parquet",
    )
    return {
        "run_dir": str(tmp / "run"),
        "corpus": {"path": str(corpus), "id_column": "id"},
        "anchors": {"path": str(queries)},
        "encoder": {"model": "all-minilm-l6-v2", "max_len": max_len},
        "encode": {"batch_size": 64, "index": "none", **extra.get("encode", {})},
        "score": {"queries": {"path": str(queries), "id_column": "qid"}, "top_k": 10},
        "ray": {"num_cpus": os.cpu_count()},
    }


def fake_upstream(job) -> str:
    from pipeline.encoder import TextEncoder
    from pipeline.models import resolve_encoder

    artifacts.run_stage(job, "sketch", runner=lambda ctx: None)
    artifacts.run_stage(
        job,
        "fit",
        runner=lambda ctx: TextEncoder(resolve_encoder("all-minilm-l6-v2"), job.encoder.max_len).save(
            os.path.join(ctx.out_dir, "encoder")
        ),
    )
    return os.path.join(job.run_dir, "fit", "encoder")


def bench_encode(tmp: Path, rows: int, max_len: int) -> dict:
    import torch

    from pipeline.encoder import TextEncoder

    corpus = write_corpus(tmp / "corpus", rows, rows_per_file=max(1, rows // 4))
    job = load_job(data=make_job(tmp, corpus, max_len))
    model_dir = fake_upstream(job)
    texts = [f"{r['prompt']}\n{r['response']}" for r in t0_rows(rows)]
    torch.set_num_threads(os.cpu_count())
    enc = TextEncoder(model_dir, max_len)
    enc.embed(texts[:64])  # warm-up (METHOD.md 1e)
    t0 = time.perf_counter()
    enc.embed(texts, batch_size=64)
    plain_s = time.perf_counter() - t0
    del enc
    t0 = time.perf_counter()
    m = artifacts.run_stage(job, "encode")
    stage_s = time.perf_counter() - t0
    out = {
        "rows": rows,
        "max_len": max_len,
        "cpus": os.cpu_count(),
        "plain_rows_per_s": round(rows / plain_s, 1),
        "ray_lancedb_rows_per_s": m["rows_per_s"],
        "ray_lancedb_stage_rows_per_s_incl_startup": round(rows / stage_s, 1),
        "ratio_vs_plain": round(m["rows_per_s"] / (rows / plain_s), 3),
        "ratio_vs_plain_incl_startup": round((rows / stage_s) / (rows / plain_s), 3),
        "target_ratio": 0.8,
    }
    return out


def memcpy_gbps(mb: int = 512) -> float:
    a = np.ones(mb * 1024 * 1024 // 8, np.float64)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)  # bytes read (a copy also writes)
    return best


def synthetic_table(uri: str, name: str, n: int, dim: int, dtype: str) -> CodeStore:
    store = CodeStore(uri, name)
    store.prepare(CodeSpec("synthetic", dim, dtype))
    rng = np.random.default_rng(0)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        q = quantize(x / np.linalg.norm(x, axis=1, keepdims=True), dtype)
        store.table.add(
            pa.table(
                {
                    "id": [f"s{start + i}" for i in range(m)],
                    CODE: code_array(q.codes),
                    "source": ["synthetic"] * m,
                    "row": np.arange(start, start + m),
                    "encoder_fingerprint": ["synthetic"] * m,
                    "code_dtype": [dtype] * m,
                    CODE_SCALE: q.scales,
                    "encoded_utc": [""] * m,
                }
            ).cast(store.table.schema)
        )
    # Compact, and drop the superseded versions so the directory size is the steady-state size.
    store.optimize()  # the encode stage's compaction (row groups of codestore.ROWS_PER_GROUP)
    store.table.optimize(cleanup_older_than=dt.timedelta(0), delete_unverified=True)
    return store


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_score_and_storage(tmp: Path, n: int, dim: int = 384, query_counts=(1, 16)) -> dict:
    """The score stage's scan loop (score_scan.score_batches: Lance scan, exact mean/max, top-10 per query,
    the per-batch score table) on synthetic unit codes, vs the memcpy bound; with two ceilings
    measured alongside: the Lance scan alone, and the scoring kernel on codes already in memory."""
    from pipeline.codes import MultiTopK
    from pipeline.stages.score_scan import scan_columns, score_batches

    rng = np.random.default_rng(1)
    bw = memcpy_gbps()
    out = {"rows": n, "dim": dim, "memcpy_gb_per_s": round(bw, 2), "dtypes": {}}
    for dtype in ("float16", "int8"):
        uri = str(tmp / f"lance_{dtype}")
        store = synthetic_table(uri, "codes", n, dim, dtype)
        ds = store.dataset()
        code_bytes = n * (dim * np.dtype(dtype).itemsize + (4 if dtype == "int8" else 0))
        scan_s = best_of(lambda: sum(1 for _ in store.iter_batches(scan_columns(dtype), 65536, dataset=ds)))
        # Kernel ceiling: 256k rows (~200 MB of float16, far beyond cache) already in memory.
        head = pa.Table.from_batches(
            list(itertools.islice(store.iter_batches(scan_columns(dtype), 65536, dataset=ds), 32))
        )
        codes = np.ascontiguousarray(codes_from_arrow(head.column(1), dtype))
        scales = head.column(2).to_numpy() if dtype == "int8" else None
        disk = dir_bytes(os.path.join(uri, "codes.lance"))
        row = {
            "disk_bytes_per_row": round(disk / n, 1),
            "code_bytes_per_row": code_bytes // n,
            "vs_less_8192_fp16": round(LESS_BYTES / (disk / n), 1),
            "scan_only_gb_per_s": round(code_bytes / scan_s / 1e9, 3),
            "queries": {},
        }
        for nq in query_counts:
            queries = rng.standard_normal((nq, dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            kernel_s = best_of(lambda: exact_scores(queries, codes, scales)) * n / len(codes)
            s = best_of(
                lambda: score_batches(
                    store.iter_batches(scan_columns(dtype), 65536, dataset=ds),
                    queries,
                    dtype,
                    MultiTopK(nq, 10),
                    lambda t: None,
                )
            )
            gbps = code_bytes / s / 1e9
            row["queries"][str(nq)] = {
                "score_rows_per_s": round(n / s, 1),
                "code_gb_per_s": round(gbps, 3),
                "fraction_of_memcpy": round(gbps / bw, 3),
                "target_fraction": 0.5,
                "kernel_only_gb_per_s": round(code_bytes / kernel_s / 1e9, 3),
                "kernel_gflop_per_s": round(2 * nq * dim * n / kernel_s / 1e9, 1),
            }
        if dtype == "float16":
            row["faiss"] = faiss_peer(store, ds, dtype, dim, query_counts, rng_seed=1)
            for nq, peer in row["faiss"].get("queries", {}).items():
                for fig in peer.values():
                    if isinstance(fig, dict):
                        fig["influcoder_vs_faiss"] = round(
                            row["queries"][nq]["score_rows_per_s"] / fig["rows_per_s"], 3
                        )
        out["dtypes"][dtype] = row
    out["less_bytes_per_row"] = LESS_BYTES
    return out


def faiss_peer(store, ds, dtype: str, dim: int, query_counts, rng_seed: int) -> dict:
    """FAISS exact top-10 on the table's codes (all in RAM) for the same query draws as the score
    loop, with the top-10 agreement against an exact numpy search of the same codes."""
    try:
        import faiss
    except ImportError:
        return {"skipped": 'faiss-cpu is not installed (bench-only: pip install -e ".[bench]"); no figure'}
    from pipeline.stages.score_scan import scan_columns

    codes16 = np.concatenate(
        [codes_from_arrow(b.column(1), dtype) for b in store.iter_batches(scan_columns(dtype), 65536, dataset=ds)]
    )
    codes32 = codes16.astype(np.float32)
    flat = faiss.IndexFlatIP(dim)
    flat.add(codes32)
    sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.train(codes32[:1])  # fp16 needs no training; the call only marks the index trained
    sq.add(codes32)
    n = len(codes16)
    rng = np.random.default_rng(rng_seed)  # the same query draws as the score loop above
    out = {"threads": faiss.omp_get_max_threads(), "version": faiss.__version__, "queries": {}}
    for nq in query_counts:
        queries = rng.standard_normal((nq, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = np.argsort(-(codes32 @ queries.T), axis=0, kind="stable")[:10].T
        fig = {}
        for name, index, nbytes in (("IndexFlatIP", flat, 4), ("IndexScalarQuantizer_fp16", sq, 2)):
            s = best_of(lambda: index.search(queries, 10))
            _, ids = index.search(queries, 10)
            agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
            fig[name] = {
                "rows_per_s": round(n / s, 1),
                "code_gb_per_s": round(n * dim * nbytes / s / 1e9, 3),
                "top10_agreement_with_exact": round(float(agree), 3),
            }
        out["queries"][str(nq)] = fig
    return out


def bench_scale(tmp: Path, n: int, max_len: int) -> dict:
    """The real encode + score stages on N rows; cost per row at N/10 and N."""
    from pipeline.ray_runtime import ensure_ray

    results = {}
    for size in (max(1, n // 10), n):
        d = tmp / f"scale_{size}"
        corpus = write_corpus(d / "corpus", size)
        job = load_job(data=make_job(d, corpus, max_len))
        ensure_ray(job.ray)
        fake_upstream(job)
        with PeakPSS() as enc_rss:
            t0 = time.perf_counter()
            me = artifacts.run_stage(job, "encode")
            enc_s = time.perf_counter() - t0
        with PeakPSS() as sc_rss:
            t0 = time.perf_counter()
            ms = artifacts.run_stage(job, "score")
            sc_s = time.perf_counter() - t0
        results[str(size)] = {
            "rows": me["rows"]["in_table"],
            "encoder_max_len": max_len,
            "encode_s": round(enc_s, 2),
            "encode_ms_per_row": round(1000 * enc_s / size, 3),
            **enc_rss.summary("encode"),
            "score_s": round(sc_s, 2),
            "score_ms_per_row": round(1000 * sc_s / size, 4),
            **sc_rss.summary("score"),
            "score_scan_rows_per_s": ms["timing"]["rows_per_s"],
            "score_scan_s": ms["timing"]["score_s"],
            "score_rank_s": ms["timing"]["rank_s"],
            "score_scan_batches": ms["timing"].get("scan_batches"),
            "encode_stage_rows_per_s": me["rows_per_s"],
        }
        print(f"scale {size}:", json.dumps(results[str(size)]), flush=True)  # a long run shows each size
        shutil.rmtree(d / "run" / "fit", ignore_errors=True)
    small, big = results[str(max(1, n // 10))], results[str(n)]
    results["cost_per_row_ratio_N_vs_N_over_10"] = {
        "encode": round(big["encode_ms_per_row"] / small["encode_ms_per_row"], 3),
        "score": round(big["score_ms_per_row"] / small["score_ms_per_row"], 3),
    }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encode-rows", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=128, help="encoder max_len for the encode comparison")
    p.add_argument("--score-rows", type=int, default=200_000, help="synthetic codes for the scoring figures")
    p.add_argument("--scale", type=int, default=0, help="also run the stages on a corpus of N rows")
    p.add_argument("--encoder-max-len", type=int, default=32, help="encoder max_len in --scale mode")
    p.add_argument("--skip", nargs="*", default=[], choices=["encode", "score"])
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "encode_score.json"))
    args = p.parse_args()
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m": os.getloadavg()[0],
        }
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-score-"))
    try:
        if "encode" not in args.skip:
            report["encode"] = bench_encode(tmp / "enc", args.encode_rows, args.max_len)
            print("encode:", json.dumps(report["encode"], indent=1))
        if "score" not in args.skip:
            report["score_storage"] = bench_score_and_storage(tmp / "score", args.score_rows)
            print("score/storage:", json.dumps(report["score_storage"], indent=1))
        if args.scale:
            report["scale"] = bench_scale(tmp / "scale", args.scale, args.encoder_max_len)
            enc = report.get("encode")
            if enc and enc["max_len"] == args.encoder_max_len:
                # Steady state: the stage over N rows (actor start-up amortised) vs the plain loop's rate.
                stage = report["scale"][str(args.scale)]["encode_stage_rows_per_s"]
                report["scale"]["encode_stage_vs_plain_at_N"] = round(stage / enc["plain_rows_per_s"], 3)
            print("scale:", json.dumps(report["scale"], indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
