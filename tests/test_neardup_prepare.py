"""Near-duplicate audit (pipeline/neardup.py), the demo's toxicity task and its group-disjoint twin
(`influcoder prepare --data`), and the eval stage's leakage counts. No Ray, no models."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import neardup, prepare
from pipeline.errors import InputDataError

REPO = Path(__file__).resolve().parents[1]
ROLES = ("anchors", "pool", "corpus", "queries")
STATEMENT = (
    "People who move here from other countries only want to live off welfare and never "
    "bother to learn the language or work"
)
UNRELATED = "Natalie bought three apples and two pears at the market, how many pieces of fruit did she buy"


def _one_word_changed(text: str, i: int, word: str) -> str:
    words = text.split()
    assert words[i] != word
    return " ".join(words[:i] + [word] + words[i + 1 :])


# --------------------------------------------------------------------------- neardup


def test_planted_near_duplicate_found_and_unrelated_not():
    index = neardup.NearDupIndex(seed=3)
    index.add("orig", STATEMENT)
    index.add("other", UNRELATED)
    planted = _one_word_changed(STATEMENT, 9, "rarely")
    hits = index.matches(planted)
    assert [k for k, _ in hits] == ["orig"]
    assert neardup.THRESHOLD <= hits[0][1] < 1.0
    assert index.matches("A completely different sentence about the weather in the mountains today") == []
    assert neardup.count_near_duplicates([planted, UNRELATED + " today"], [STATEMENT]) == 1


def test_exact_duplicates_and_normalisation():
    index = neardup.NearDupIndex()
    index.add(0, STATEMENT)
    assert index.matches(STATEMENT) == [(0, 1.0)]
    # Case, punctuation and whitespace do not hide a copy.
    assert index.matches("  " + STATEMENT.upper().replace(" ", " ,  ") + "!!") == [(0, 1.0)]
    assert index.matches("") == []
    with pytest.raises(KeyError):
        index.add(0, "again")


def test_threshold_respected():
    planted = _one_word_changed(_one_word_changed(STATEMENT, 3, "arrive"), 12, "speak")
    j = neardup.jaccard(neardup.shingles(STATEMENT), neardup.shingles(planted))
    assert 0.3 < j < 1.0
    for threshold, found in ((j, True), (j + 1e-6, False), (j - 0.05, True), (min(1.0, j + 0.05), False)):
        index = neardup.NearDupIndex(threshold=threshold)
        index.add("s", STATEMENT)
        assert bool(index.matches(planted)) is found, threshold
        assert neardup.is_near_duplicate(STATEMENT, planted, threshold) is found
    with pytest.raises(ValueError, match="threshold"):
        neardup.NearDupIndex(threshold=0.0)


def test_lsh_bands_give_high_recall_at_the_threshold():
    b, r = neardup.lsh_bands(neardup.THRESHOLD, neardup.NUM_PERM)
    assert b * r <= neardup.NUM_PERM
    assert 1 - (1 - neardup.THRESHOLD**r) ** b >= neardup.MIN_RECALL_AT_THRESHOLD
    # The next wider band would miss more pairs at the threshold.
    r2 = r + 1
    assert 1 - (1 - neardup.THRESHOLD**r2) ** (neardup.NUM_PERM // r2) < neardup.MIN_RECALL_AT_THRESHOLD


def _brute_force_pairs(
    texts_a: list[str], texts_b: list[str] | None = None, threshold: float = neardup.THRESHOLD
) -> set[tuple[int, int]]:
    """Exact Jaccard over all pairs (no sketching); sizes prune pairs that cannot reach the threshold."""
    sa = [neardup.shingles(t) for t in texts_a]
    sb = sa if texts_b is None else [neardup.shingles(t) for t in texts_b]
    out = set()
    for i, a in enumerate(sa):
        for j, b in enumerate(sb):
            if texts_b is None and j <= i:
                continue
            if (
                a
                and b
                and min(len(a), len(b)) >= threshold * max(len(a), len(b))
                and neardup.jaccard(a, b) >= threshold
            ):
                out.add((i, j))
    return out


def test_index_agrees_with_brute_force_on_toxigen(shared_data):
    texts = [r["text"] for r in prepare._dedupe_texts(prepare.toxigen_rows(str(shared_data)))]
    index = neardup.NearDupIndex(seed=11)
    for i, t in enumerate(texts):
        index.add(i, t)
    found = {(i, j) for i in range(len(texts)) for j, _ in index.matches_of(i) if i < j}
    assert found == _brute_force_pairs(texts)
    assert found  # ToxiGen does hold near-copies, so the check above is not vacuous


# --------------------------------------------------------------------------- the prepared demo task


@pytest.fixture(scope="module")
def supplies(shared_data):
    return prepare._supplies(str(shared_data), prepare.ToxicitySplit().seed)


def _roles(root: Path) -> dict[str, list[dict]]:
    return {role: pq.read_table(root / role).to_pylist() for role in ROLES}


def _audit(root: Path) -> dict:
    return json.loads((root / prepare.AUDIT_FILE).read_text())


@pytest.mark.parametrize("task", ["toxicity", "toxicity_groups"])
def test_demo_task_counts(demo_corpora, task):
    roles = _roles(demo_corpora / task)
    kinds = {role: {"hate": 0, "neutral": 0, "instructions": 0} for role in ROLES}
    for role, rows in roles.items():
        for r in rows:
            kind = "instructions" if not r["source"].startswith("toxigen/") else ("hate" if r["label"] else "neutral")
            kinds[role][kind] += 1
    assert kinds["anchors"] == {"hate": 96, "neutral": 0, "instructions": 0}
    assert kinds["pool"] == {"hate": 64, "neutral": 64, "instructions": 384}
    assert kinds["corpus"] == {"hate": 48, "neutral": 96, "instructions": 456}
    assert kinds["queries"] == {"hate": 16, "neutral": 0, "instructions": 0}
    assert sum(r["label"] for r in roles["corpus"]) == 48
    counts = json.loads((demo_corpora / "PREPARED.json").read_text())["counts"]
    assert {role: counts[f"{task}/{role}"] for role in ROLES} == {role: len(rows) for role, rows in roles.items()}
    assert _audit(demo_corpora / task)["counts"] == counts_of(roles)


def counts_of(roles: dict[str, list[dict]]) -> dict[str, int]:
    return {role: len(rows) for role, rows in roles.items()}


@pytest.mark.parametrize("task", ["toxicity", "toxicity_groups"])
def test_roles_disjoint_and_free_of_near_duplicates(demo_corpora, task):
    roles = _roles(demo_corpora / task)
    for a, b in itertools.combinations(ROLES, 2):
        assert not {r["id"] for r in roles[a]} & {r["id"] for r in roles[b]}, (a, b)
        assert not {r["text"].strip().lower() for r in roles[a]} & {r["text"].strip().lower() for r in roles[b]}, (a, b)
        left = _brute_force_pairs([r["text"] for r in roles[a]], [r["text"] for r in roles[b]])
        assert not left, (a, b, sorted(left)[:3])
    for role in prepare.DISTILL_ROLES:  # the sketch re-splits these into held-out and train
        assert not _brute_force_pairs([r["text"] for r in roles[role]]), role
    audit = _audit(demo_corpora / task)
    left = audit["near_duplicate_pairs_left"]
    assert all(n == 0 for pair, n in left.items() if pair not in ("corpus~corpus", "queries~queries")), left
    # Every dropped row is explained by at least one role pair, and only distillation or lower-priority rows go.
    assert audit["dropped"]["queries"] == 0
    for role, n in audit["dropped"].items():
        by_pair = sum(v for k, v in audit["dropped_by_pair"].items() if k.split("~")[0] == role)
        assert (n == 0) == (by_pair == 0) and by_pair >= n, (role, n, by_pair)
    for pair in audit["dropped_by_pair"]:
        dropped, kept = pair.split("~")
        assert prepare.ROLE_PRIORITY.index(kept) <= prepare.ROLE_PRIORITY.index(dropped), pair
    assert audit["near_duplicates"]["threshold"] == neardup.THRESHOLD


def test_group_task_groups_do_not_overlap(demo_corpora):
    roles = _roles(demo_corpora / "toxicity_groups")
    groups = _audit(demo_corpora / "toxicity_groups")["groups"]
    distill, evaluation = set(groups["distillation"]), set(groups["evaluation"])
    assert distill and evaluation and not distill & evaluation
    seen = {
        side: {r["group"] for role in rs for r in roles[role] if r["source"].startswith("toxigen/")}
        for side, rs in (("distillation", ("anchors", "pool")), ("evaluation", ("corpus", "queries")))
    }
    assert seen["distillation"] <= distill and seen["evaluation"] <= evaluation
    assert not seen["distillation"] & seen["evaluation"]


def test_group_split_covers_every_group_and_is_seeded(supplies):
    sup = supplies
    groups = {r["group"] for r in sup.hate + sup.neutral}
    roles_a, audit_a = prepare._group_task(sup, prepare.ToxicitySplit(), {})
    roles_b, audit_b = prepare._group_task(sup, prepare.ToxicitySplit(), {})
    assert audit_a["groups"] == audit_b["groups"]
    assert {r["id"] for r in roles_a["pool"]} == {r["id"] for r in roles_b["pool"]}
    assert set(audit_a["groups"]["distillation"]) | set(audit_a["groups"]["evaluation"]) == groups


def test_group_task_shrinks_when_no_split_fits(supplies):
    sup = supplies
    big = prepare.ToxicitySplit(anchor_hate=200, pool_instructions=8, corpus_instructions=8)  # > 289 hate in all
    roles, audit = prepare._group_task(sup, big, {})
    eighths = audit["groups"]["scaled_to_eighths"]
    assert 1 <= eighths < 8
    assert len(roles["anchors"]) == 200 * eighths // 8 and len(roles["queries"]) == 16 * eighths // 8
    distill = set(audit["groups"]["distillation"])
    assert all(r["group"] in distill for r in roles["anchors"])
    assert not any(r.get("group") in distill for r in roles["queries"] + roles["corpus"])


def test_too_large_task_is_a_clear_error(supplies):
    with pytest.raises(InputDataError, match="anchors needs 400 hate statements"):
        prepare._build_task(supplies, prepare.ToxicitySplit(anchor_hate=400), {})


def test_demo_jobs_fit_the_prepared_task_and_agree():
    demo = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    groups = yaml.safe_load((REPO / "jobs" / "demo_groups.yaml").read_text())
    sk = demo["sketch"]
    split = prepare.ToxicitySplit()
    assert sk["eval_anchors"] >= 32 and sk["eval_pool"] >= 256 and sk["train_anchors"] >= 64 and sk["train_pool"] >= 256
    assert sk["eval_anchors"] + sk["train_anchors"] <= split.anchor_hate
    assert sk["eval_pool"] + sk["train_pool"] <= split.pool_hate + split.pool_neutral + split.pool_instructions
    # The group-disjoint job is the demo job with its own run_dir and data paths, nothing else.
    assert groups["run_dir"] == "runs/demo_groups"
    text = yaml.safe_dump(groups).replace("data/demo/toxicity_groups/", "data/demo/toxicity/")
    assert yaml.safe_load(text) | {"run_dir": demo["run_dir"]} == demo


# --------------------------------------------------------------------------- eval's leakage audit


def test_eval_leakage_counts_near_duplicates(tmp_path):
    from pipeline.stages.eval import _leakage

    sketch = tmp_path / "sketch"
    distill = {
        "anchors": [STATEMENT, "Bi people are just confused and greedy"],
        "pool": [UNRELATED, "Translate to French: the cat sits on the mat"],
    }
    for role, texts in distill.items():
        (sketch / role).mkdir(parents=True)
        pq.write_table(
            pa.table({"id": [f"{role}/{i}" for i in range(len(texts))], "text": texts}),
            sketch / role / "part-00000.parquet",
        )
    ctx = SimpleNamespace(upstream_dir=lambda stage: str(tmp_path / stage), job=SimpleNamespace(seed=0))
    rows = pa.table(
        {
            "id": ["c0", "c1", "c2", "pool/0"],
            "text": [
                _one_word_changed(STATEMENT, 9, "rarely"),
                "Something else entirely, about boats",
                UNRELATED.lower() + ".",
                "the cat sits",
            ],
        }
    )
    queries = pa.table({"id": ["q0"], "text": ["BI people are just confused and greedy "]})
    out = _leakage(ctx, rows, queries)
    assert out["corpus_near_dup"] == 2 and out["queries_near_dup"] == 1
    # Texts compare as neardup.normalise makes them: UNRELATED lower-cased with a full stop is the same text.
    assert out["corpus_id_overlap"] == 1 and out["corpus_text_overlap"] == 1 and out["queries_text_overlap"] == 1


@pytest.mark.parametrize("task", ["toxicity", "toxicity_groups"])
def test_sketch_split_of_the_prepared_pool_is_representative(demo_corpora, task):
    """The sketch stage splits the pool by a seeded hash order; prepare must not have drawn its roles
    from that same order (it did once: every hate row of the pool fell into the train split, and the
    held-out split had none). Replays the sketch split (its key, its demo sizes) on the prepared pool."""
    from pipeline.config import load_job
    from pipeline.sampling import order_key, split_rows

    job = load_job(REPO / "jobs" / ("demo.yaml" if task == "toxicity" else "demo_groups.yaml"))
    pool = _roles(demo_corpora / task)["pool"]
    ordered = sorted(pool, key=lambda r: order_key(job.sketch.split_seed, r["id"]))
    held_out, train = split_rows(ordered, job.sketch.eval_pool, job.sketch.train_pool)

    def hate_share(rows):
        return sum(r["source"].startswith("toxigen/") and r["label"] == 1 for r in rows) / len(rows)

    overall = hate_share(pool)  # 64 of 512
    # A random 256 of 512 rows holds 32 +- 4 hate rows (hypergeometric sd ~ 3.9): a band of 3.5 sd.
    assert abs(hate_share(held_out) - overall) < 14 / 256
    assert abs(hate_share(train) - overall) < 14 / 256
