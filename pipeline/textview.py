"""What the encoder sees of a row: its *view*. Pure Python/numpy (no torch, no Ray).

The view follows what the teacher's loss sees. When a row's text is its prompt + newline + response
(no separate encoder column), the view is a `PairView` and tokenisation keeps the response and cuts
the prompt from the left, as the teacher's truncation does. Cutting the head of "prompt\nresponse"
instead hides the response of every long instruction row from the encoder, though the response is
the teacher's whole loss span. A plain text keeps its head, exactly as `SentenceTransformer.encode`
does, so the plain encoder baseline embeds what its users embed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np


class PairView(NamedTuple):
    """An instruction row as the encoder sees it: `prefix` and `response` are kept, the prompt's head
    is cut first when the three do not fit."""

    prefix: str
    prompt: str
    response: str


EncoderInput = Union[str, PairView]


def text_views(
    texts: Sequence[str],
    prompts: Optional[Sequence[Optional[str]]] = None,
    responses: Optional[Sequence[Optional[str]]] = None,
    prefix: str = "",
) -> list[EncoderInput]:
    """The encoder's input per row: a `PairView` where the text is prompt + newline + response,
    else `prefix + text` (a plain text, a separate encoder column, or a row without prompt)."""
    if prompts is None or responses is None:
        return [prefix + t for t in texts]
    out: list[EncoderInput] = []
    for text, prompt, response in zip(texts, prompts, responses, strict=True):
        if prompt and response is not None and text == f"{prompt}\n{response}":
            out.append(PairView(prefix, prompt, response))
        else:
            out.append(prefix + text)
    return out


def table_views(table, prefix: str = "") -> list[EncoderInput]:
    """`text_views` of a canonical or sketch table (pyarrow); its prompt/response columns are optional
    (older sketch artifacts lack them: their rows are then embedded as plain texts)."""
    from pipeline.schema import PROMPT, RESPONSE, TEXT

    has_pair = PROMPT in table.column_names and RESPONSE in table.column_names
    return text_views(
        table.column(TEXT).to_pylist(),
        table.column(PROMPT).to_pylist() if has_pair else None,
        table.column(RESPONSE).to_pylist() if has_pair else None,
        prefix=prefix,
    )


def view_text(item: EncoderInput) -> str:
    """The untruncated text of a view (for logs, length sorting and reports)."""
    return item if isinstance(item, str) else f"{item.prefix}{item.prompt}\n{item.response}"


def tokenize_views(tokenizer, items: Sequence[EncoderInput], max_len: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids (special tokens included, at most max_len) per view, and whether each was cut.

    Plain texts keep their head (the tokenizer's own truncation). Pair views keep the prefix and the
    response (the response's head when it alone overflows) and take the prompt's tail into the room
    left, joined by the tokenizer's own ids for a newline (none for WordPiece, which treats it as space).
    """
    head, tail = _special_tokens(tokenizer)
    budget = max(max_len - len(head) - len(tail), 1)
    ids: list[list[int]] = [[] for _ in items]
    cut = np.zeros(len(items), bool)
    plain = [i for i, it in enumerate(items) if isinstance(it, str)]
    pairs = [i for i, it in enumerate(items) if not isinstance(it, str)]
    if plain:
        full = tokenizer([items[i] for i in plain], add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        for i, toks in zip(plain, full):
            cut[i] = len(toks) > budget
            ids[i] = head + toks[:budget] + tail
    if pairs:

        def enc(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

        views = [items[i] for i in pairs]
        newline = enc(["\n"])[0]
        for i, pre, prompt, resp in zip(
            pairs, enc([v.prefix for v in views]), enc([v.prompt for v in views]), enc([v.response for v in views])
        ):
            resp_keep = resp[: max(budget - len(pre), 0)]
            room = budget - len(pre) - len(resp_keep) - len(newline)
            prompt_keep = prompt[max(len(prompt) - room, 0) :] if room > 0 else []
            cut[i] = len(prompt_keep) < len(prompt) or len(resp_keep) < len(resp)
            joined = pre + prompt_keep + (newline if prompt_keep else []) + resp_keep
            ids[i] = head + joined[:budget] + tail
    return ids, cut


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text (e.g. [CLS] and [SEP]), read off
    its own output for a probe word so that any tokenizer's template is followed."""
    probe = "hello"
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(core) + 1):
        if full[start : start + len(core)] == core:
            return list(full[:start]), list(full[start + len(core) :])
    raise ValueError(f"cannot locate the text between the special tokens of {type(tokenizer).__name__}")
