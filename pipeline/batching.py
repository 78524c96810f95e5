"""Token-budget batching, shared by the teacher (sketch, eval's gradients) and the text encoder.

Rows sorted by length and packed so that a pass pads little: short rows share a pass, long rows
are not padded to a random long neighbour. Pure Python (no torch, no Ray).
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.errors import ConfigError


def token_budget_batches(
    lengths: Sequence[int], token_budget: Optional[int], max_rows: int, section: str = "sketch"
) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches of similar length (longest first, ties by index).

    A batch grows while ``rows x its longest row <= token_budget`` (its padded size; sorting makes
    the first row the longest) and ``rows <= max_rows``. A row longer than the budget gets a batch
    of its own. ``token_budget=None`` cuts by ``max_rows`` only. ``section`` names the config
    section whose ``batch_size``/``token_budget`` are at fault in the error for a bad value.
    """
    if max_rows < 1:
        raise ConfigError(f"{section}.batch_size={max_rows}; expected an integer >= 1")
    if token_budget is not None and token_budget < 1:
        raise ConfigError(f"{section}.token_budget={token_budget}; expected an integer >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out:
            cur = out[-1]
            fits = token_budget is None or (len(cur) + 1) * lengths[cur[0]] <= token_budget
            if fits and len(cur) < max_rows:
                cur.append(i)
                continue
        out.append([i])
    return out
