"""`influcoder` command line. Parses, validates, dispatches; heavy imports happen in the handlers
so `--help` answers instantly.

Exit codes: 0 success, 2 usage/config/input error (the message names the file, key or column and
the fix), 1 stage failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pipeline import __version__
from pipeline.errors import InflucoderError, UsageError

STAGES = ("sketch", "fit", "encode", "score", "eval")
STAGE_HELP = {
    "sketch": "teacher: exact per-sample LoRA-gradient sketches of anchors and pool rows",
    "fit": "distil the sketches' influence rankings into the encoder (Ray Train)",
    "encode": "embed the whole corpus once into the LanceDB table `codes` (incremental)",
    "score": "rank every corpus row against the queries (exact, streamed) + per-query top-k",
    "eval": "fidelity to the gradients, AUPRC/recall, costs, baselines, and the report",
}

log = logging.getLogger("influcoder")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML (see jobs/demo.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job key by its dotted name, e.g. --set sketch.batch_size=4 (repeatable)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace finished stage outputs that were made with a different config"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influcoder",
        description="Find the training samples that shape a model's behaviour: gradient influence of a LoRA "
        "teacher, distilled into a text encoder, scored over whole corpora on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"influcoder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="build Parquet corpora from JSONL/JSON/Parquet sources",
        description="Build canonical Parquet corpora (id, prompt, response, text, source, label). "
        "Either --data (the shared demo datasets) or --input (any JSONL/Parquet).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="the shared data folder (bbh/, gsm8k/, t0/, toxigen/): builds the demo corpora")
    src.add_argument("--input", help="a JSONL/Parquet file, directory, glob or URI to convert")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows-per-file", type=int, default=10000)
    for col in ("id", "prompt", "response", "text", "encoder-text", "label"):
        p.add_argument(
            f"--{col}-column", default=None, help=f"column holding the {col.replace('-', ' ')} (with --input)"
        )

    p = sub.add_parser("run", help="run the stages of a job in order, skipping finished ones")
    _add_job_args(p)
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=STAGES[0], help="first stage to run")
    p.add_argument("--to", dest="to_stage", choices=STAGES, default=STAGES[-1], help="last stage to run")

    for stage in STAGES:
        _add_job_args(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))

    p = sub.add_parser("status", help="show which stages of a run directory are done")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline import prepare

    if args.data:
        counts = prepare.prepare_demo(args.data, args.out, args.rows_per_file)
    else:
        mapping = {
            "id_column": args.id_column,
            "prompt_column": args.prompt_column,
            "response_column": args.response_column,
            "text_column": args.text_column,
            "encoder_text_column": args.encoder_text_column,
            "label_column": args.label_column,
        }
        counts = prepare.prepare_generic(args.input, args.out, mapping, args.rows_per_file)
    print(json.dumps(counts, indent=2))
    print(f"corpora written under {args.out}")
    return 0


def _run_stages(args: argparse.Namespace, stages: list[str]) -> int:
    from pipeline.artifacts import run_stage
    from pipeline.config import load_job
    from pipeline.preflight import preflight

    job = load_job(args.job, args.overrides)
    preflight(job, stages)  # paths, columns, resources: fail before any Ray work
    summary = []
    for stage in stages:
        t0 = time.perf_counter()
        manifest = run_stage(job, stage, overwrite=args.overwrite)
        summary.append((stage, time.perf_counter() - t0, manifest))
    _print_summary(job, summary)
    return 0


def _print_summary(job, summary) -> None:
    from pipeline import storage

    print(f"\nrun_dir: {storage.redact(job.run_dir)}")
    print(f"{'stage':<8} {'seconds':>8}  {'rows':<40} rejects")
    for stage, seconds, m in summary:
        rows = m.get("rows")
        rows_s = json.dumps(rows, separators=(",", ":")) if rows is not None else "-"
        rejects = (m.get("rejects") or {}).get("rows", 0)
        print(f"{stage:<8} {seconds:>8.1f}  {rows_s[:40]:<40} {rejects}")
    for _, _, m in summary:
        if m.get("headline"):
            print(f"\n{m['headline']}")


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.artifacts import status

    if not storage.exists(args.run_dir):
        raise UsageError(f"run directory {args.run_dir} does not exist; pass the run_dir of a job.")
    rows = status(args.run_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"run_dir: {storage.redact(args.run_dir)}")
    for r in rows:
        extra = ""
        if r["state"] == "done":
            extra = f"  finished {r['finished_utc']}  {r['seconds']} s  rows={json.dumps(r['rows'])}  rejects={r['rejects']}"
        print(f"  {r['stage']:<7} {r['state']}{extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    try:
        if args.command == "prepare":
            return _cmd_prepare(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "run":
            i, j = STAGES.index(args.from_stage), STAGES.index(args.to_stage)
            if i > j:
                raise UsageError(f"--from {args.from_stage} comes after --to {args.to_stage}.")
            return _run_stages(args, list(STAGES[i : j + 1]))
        return _run_stages(args, [args.command])
    except UsageError as e:
        print(f"influcoder: error: {e}", file=sys.stderr)
        return 2
    except InflucoderError as e:
        print(f"influcoder: stage failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("influcoder: interrupted; rerun the same command to resume (finished shards are kept).", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any other failure inside a stage
        log.exception("stage failed")
        print(f"influcoder: stage failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        _shutdown_ray()


def _shutdown_ray() -> None:
    if "pipeline.ray_runtime" in sys.modules:
        from pipeline.ray_runtime import shutdown_if_started

        shutdown_if_started()


if __name__ == "__main__":
    sys.exit(main())
