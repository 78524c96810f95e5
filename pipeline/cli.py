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

from pipeline import __version__
from pipeline.config import STAGES
from pipeline.errors import InflucoderError, UsageError

STAGE_HELP = {
    "sketch": "teacher: exact per-sample LoRA-gradient sketches of anchors and pool rows",
    "fit": "distil the sketches' influence rankings into the encoder (Ray Train)",
    "encode": "embed the whole corpus once into the LanceDB table `codes` (incremental)",
    "score": "rank every corpus row against the queries (exact, streamed) + per-query top-k",
    "filter": "write the curated corpus (minus the dropped rows, or only the kept ones) under run_dir/filter/corpus/",
    "eval": "fidelity to the gradients, AUPRC/recall, costs, baselines, and the report",
}

log = logging.getLogger("influcoder")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx", "matplotlib", "bm25s", "fsspec", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        # Ray's token authentication is on by design (README, security); its start-up notice that it
        # is on, and how to turn it off, is not news to the user.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: "Token authentication is enabled" not in record.getMessage()
        )


def _add_set_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE` (repeatable): the one way to override a job key from the command line."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML (see jobs/demo.yaml)")
    _add_set_arg(p, "override a job key by its dotted name, e.g. --set sketch.batch_size=4 (repeatable)")
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
    p.add_argument(
        "--positive-label",
        default=None,
        metavar="VALUE",
        help="with --label-column: the value that marks a row to find (label 1); every other value becomes 0",
    )

    p = sub.add_parser("run", help="run the stages of a job in order, skipping finished ones")
    _add_job_args(p)
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=STAGES[0], help="first stage to run")
    p.add_argument("--to", dest="to_stage", choices=STAGES, default=STAGES[-1], help="last stage to run")

    for stage in STAGES:
        _add_job_args(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))

    p = sub.add_parser(
        "status",
        help="show which stages of a job or run directory are done, and which are stale",
        description="Which stages are done, stale (run would recompute them: an upstream stage was recomputed "
        "since, or, given a job file, their config or inputs changed) or not run. Takes a job YAML (its run_dir, "
        "with --set overrides) or a run directory.",
    )
    p.add_argument("run_dir", metavar="JOB_OR_RUN_DIR", help="a job YAML, or the run_dir of a job")
    _add_set_arg(p, "with a job YAML: override a job key by its dotted name, as for `run` (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "show",
        help="a query's top hits with text snippets (from the score stage)",
        description="Per query: its top hits from score/topk.parquet with the row's text, score, label and, when "
        "the cascade ran, the teacher's score. Without --query, the first 10 queries.",
    )
    p.add_argument("run_dir", help="the run_dir of a job whose score stage has run")
    p.add_argument("--query", default=None, metavar="ID", help="only this query id")
    p.add_argument("--k", type=int, default=5, help="hits per query (at most score.top_k; default 5)")
    return parser


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline import prepare

    if args.data:
        counts = prepare.prepare_demo(args.data, args.out, args.rows_per_file)
        print(json.dumps(counts, indent=2))
        print(f"corpora written under {args.out}")
        return 0
    mapping = {
        "id_column": args.id_column,
        "prompt_column": args.prompt_column,
        "response_column": args.response_column,
        "text_column": args.text_column,
        "encoder_text_column": args.encoder_text_column,
        "label_column": args.label_column,
        "positive_label": args.positive_label,
    }
    res = prepare.prepare_generic(args.input, args.out, mapping, args.rows_per_file)
    print(f"{res['rows']} rows written to {args.out}" + (f" (labels: {res['labels']})" if res["labels"] else ""))
    if res["rejected"]:
        print(f"{res['rejected']} rows rejected ({res['rejects_by_reason']}): {res['rejects_path']}")
    else:
        print("no row rejected")
    print("\nJob keys that read this output (paste into your job YAML):\n" + prepare.job_snippet(args.out, res))
    return 0


def _run_stages(args: argparse.Namespace, stages: list[str]) -> int:
    from pipeline import api

    job = api.load(args.job, args.overrides)
    # One code path with the Python entry point: validation, refusal, preflight, stage runs.
    results = api.run(
        job, stages, overwrite=args.overwrite, rerun_hint=lambda first: _rerun_command(args, first, overwrite=True)
    )
    _print_summary(job, results)
    return 0


def _rows_text(rows) -> str:
    """A manifest's row counts as `key=value` pairs, whole (a summary that cuts them hides the total)."""
    if rows is None:
        return "-"
    if isinstance(rows, dict):
        return " ".join(f"{k}={_rows_text(v) if isinstance(v, dict) else v}" for k, v in rows.items())
    return str(rows)


def _print_summary(job, results: dict) -> None:
    from pipeline import storage

    print(f"\nrun_dir: {storage.redact(job.run_dir)}")
    print(f"{'stage':<8} {'state':<8} {'seconds':>8}  {'rejects':>7}  rows")
    for stage, r in results.items():
        m = r["manifest"]
        state = "skipped" if r.get("skipped") else "ran"
        seconds = "-" if r.get("skipped") else f"{r['seconds']:.1f}"
        rejects = (m.get("rejects") or {}).get("rows", 0)
        print(f"{stage:<8} {state:<8} {seconds:>8}  {rejects:>7}  {_rows_text(m.get('rows'))}")
    for r in results.values():
        if r["manifest"].get("headline"):
            print(f"\n{r['manifest']['headline']}")


def _rerun_command(args: argparse.Namespace, first: str, overwrite: bool) -> str:
    """The command that recomputes `first` and what depends on it, with the user's own --set flags."""
    import shlex

    from pipeline.config import STAGES as ALL

    cmd = getattr(args, "command", None) or "run"
    parts = ["influcoder", cmd, shlex.quote(args.job)]
    if parts[1] == "run":
        parts += ["--from", first]
        to = getattr(args, "to_stage", None)
        if to and to != ALL[-1]:
            parts += ["--to", to]
    for item in args.overrides:
        parts += ["--set", shlex.quote(item)]
    return " ".join(parts + (["--overwrite"] if overwrite else []))


def _status_target(args: argparse.Namespace):
    """(run_dir, job or None) from `status PATH`: a job YAML (resolved with --set) or a run directory."""
    import yaml

    from pipeline import storage
    from pipeline.artifacts import is_run_dir
    from pipeline.config import load_job

    path = args.run_dir
    if not storage.is_uri(path) and os.path.isfile(path):
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError):
            data = None
        has_run_dir = isinstance(data, dict) and (
            "run_dir" in data or any(o.startswith("run_dir=") for o in args.overrides)
        )
        if not has_run_dir:
            raise UsageError(
                f"{path} is neither a job file (a YAML mapping with run_dir) nor a run directory; "
                f"pass a job YAML or the run_dir of a job."
            )
        job = load_job(path, args.overrides)
        return job.run_dir, job
    if not storage.exists(path):
        raise UsageError(f"{path} does not exist; pass a job YAML or the run_dir of a job.")
    if not is_run_dir(path):
        raise UsageError(
            f"{path} is neither a job file nor a run directory (no <stage>/manifest.json, no .work/ inside); "
            f"pass a job YAML or the run_dir of a job."
        )
    if args.overrides:
        raise UsageError(f"--set applies to a job file; {path} is a run directory. Pass the job YAML instead.")
    return path, None


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.artifacts import status

    run_dir, job = _status_target(args)
    rows = status(run_dir, job)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"run_dir: {storage.redact(run_dir)}")
    for r in rows:
        extra = ""
        if r["state"] == "stale":
            extra = f"  ({r['why']})"
        if r["state"] in ("done", "stale"):
            counts = json.dumps(r["rows"])
            extra += f"  finished {r['finished_utc']}  {r['seconds']} s  rows={counts}  rejects={r['rejects']}"
        if r.get("inputs_unchecked"):
            extra += f"  inputs not checked: {r['inputs_unchecked']}"
        print(f"  {r['stage']:<7} {r['state']}{extra}")
    stale = [r for r in rows if r["state"] == "stale"]
    if stale:
        if job is not None:
            overwrite = any(r["changed"]["config"] for r in stale)
            as_run = argparse.Namespace(job=args.run_dir, overrides=args.overrides, command="run")
            print(f"\nbring them up to date: {_rerun_command(as_run, stale[0]['stage'], overwrite)}")
        else:
            print(f"\nbring them up to date: influcoder run JOB.yaml --from {stale[0]['stage']}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from pipeline import evidence

    if args.k < 1:
        raise UsageError(f"--k {args.k}: expected a number of hits >= 1.")
    print(evidence.to_text(evidence.load(args.run_dir, query=args.query, k=args.k)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    from pipeline.api import offline_defaults

    offline_defaults()
    try:
        if args.command == "prepare":
            return _cmd_prepare(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "show":
            return _cmd_show(args)
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
