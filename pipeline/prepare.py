"""`influcoder prepare`: build Parquet corpora with the canonical columns.

Two uses:
- `--data ../shared/data --out data/demo`: the demo corpora from the shared public datasets
  (BBH with its chain-of-thought prompts, GSM8K, the T0 sample, ToxiGen statements) and the
  leak-free toxicity task of `jobs/demo.yaml` (`toxicity/{anchors,pool,corpus,queries}`).
- `--input FILE_OR_DIR --out DIR [column flags]`: any JSONL/Parquet source, mapped and validated
  with the same reader as the pipeline; bad rows go to `DIR/rejects.parquet` with their reason.

Output files: `part-00000.parquet`, ... with columns id, prompt, response, text, source, label
(+ group for ToxiGen). Rows are assigned to splits by a keyed hash of their id, so a split never
changes when other splits grow (prefix-stable, METHOD.md 4.4).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputDataError

log = logging.getLogger("influcoder")

OUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("response", pa.string()),
    pa.field("text", pa.string()),
    pa.field("source", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("group", pa.string()),
])


def hash_order_key(seed: int, key: str) -> int:
    """A keyed pseudo-random order: sorting by it is a seeded shuffle that is stable per row."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def write_parts(rows: list[dict[str, Any]], out_dir: str, rows_per_file: int = 10000) -> int:
    """Write rows as part-XXXXX.parquet files (atomic per directory: temp dir, then rename)."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i in range(0, max(len(rows), 1), rows_per_file):
        chunk = rows[i:i + rows_per_file]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in OUT_SCHEMA} for r in chunk], schema=OUT_SCHEMA)
        pq.write_table(table, os.path.join(tmp, f"part-{i // rows_per_file:05d}.parquet"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return len(rows)


# --------------------------------------------------------------------------- shared datasets


def _jsonl(path: str) -> Iterable[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def bbh_rows(data: str) -> list[dict[str, Any]]:
    """BBH anchors: teacher context = the task's CoT prompt + question; the encoder sees Q/A only."""
    rows = []
    for path in sorted(glob.glob(os.path.join(data, "bbh", "bbh", "*.json"))):
        task = os.path.splitext(os.path.basename(path))[0]
        cot_path = os.path.join(data, "bbh", "cot-prompts", f"{task}.txt")
        with open(cot_path, encoding="utf-8") as f:
            cot = "".join(f.readlines()[2:]).strip()  # the first 2 lines are a canary header
        with open(path, encoding="utf-8") as f:
            examples = json.load(f)["examples"]
        for i, ex in enumerate(examples):
            rows.append({
                "id": f"bbh/{task}/{i}",
                "prompt": f"{cot}\n\nQ: {ex['input']}\nA:",
                "response": " " + ex["target"],
                # The CoT prompt is constant per task and would fill the encoder window (METHOD.md 1c).
                "text": f"Q: {ex['input']}\nA: {ex['target']}",
                "source": f"bbh/{task}",
            })
    return rows


def gsm8k_rows(data: str, split: str = "train") -> list[dict[str, Any]]:
    return [
        {"id": f"gsm8k/{split}/{i}", "prompt": r["question"], "response": r["answer"],
         "text": f"{r['question']}\n{r['answer']}", "source": f"gsm8k/{split}"}
        for i, r in enumerate(_jsonl(os.path.join(data, "gsm8k", f"{split}.jsonl")))
    ]


def t0_rows(data: str) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(_jsonl(os.path.join(data, "t0", "t0_train_50k.jsonl"))):
        completion = r["completion"].replace("<|endoftext|>", "").strip()  # a GPT-2 artefact in the dump
        if not completion:
            continue
        rows.append({"id": f"t0/{i}", "prompt": r["prompt"], "response": completion,
                     "text": f"{r['prompt']}\n{completion}", "source": f"t0/{r['template']}"})
    return rows


def toxigen_rows(data: str) -> list[dict[str, Any]]:
    return [
        {"id": f"toxigen/{i}", "prompt": "", "response": r["text"], "text": r["text"],
         "source": f"toxigen/{r['group']}", "label": 1 if r["label"] == "hate" else 0, "group": r["group"]}
        for i, r in enumerate(_jsonl(os.path.join(data, "toxigen", "toxigen_statements.jsonl")))
    ]


# --------------------------------------------------------------------------- the demo task


@dataclass(frozen=True)
class ToxicitySplit:
    """Sizes of the leak-free toxicity task. Hate statements are split four ways (distillation
    anchors, distillation pool, queries, corpus needles) and never shared between roles;
    instruction rows and neutral statements are split between the distillation pool and the corpus."""

    anchor_hate: int = 72
    pool_hate: int = 40
    pool_neutral: int = 40
    pool_instructions: int = 240
    query_hate: int = 16
    corpus_hate: int = 48
    corpus_neutral: int = 96
    corpus_instructions: int = 456
    seed: int = 42


