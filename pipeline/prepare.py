"""`influcoder prepare`: build Parquet corpora with the canonical columns.

Two uses:
- `--data ../shared/data --out data/demo`: the demo corpora from the shared public datasets
  (BBH with its chain-of-thought prompts, GSM8K, the T0 sample, ToxiGen statements), the
  leak-free toxicity task of `jobs/demo.yaml` (`toxicity/{anchors,pool,corpus,queries}`) and its
  group-disjoint twin of `jobs/demo_groups.yaml` (`toxicity_groups/`), each with a near-duplicate
  audit (`prepare_audit.json`: what was dropped, per role pair, and what is left).
- `--input FILE_OR_DIR --out DIR [column flags]`: any JSONL/Parquet source, mapped and validated
  with the same reader as the pipeline; bad rows go to `DIR/_rejects.parquet` with their reason. It
  refuses (exit 2) output that cannot serve a job: no rows, every label null, unmappable labels.

Output files: `part-00000.parquet`, ... with columns id, prompt, response, text, source, label
(+ group for ToxiGen). Rows are assigned to splits by a keyed hash of their id, so a split never
changes when other splits grow (prefix-stable, METHOD.md 4.4).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import neardup
from pipeline.errors import ConfigError, InputDataError
from pipeline.sampling import order_key

log = logging.getLogger("influcoder")

OUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("response", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("group", pa.string()),
    ]
)


def hash_order_key(seed: int, key: str) -> int:
    """The seeded order prepare draws its roles from: its own stream, so that it is independent of the
    sketch stage's eval/train split drawn with the same seed (see `sampling.order_key`)."""
    return order_key(seed, key, stream="prepare")


def write_parts(rows: list[dict[str, Any]], out_dir: str, rows_per_file: int = 10000) -> int:
    """Write rows as part-XXXXX.parquet files (atomic per directory: temp dir, then rename).

    An output that already holds the same bytes is left as it is: stages identify their input files
    by size and modification time, so rewriting identical files would make a rerun of `make demo`
    (which prepares first) recompute every finished stage."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i in range(0, max(len(rows), 1), rows_per_file):
        chunk = rows[i : i + rows_per_file]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in OUT_SCHEMA} for r in chunk], schema=OUT_SCHEMA)
        pq.write_table(table, os.path.join(tmp, f"part-{i // rows_per_file:05d}.parquet"))
    if _same_files(tmp, out_dir):
        shutil.rmtree(tmp)
        return len(rows)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return len(rows)


def _same_files(a: str, b: str) -> bool:
    """Whether two folders hold the same file names with the same bytes."""
    import filecmp

    names = sorted(os.listdir(a))
    if not os.path.isdir(b) or names != sorted(os.listdir(b)):
        return False
    match, _, _ = filecmp.cmpfiles(a, b, names, shallow=False)
    return len(match) == len(names)


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
            rows.append(
                {
                    "id": f"bbh/{task}/{i}",
                    "prompt": f"{cot}\n\nQ: {ex['input']}\nA:",
                    "response": " " + ex["target"],
                    # The CoT prompt is constant per task and would fill the encoder window (METHOD.md 1c).
                    "text": f"Q: {ex['input']}\nA: {ex['target']}",
                    "source": f"bbh/{task}",
                }
            )
    return rows


def gsm8k_rows(data: str, split: str = "train") -> list[dict[str, Any]]:
    return [
        {
            "id": f"gsm8k/{split}/{i}",
            "prompt": r["question"],
            "response": r["answer"],
            "text": f"{r['question']}\n{r['answer']}",
            "source": f"gsm8k/{split}",
        }
        for i, r in enumerate(_jsonl(os.path.join(data, "gsm8k", f"{split}.jsonl")))
    ]


def t0_rows(data: str) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(_jsonl(os.path.join(data, "t0", "t0_train_50k.jsonl"))):
        completion = r["completion"].replace("<|endoftext|>", "").strip()  # a GPT-2 artefact in the dump
        if not completion:
            continue
        rows.append(
            {
                "id": f"t0/{i}",
                "prompt": r["prompt"],
                "response": completion,
                "text": f"{r['prompt']}\n{completion}",
                "source": f"t0/{r['template']}",
            }
        )
    return rows


def toxigen_rows(data: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"toxigen/{i}",
            "prompt": "",
            "response": r["text"],
            "text": r["text"],
            "source": f"toxigen/{r['group']}",
            "label": 1 if r["label"] == "hate" else 0,
            "group": r["group"],
        }
        for i, r in enumerate(_jsonl(os.path.join(data, "toxigen", "toxigen_statements.jsonl")))
    ]


# --------------------------------------------------------------------------- the demo task

# Roles in the order they are drawn, which is also the order in which they keep their rows: a row that
# near-duplicates a row of an earlier role is dropped and replaced from the remaining supply. Evaluation
# roles come first, so they never lose a row to distillation data, and resizing the distillation side
# never moves them (prefix-stable).
ROLE_PRIORITY = ("queries", "corpus", "anchors", "pool")
# The sketch stage splits anchors and pool again, into its own held-out and train parts, by a keyed hash:
# two near-duplicates inside one of these roles could straddle that boundary, so they are dropped too.
# Near-duplicates inside the corpus or inside the queries are no leak (scored, never trained on): kept.
DISTILL_ROLES = ("anchors", "pool")
AUDIT_FILE = "prepare_audit.json"

_Roles = dict[str, list[dict[str, Any]]]
_SigCache = dict[tuple[int, str], neardup.Signature]


@dataclass(frozen=True)
class ToxicitySplit:
    """Sizes of the leak-free toxicity task. Hate statements are split four ways (distillation
    anchors, distillation pool, queries, corpus needles) and never shared between roles;
    instruction rows and neutral statements are split between the distillation pool and the corpus.
    The demo's sketch holds out 32 anchors x 256 pool rows and trains on 64 x 256 (jobs/demo.yaml)."""

    anchor_hate: int = 96
    pool_hate: int = 64
    pool_neutral: int = 64
    pool_instructions: int = 384
    query_hate: int = 16
    corpus_hate: int = 48
    corpus_neutral: int = 96
    corpus_instructions: int = 456
    seed: int = 42
    near_dup_threshold: float = neardup.THRESHOLD

    def toxigen_needs(self) -> dict[tuple[str, int], int]:
        """Statements needed per (side, label): distillation side (anchors, pool), evaluation side."""
        return {
            ("distillation", 1): self.anchor_hate + self.pool_hate,
            ("distillation", 0): self.pool_neutral,
            ("evaluation", 1): self.query_hate + self.corpus_hate,
            ("evaluation", 0): self.corpus_neutral,
        }


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


