"""Seeded, prefix-stable sampling of anchors and pool rows into disjoint eval and train splits.

Every row gets a keyed hash of (seed, id); rows sorted by that key form a seeded shuffle that does
not depend on file order, batch order or corpus size. Eval takes the front of the order and train
the next rows (METHOD.md 1b), so changing a train size never changes the eval set, and adding rows
to a corpus only moves a row into a split if its key is smaller than the split's current rows.
Only the N smallest keys are kept (a bounded heap), so sampling never holds the corpus in memory.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Any, Iterable


def order_key(seed: int, row_id: str, stream: str = "") -> int:
    """A keyed 64-bit hash of (seed, id): sorting by it is a seeded shuffle that is stable per row.

    `stream` names the purpose of the order. Two orders drawn with the same seed but for different
    purposes must use different streams, or they are the same shuffle: when `prepare` filled the demo's
    roles with consecutive slices of one seeded order, and the sketch stage split the pool by that same
    order, every hate row of the pool (the tail of its supply) landed in the train split and none in
    the held-out split. The empty stream is the sketch split's (kept for existing artifacts)."""
    text = f"{stream}:{seed}:{row_id}" if stream else f"{seed}:{row_id}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SmallestKeys:
    """Keeps the `n` rows with the smallest keys seen so far (ties broken by id)."""

    def __init__(self, n: int):
        self.n = n
        self._heap: list[tuple[int, str, dict[str, Any]]] = []  # max-heap via negated keys

    def offer(self, key: int, row_id: str, row: dict[str, Any]) -> None:
        if self.n <= 0:
            return
        item = (-key, _neg_id(row_id), row)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:  # smaller key than the current largest kept
            heapq.heapreplace(self._heap, item)

    def sorted_rows(self) -> list[dict[str, Any]]:
        return [row for _, _, row in sorted(self._heap, key=lambda t: (-t[0], t[2]["id"]))]


def _neg_id(row_id: str) -> str:
    # Ties on the 64-bit key are astronomically rare; order them by id deterministically anyway.
    return "".join(chr(0x10FFFF - ord(c)) for c in row_id[:64])


def split_rows(ordered: list[dict[str, Any]], n_eval: int, n_train: int) -> tuple[list[dict], list[dict]]:
    """Eval = front slice, train = next slice of the seeded order."""
    return ordered[:n_eval], ordered[n_eval : n_eval + n_train]


def select(
    rows: Iterable[dict[str, Any]], seed: int, n: int, exclude_ids: set[str] | None = None
) -> list[dict[str, Any]]:
    keeper = SmallestKeys(n)
    for row in rows:
        if exclude_ids and row["id"] in exclude_ids:
            continue
        keeper.offer(order_key(seed, row["id"]), row["id"], row)
    return keeper.sorted_rows()