def _dedupe_texts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first row of each normalised text: T0 repeats texts across templates, and a text in
    two roles (distillation pool and evaluation corpus) would be a leak."""
    seen: set[str] = set()
    out = []
    for r in rows:
        key = r["text"].strip().lower()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def toxicity_task(data: str, split: ToxicitySplit) -> dict[str, list[dict[str, Any]]]:
    tox = _dedupe_texts(toxigen_rows(data))
    hate = sorted((r for r in tox if r["label"] == 1), key=lambda r: hash_order_key(split.seed, r["id"]))
    neutral = sorted((r for r in tox if r["label"] == 0), key=lambda r: hash_order_key(split.seed, r["id"]))
    instr = t0_rows(data) + gsm8k_rows(data, "train")
    instr = _dedupe_texts(sorted(instr, key=lambda r: hash_order_key(split.seed, r["id"])))
    need_hate = split.anchor_hate + split.pool_hate + split.query_hate + split.corpus_hate
    need_neutral = split.pool_neutral + split.corpus_neutral
    if need_hate > len(hate) or need_neutral > len(neutral):
        raise InputDataError(f"toxicity task needs {need_hate} hate and {need_neutral} neutral statements; "
                             f"ToxiGen has {len(hate)} and {len(neutral)}.")

    def take(rows: list[dict[str, Any]], start: int, n: int, label: int | None = None) -> list[dict[str, Any]]:
        out = [dict(r) for r in rows[start:start + n]]
        if label is not None:
            for r in out:
                r["label"] = label
        return out

    h = [0]

    def take_hate(n: int) -> list[dict[str, Any]]:
        out = take(hate, h[0], n)
        h[0] += n
        return out

    # Query and corpus slices come first so that resizing the distillation side never moves them.
    queries = take_hate(split.query_hate)
    corpus_hate = take_hate(split.corpus_hate)
    anchors = take_hate(split.anchor_hate)
    pool_hate = take_hate(split.pool_hate)
    corpus_neutral = take(neutral, 0, split.corpus_neutral)
    pool_neutral = take(neutral, split.corpus_neutral, split.pool_neutral)
    corpus_instr = take(instr, 0, split.corpus_instructions, label=0)
    pool_instr = take(instr, split.corpus_instructions, split.pool_instructions, label=0)
    corpus = sorted(corpus_hate + corpus_neutral + corpus_instr, key=lambda r: hash_order_key(split.seed + 1, r["id"]))
    pool = sorted(pool_hate + pool_neutral + pool_instr, key=lambda r: hash_order_key(split.seed + 1, r["id"]))
    _assert_disjoint({"queries": queries, "corpus": corpus, "anchors": anchors, "pool": pool})
    return {"anchors": anchors, "pool": pool, "corpus": corpus, "queries": queries}


def _assert_disjoint(parts: dict[str, list[dict[str, Any]]]) -> None:
    """Leak check: no id and no text appears in two roles."""
    seen_ids: dict[str, str] = {}
    seen_text: dict[str, str] = {}
    for role, rows in parts.items():
        for r in rows:
            for key, seen in ((r["id"], seen_ids), (r["text"].strip().lower(), seen_text)):
                if key in seen and seen[key] != role:
                    raise InputDataError(f"leak: {key[:60]!r} is in both {seen[key]} and {role}")
                seen[key] = role


def prepare_demo(data: str, out: str, rows_per_file: int = 10000) -> dict[str, int]:
    if not os.path.isdir(os.path.join(data, "toxigen")):
        raise InputDataError(f"--data {data}: not the shared data folder (expected bbh/, gsm8k/, t0/, toxigen/ in it).")
    counts = {
        "bbh": write_parts(bbh_rows(data), os.path.join(out, "bbh"), rows_per_file),
        "gsm8k": write_parts(gsm8k_rows(data, "train") + gsm8k_rows(data, "test"), os.path.join(out, "gsm8k"), rows_per_file),
        "t0": write_parts(t0_rows(data), os.path.join(out, "t0"), rows_per_file),
        "toxigen": write_parts(toxigen_rows(data), os.path.join(out, "toxigen"), rows_per_file),
    }
    for role, rows in toxicity_task(data, ToxicitySplit()).items():
        counts[f"toxicity/{role}"] = write_parts(rows, os.path.join(out, "toxicity", role), rows_per_file)
    with open(os.path.join(out, "PREPARED.json"), "w") as f:
        json.dump({"data": os.path.abspath(data), "counts": counts}, f, indent=2)
    return counts


def prepare_generic(input_path: str, out: str, mapping: dict[str, Any], rows_per_file: int = 10000) -> dict[str, int]:
    """Any JSONL/Parquet source → canonical Parquet parts (+ rejects.parquet with reasons)."""
    from pipeline import corpus
    from pipeline.config import DatasetConfig

    cfg = DatasetConfig(path=input_path, **{k: v for k, v in mapping.items() if v is not None})
    files = corpus.discover(cfg, "input")
    good_rows: list[dict[str, Any]] = []
    reject_tables = []
    seen: set[str] = set()
    for f in files:
        for batch in corpus.iter_file(f, cfg):
            good, bad = corpus.split_rejects(batch)
            reject_tables.append(bad)
            for r in good.to_pylist():
                if r["id"] in seen:
                    reject_tables.append(pa.table({"source": [r["source"]], "row": [r["row"]], "id": [r["id"]],
                                                   "reason": [f"duplicate_id: {r['id']} appears earlier"]}))
                    continue
                seen.add(r["id"])
                good_rows.append(r)
    n = write_parts(good_rows, out, rows_per_file)
    rejects = pa.concat_tables(reject_tables) if reject_tables else None
    n_bad = rejects.num_rows if rejects is not None else 0
    if n_bad:
        pq.write_table(rejects, os.path.join(out, "_rejects.parquet"))
    return {"rows": n, "rejected": n_bad}