@dataclass
class _Supplies:
    """The candidate rows of each kind, each list in its seeded order (exact duplicates removed)."""

    hate: list[dict[str, Any]]
    neutral: list[dict[str, Any]]
    instructions: list[dict[str, Any]]


def _supplies(data: str, seed: int, t0: list[dict[str, Any]] | None = None) -> _Supplies:
    tox = _dedupe_texts(toxigen_rows(data))
    hate = sorted((r for r in tox if r["label"] == 1), key=lambda r: hash_order_key(seed, r["id"]))
    neutral = sorted((r for r in tox if r["label"] == 0), key=lambda r: hash_order_key(seed, r["id"]))
    instr = (t0_rows(data) if t0 is None else t0) + gsm8k_rows(data, "train")
    instr = _dedupe_texts(sorted(instr, key=lambda r: hash_order_key(seed, r["id"])))
    return _Supplies(hate, neutral, instr)


class _SupplyShort(InputDataError):
    """A role could not be filled: the supply ran out (after near-duplicates were dropped)."""


class _Drawer:
    """Draws each role's rows from the seeded supplies, in ROLE_PRIORITY order, dropping every candidate
    that near-duplicates an already drawn row of an earlier role (or, for a distillation role, of its own)."""

    def __init__(self, split: ToxicitySplit, cache: _SigCache):
        self.index = neardup.NearDupIndex(threshold=split.near_dup_threshold, seed=split.seed)
        # (seed, text) -> signature: a text is hashed once across the demo's tasks and group-split tries
        # (a signature is only comparable under the seed that drew its permutations).
        self.cache = cache
        self.role_of: dict[str, str] = {}
        self.dropped: Counter[str] = Counter()
        self.dropped_by_pair: Counter[str] = Counter()

    def _signature(self, text: str) -> neardup.Signature:
        key = (self.index.seed, text)
        if key not in self.cache:
            self.cache[key] = self.index.signature(text)
        return self.cache[key]

    def take(
        self, role: str, supply: Iterator[dict[str, Any]], n: int, what: str, label: int | None = None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:  # pull only what is needed: the next role takes the rest of a shared cursor
            r = next(supply, None)
            if r is None:
                break
            sig = self._signature(r["text"])
            clash = {self.role_of[k] for k, _ in self.index.matches(sig)}
            if role not in DISTILL_ROLES:
                clash.discard(role)
            if clash:
                self.dropped[role] += 1
                for other in clash:
                    self.dropped_by_pair[f"{role}~{other}"] += 1
                continue
            row = dict(r)
            if label is not None:
                row["label"] = label
            self.index.add(row["id"], sig)
            self.role_of[row["id"]] = role
            out.append(row)
        if len(out) < n:
            raise _SupplyShort(
                f"toxicity task: {role} needs {n} {what} but only {len(out)} are left after the "
                f"roles before it and after dropping near-duplicates (Jaccard >= "
                f"{self.index.threshold}); lower the sizes in pipeline/prepare.py ToxicitySplit."
            )
        return out

    def near_duplicate_pairs(self) -> dict[str, int]:
        """Near-duplicate row pairs left between (and within) the drawn roles, per role pair."""
        pairs: Counter[str] = Counter(
            {_pair_key(a, b): 0 for i, a in enumerate(ROLE_PRIORITY) for b in ROLE_PRIORITY[i:]}
        )
        for key, role in self.role_of.items():
            for other, _ in self.index.matches_of(key):
                if key < other:  # each unordered pair once
                    pairs[_pair_key(role, self.role_of[other])] += 1
        return dict(pairs)


def _pair_key(a: str, b: str) -> str:
    a, b = sorted((a, b), key=ROLE_PRIORITY.index)
    return f"{a}~{b}"


def _build_task(
    sup: _Supplies, split: ToxicitySplit, cache: _SigCache, distill_groups: frozenset[str] | None = None
) -> tuple[_Roles, dict[str, Any]]:
    """The four roles and their audit. With `distill_groups`, anchors and pool statements come only from
    those ToxiGen target groups and queries and corpus statements only from the others."""

    def side(rows: list[dict[str, Any]], distillation: bool) -> list[dict[str, Any]]:
        if distill_groups is None:
            return rows
        return [r for r in rows if (r["group"] in distill_groups) == distillation]

    if distill_groups is None:  # one shared cursor per kind: roles take consecutive slices of the seeded order
        hate_e = hate_d = iter(sup.hate)
        neutral_e = neutral_d = iter(sup.neutral)
    else:
        hate_e, hate_d = iter(side(sup.hate, False)), iter(side(sup.hate, True))
        neutral_e, neutral_d = iter(side(sup.neutral, False)), iter(side(sup.neutral, True))
    instr = iter(sup.instructions)
    d = _Drawer(split, cache)
    queries = d.take("queries", hate_e, split.query_hate, "hate statements")
    corpus = (
        d.take("corpus", hate_e, split.corpus_hate, "hate statements")
        + d.take("corpus", neutral_e, split.corpus_neutral, "neutral statements")
        + d.take("corpus", instr, split.corpus_instructions, "instruction rows", label=0)
    )
    anchors = d.take("anchors", hate_d, split.anchor_hate, "hate statements")
    pool = (
        d.take("pool", hate_d, split.pool_hate, "hate statements")
        + d.take("pool", neutral_d, split.pool_neutral, "neutral statements")
        + d.take("pool", instr, split.pool_instructions, "instruction rows", label=0)
    )
    corpus = sorted(corpus, key=lambda r: hash_order_key(split.seed + 1, r["id"]))
    pool = sorted(pool, key=lambda r: hash_order_key(split.seed + 1, r["id"]))
    roles = {"anchors": anchors, "pool": pool, "corpus": corpus, "queries": queries}
    _assert_disjoint(roles)
    audit = {
        "counts": {role: len(rows) for role, rows in roles.items()},
        "sizes": {k: v for k, v in asdict(split).items() if k not in ("seed", "near_dup_threshold")},
        "near_duplicates": {
            "method": "MinHash LSH candidates (datasketch), every candidate checked by exact Jaccard",
            "shingles": f"character {neardup.SHINGLE_CHARS}-grams of the lowercased text, punctuation folded",
            "threshold": split.near_dup_threshold,
            "num_perm": d.index.num_perm,
            "lsh_bands_rows": list(d.index.bands),
            "seed": split.seed,
            "datasketch": _version("datasketch"),
        },
        "priority": list(ROLE_PRIORITY),
        "dropped": {role: d.dropped[role] for role in ROLE_PRIORITY},
        "dropped_by_pair": dict(sorted(d.dropped_by_pair.items())),
        "near_duplicate_pairs_left": d.near_duplicate_pairs(),
    }
    return roles, audit


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def toxicity_task(data: str, split: ToxicitySplit) -> _Roles:
    """The demo task's four roles, disjoint by id and text and free of near-duplicates across roles."""
    return _build_task(_supplies(data, split.seed), split, {})[0]


def _group_task(sup: _Supplies, split: ToxicitySplit, cache: _SigCache) -> tuple[_Roles, dict[str, Any]]:
    """The group-disjoint variant: ToxiGen target groups split in two, distillation on one set, evaluation
    on the other. The split is a seeded draw among the two-way splits of the groups whose statements can
    fill every role; when none can, the ToxiGen counts shrink in eighths (recorded in the audit)."""
    groups = sorted({r["group"] for r in sup.hate + sup.neutral})
    if not 2 <= len(groups) <= 16:  # every two-way split is enumerated: ToxiGen has 13 groups at most
        raise InputDataError(f"toxigen: the group-disjoint task needs 2..16 target groups, found {len(groups)}.")
    have = Counter((r["group"], r["label"]) for r in sup.hate + sup.neutral)
    splits = [frozenset(g for i, g in enumerate(groups) if mask >> i & 1) for mask in range(1, 2 ** len(groups) - 1)]
    splits.sort(key=lambda dg: hash_order_key(split.seed, ",".join(sorted(dg))))
    for eighths in range(8, 0, -1):
        sized = (
            split
            if eighths == 8
            else replace(
                split,
                **{
                    k: max(1, getattr(split, k) * eighths // 8)
                    for k in ("anchor_hate", "pool_hate", "pool_neutral", "query_hate", "corpus_hate", "corpus_neutral")
                },
            )
        )
        candidates = [dg for dg in splits if _groups_fit(have, dg, sized.toxigen_needs())]
        for tried, dg in enumerate(candidates, 1):
            try:
                roles, audit = _build_task(sup, sized, cache, distill_groups=dg)
            except _SupplyShort:
                continue
            audit["groups"] = {
                "distillation": sorted(dg),
                "evaluation": sorted(set(groups) - dg),
                "seed": split.seed,
                "rule": "first, in seeded order, of the two-way group splits whose statements fill every role",
                "splits_with_enough_statements": len(candidates),
                "splits_tried": tried,
                "scaled_to_eighths": eighths,
            }
            return roles, audit
    raise InputDataError("toxigen: no split of the target groups supplies even 1/8 of the toxicity task's sizes.")


def _groups_fit(
    have: Counter[tuple[str, int]], distill_groups: frozenset[str], needs: dict[tuple[str, int], int]
) -> bool:
    """Whether the raw supply (before near-duplicates are dropped) of each side covers its needs."""
    return all(
        sum(n for (g, lab), n in have.items() if lab == label and (g in distill_groups) == (s == "distillation"))
        >= need
        for (s, label), need in needs.items()
    )


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


def _audit_line(name: str, audit: dict[str, Any]) -> str:
    nd = audit["near_duplicates"]
    across = sum(
        n
        for pair, n in audit["near_duplicate_pairs_left"].items()
        if pair.split("~")[0] != pair.split("~")[1] or pair.split("~")[0] in DISTILL_ROLES
    )
    by_pair = ", ".join(f"{k} {v}" for k, v in audit["dropped_by_pair"].items()) or "none"
    line = (
        f"{name}: "
        + ", ".join(f"{r} {audit['counts'][r]}" for r in ROLE_PRIORITY)
        + f"; near-duplicates (Jaccard >= {nd['threshold']}, char {neardup.SHINGLE_CHARS}-grams) dropped: "
        + ", ".join(f"{r} {audit['dropped'][r]}" for r in ROLE_PRIORITY if r != "queries")
        + f" (by pair: {by_pair}); left across roles: {across}"
    )
    if "groups" in audit:
        g = audit["groups"]
        line += (
            f"\n{name}: distillation groups {','.join(g['distillation'])} | evaluation groups "
            f"{','.join(g['evaluation'])} (sizes at {g['scaled_to_eighths']}/8)"
        )
    return line


def prepare_demo(data: str, out: str, rows_per_file: int = 10000) -> dict[str, int]:
    if not os.path.isdir(os.path.join(data, "toxigen")):
        raise InputDataError(f"--data {data}: not the shared data folder (expected bbh/, gsm8k/, t0/, toxigen/ in it).")
    t0 = t0_rows(data)
    counts = {
        "bbh": write_parts(bbh_rows(data), os.path.join(out, "bbh"), rows_per_file),
        "gsm8k": write_parts(
            gsm8k_rows(data, "train") + gsm8k_rows(data, "test"), os.path.join(out, "gsm8k"), rows_per_file
        ),
        "t0": write_parts(t0, os.path.join(out, "t0"), rows_per_file),
        "toxigen": write_parts(toxigen_rows(data), os.path.join(out, "toxigen"), rows_per_file),
    }
    split = ToxicitySplit()
    sup = _supplies(data, split.seed, t0)
    cache: _SigCache = {}
    audits = {}
    for name, (roles, audit) in (
        ("toxicity", _build_task(sup, split, cache)),
        ("toxicity_groups", _group_task(sup, split, cache)),
    ):
        for role, rows in roles.items():
            counts[f"{name}/{role}"] = write_parts(rows, os.path.join(out, name, role), rows_per_file)
        path = os.path.join(out, name, AUDIT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"task": name, **audit}, f, indent=2)
        os.replace(path + ".tmp", path)
        audits[name] = path
        print(_audit_line(name, audit) + f"\n  audit: {path}")
    with open(os.path.join(out, "PREPARED.json"), "w") as f:
        json.dump({"data": os.path.abspath(data), "counts": counts, "audits": audits}, f, indent=2)
    return counts


# --------------------------------------------------------------------------- any source (--input)

# The flag of each mapping key: prepare's errors name what the user typed, not the job key.
FLAGS = {
    "path": "--input",
    "id_column": "--id-column",
    "prompt_column": "--prompt-column",
    "response_column": "--response-column",
    "text_column": "--text-column",
    "encoder_text_column": "--encoder-text-column",
    "label_column": "--label-column",
}
REJECTS_NAME = "_rejects.parquet"  # leading underscore: readers skip it, so `out` stays a clean dataset
_TRUE, _FALSE = ("1", "true"), ("0", "false")
_POSITIVE_WORDS = {"yes", "y", "positive", "pos", "target", "relevant", "hate", "toxic", "unsafe", "bad"}


def _as_flags(message: str) -> str:
    """Rewrite the shared reader's job keys (`input.label_column`) into prepare's flags (`--label-column`)."""
    for key, flag in FLAGS.items():
        message = re.sub(rf"`?input\.{key}`?", flag, message)
    return re.sub(r"^input: ", "", message)


def _check_flags(input_path: str, mapping: dict[str, Any]) -> None:
    if not input_path or not input_path.strip():
        raise ConfigError("--input: got an empty path; give a JSONL/Parquet file, directory, glob or URI.")
    both = [k for k in ("prompt_column", "response_column") if mapping.get(k)]
    if mapping.get("text_column") and both:
        given = " and ".join(f"{FLAGS[k]} {mapping[k]}" for k in both)
        raise ConfigError(
            f"--text-column {mapping['text_column']} and {given} are both given: --text-column replaces the "
            f"prompt/response pair (the whole text becomes the loss span), so the response would be dropped. "
            f"Drop --text-column to keep the pair, or drop {' and '.join(FLAGS[k] for k in both)} to use the "
            f"single text column."
        )
    if mapping.get("positive_label") is not None and not mapping.get("label_column"):
        raise ConfigError("--positive-label needs --label-column (the column whose values it maps).")


def _iter_raw(file: Any, col: str) -> Iterator[tuple[int, Any, bool]]:
    """(row, raw value, key present) of one column, numbered like the reader numbers rows (`corpus.iter_file`:
    Parquet row index, JSONL 0-based line number); unparseable JSONL lines are skipped (the reader rejects them)."""
    from pipeline import storage

    fs, path = storage.filesystem(file.path)
    if file.format == "parquet":
        partitions = dict(file.partitions)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if col in partitions:
                values, present = [partitions[col]] * pf.metadata.num_rows, True
            elif col in pf.schema_arrow.names:
                values, present = pf.read(columns=[col]).column(col).to_pylist(), True
            else:
                values, present = [None] * pf.metadata.num_rows, False
        for row, v in enumerate(values):
            yield row, v, present
        return
    from pipeline.corpus import iter_lines

    for row, line in enumerate(iter_lines(fs, path)):
        yield from _raw_value(line, row, col)


def _raw_value(line: bytes, row: int, col: str) -> Iterator[tuple[int, Any, bool]]:
    try:
        record = json.loads(line.decode("utf-8")) if line.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(record, dict):
        yield row, record.get(col), col in record


def _label_mapper(values: Counter, col: str, positive: str | None) -> Callable[[Any], int | None]:
    """How raw label values become the output's integer labels (1 = a row to find), or refuse with the
    values seen and how to map them. `values` counts the non-null raw values (by repr)."""
    if positive is not None:
        want = positive.strip().lower()
        if want not in {str(v).strip().lower() for v in values.elements()}:
            raise InputDataError(
                f"--positive-label {positive!r}: no row of --label-column `{col}` holds it; its values are "
                f"{_top(values)}."
            )
        return lambda v: None if v is None else int(str(v).strip().lower() == want)

    def plain(v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            return int(v.strip().lower() in _TRUE)
        raise ValueError(v)

    bad = Counter()
    for v, n in values.items():
        try:
            plain(v)
        except (ValueError, TypeError):
            bad[v] = n
    if bad:
        # The example is a likely positive: a word that usually means one, else the rarest value.
        likely = [v for v in bad if str(v).strip().lower() in _POSITIVE_WORDS]
        example = likely[0] if likely else min(bad, key=lambda v: bad[v])
        raise InputDataError(
            f"--label-column `{col}` holds values that are not integers, booleans or 0/1/true/false strings: "
            f"{_top(bad)}. Say which value marks a row to find, e.g. --positive-label {example} (that value "
            f"becomes 1, every other value 0, missing stays unlabelled)."
        )
    return plain


def _top(counts: Counter, n: int = 6) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{v!r} ({c})" for v, c in items[:n])
    return shown + (f", and {len(items) - n} more" if len(items) > n else "")


def _raw_labels(files: list, col: str) -> tuple[dict[tuple[str, int], Any], Counter, list[str]]:
    """(source, row) -> raw label, the counts of non-null values, and the columns seen when no file has `col`."""
    raw: dict[tuple[str, int], Any] = {}
    values: Counter = Counter()
    found = False
    for f in files:
        for row, v, present in _iter_raw(f, col):
            found = found or present
            if v is not None:
                raw[(f.path, row)] = v
                values[v if isinstance(v, (str, int, float, bool)) else repr(v)] += 1
    return raw, values, ([] if found else _columns_of(files))


def _columns_of(files: list) -> list[str]:
    """The columns of the first file (Parquet schema, keys of the first JSONL records), for messages."""
    from pipeline import storage

    f = files[0]
    fs, path = storage.filesystem(f.path)
    if f.format == "parquet":
        with fs.open_input_file(path) as fh:
            return list(pq.ParquetFile(fh).schema_arrow.names) + [k for k, _ in f.partitions]
    keys: set[str] = set()
    for _, record in zip(range(200), _records(fs, path)):
        keys.update(record)
    return sorted(keys) + [k for k, _ in f.partitions]


def _records(fs: Any, path: str) -> Iterator[dict[str, Any]]:
    with fs.open_input_stream(path) as f:
        for line in f.read(1 << 20).split(b"\n"):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                yield record


def _reasons(rejects: pa.Table | None) -> dict[str, int]:
    counts: Counter = Counter()
    if rejects is not None:
        counts.update(r.split(":")[0] for r in rejects.column("reason").to_pylist())
    return dict(counts.most_common())


def _reason_examples(rejects: pa.Table) -> str:
    first: dict[str, str] = {}
    for r in rejects.to_pylist():
        first.setdefault(r["reason"].split(":")[0], f"{r['source']} row {r['row']}: {r['reason']}")
    counts = _reasons(rejects)
    return "; ".join(f"{n} {key} (e.g. {first[key]})" for key, n in counts.items())


def prepare_generic(
    input_path: str,
    out: str,
    mapping: dict[str, Any],
    rows_per_file: int = 10000,
) -> dict[str, Any]:
    """Any JSONL/Parquet source → canonical Parquet parts (+ `_rejects.parquet` with reasons).

    Refuses (InputDataError, exit 2) what cannot serve a job: no row left, a label column whose every
    value is null, labels that are neither integers, booleans nor 0/1/true/false strings (unless
    `positive_label` says which value is a positive). Errors name the command's flags."""
    from pipeline import corpus
    from pipeline.config import DatasetConfig
    from pipeline.errors import UsageError

    mapping = dict(mapping)
    positive = mapping.pop("positive_label", None)
    _check_flags(input_path, {**mapping, "positive_label": positive})
    label_col = mapping.pop("label_column", None)
    try:
        # Labels are mapped here (string labels are common in raw data); the reader would reject them.
        cfg = DatasetConfig(path=input_path, **{k: v for k, v in mapping.items() if v is not None})
        files = corpus.discover(cfg, "input")
    except UsageError as e:
        raise type(e)(_as_flags(str(e))) from None
    label_of: Callable[[Any], int | None] | None = None
    raw: dict[tuple[str, int], Any] = {}
    if label_col:
        raw, values, columns = _raw_labels(files, label_col)
        if columns:
            raise InputDataError(
                f"--label-column `{label_col}` is not a column of {input_path}; it has columns {columns}."
                f"{corpus._close(label_col, columns)} Set --label-column to one of them."
            )
        label_of = _label_mapper(values, label_col, positive)
    good_rows: list[dict[str, Any]] = []
    reject_tables = []
    seen: set[str] = set()
    for f in files:
        for batch in corpus.iter_file(f, cfg):
            good, bad = corpus.split_rejects(batch)
            reject_tables.append(bad)
            for r in good.to_pylist():
                if r["id"] in seen:
                    reject_tables.append(
                        pa.table(
                            {
                                "source": [r["source"]],
                                "row": [r["row"]],
                                "id": [r["id"]],
                                "reason": [f"duplicate_id: {r['id']} appears earlier"],
                            }
                        )
                    )
                    continue
                seen.add(r["id"])
                if label_of is not None:
                    r["label"] = label_of(raw.get((r["source"], r["row"])))
                good_rows.append(r)
    rejects = pa.concat_tables(reject_tables) if reject_tables else None
    n_bad = rejects.num_rows if rejects is not None else 0
    if not good_rows:
        why = f"every one of its {n_bad} rows was rejected: {_reason_examples(rejects)}" if n_bad else "it has no rows"
        raise InputDataError(
            f"prepare: nothing to write from {input_path}: {why}. Fix the rows or the column flags; nothing was "
            f"written to {out}."
        )
    if label_col and all(r["label"] is None for r in good_rows):
        raise InputDataError(
            f"--label-column `{label_col}`: every one of the {len(good_rows)} rows has a null label, so eval could "
            f"not find a row to find; fill the column (1 = a row to find) or drop --label-column. Nothing was "
            f"written to {out}."
        )
    n = write_parts(good_rows, out, rows_per_file)
    rejects_path = os.path.join(out, REJECTS_NAME)
    if n_bad:
        pq.write_table(rejects, rejects_path)
    labels = Counter(r["label"] for r in good_rows) if label_col else None
    return {
        "rows": n,
        "rejected": n_bad,
        "rejects_by_reason": _reasons(rejects),
        "rejects_path": rejects_path if n_bad else None,
        "labels": {str(k): v for k, v in sorted(labels.items(), key=lambda kv: str(kv[0]))} if labels else None,
        "encoder_text": bool(mapping.get("encoder_text_column")),
    }


def job_snippet(out: str, result: dict[str, Any]) -> str:
    """The job keys that read prepare's output: paste under `corpus:` (or anchors, pool, score.queries).
    prompt_column `prompt` and response_column `response` are the defaults, so they are not repeated."""
    lines = [
        "corpus:   # or anchors / pool / score: {queries: ...}",
        f"  path: {os.path.abspath(out)}",
        "  id_column: id",
    ]
    if result.get("encoder_text"):
        lines.append("  encoder_text_column: text")
    if result.get("labels"):
        lines.append("  label_column: label")
    return "\n".join(lines)
