"""Token importance as text: display pieces of byte-level tokens, words, and the highest-weight tokens of a split.

Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3) mark a leading space inside the token ("Ġyou") and split a
multi-byte UTF-8 character over several tokens, so a token decoded alone is not its text. Here a response's
tokens become display pieces decoded from prefixes of the whole response (:func:`token_pieces`), the pieces are
grouped into words (:func:`word_spans`), and the report colours each word by the largest weight among its tokens
(:func:`word_weight`). The weights stay per token in every saved file.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

Decode = Callable[[list[int]], str]


def token_pieces(decode: Decode, ids: Sequence[int]) -> list[str]:
    """Display pieces of a token list whose concatenation is ``decode(ids)``: piece i is the text that token i
    adds, ``decode(ids[:i+1])`` minus ``decode(ids[:i])`` (so a multi-byte character split over byte tokens
    shows whole on its last byte and empty before). Where a prefix's decoding is not a prefix of the next
    (tokenizers that clean up spaces), the piece is ``decode([id])``."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        text = decode(list(ids[: i + 1]))
        if text.endswith("\ufffd") and i < len(ids) - 1:  # an incomplete multi-byte character: wait for it
            pieces.append("")
            continue
        pieces.append(text[len(prev) :] if text.startswith(prev) else decode([ids[i]]))
        prev = text
    return pieces


def word_spans(pieces: Sequence[str], special: Collection[int] = ()) -> list[tuple[int, int]]:
    """Token index ranges ``[start, end)`` of the words of a response, in order, covering every token.

    A word starts at a piece that begins with whitespace or follows one that ends with it (or holds a newline);
    a special token (index in ``special``, e.g. ``<|im_end|>``) is a word of its own; an empty piece (the first
    bytes of a multi-byte character) belongs to the word of the piece that completes the character.
    """
    spans: list[list[int]] = []
    boundary, pending = True, 0  # pending: empty pieces waiting for the token that completes them
    for i, piece in enumerate(pieces):
        if piece == "" and i not in special:
            pending += 1
            continue
        first = i - pending
        if boundary or i in special or piece[:1].isspace() or not spans:
            spans.append([first, i + 1])
        else:
            spans[-1][1] = i + 1
        pending = 0
        boundary = i in special or piece[-1:].isspace() or "\n" in piece
    if pending:  # trailing incomplete bytes: their own word
        spans.append([len(pieces) - pending, len(pieces)])
    return [(a, b) for a, b in spans]


def word_weight(weights: Sequence[float]) -> float:
    """A word's weight: the largest of its tokens' weights (a sum would make every long word look heavy)."""
    return max(weights)


def top_weight_tokens(
    responses: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]],
    decode: Decode,
    *,
    k: int = 15,
    min_count: int = 3,
) -> dict[str, Any]:
    """The ``k`` tokens with the highest mean normalised weight over some responses.

    A token's normalised weight is its weight over the mean weight of its response (1 when the weights were
    normalised over the response, as in the paper preset; not when the weighting span includes the prompt).
    Tokens are told apart by id; only those seen at least ``min_count`` times are ranked. Responses whose mean
    weight is not positive cannot be normalised: they are left out and counted.

    Returns ``{"tokens": [{"token": text, "id", "mean_weight", "count"}, ...], "responses", "skipped", "min_count"}``
    with ``text = decode([id])`` (a lone byte of a multi-byte character shows as U+FFFD).
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    skipped = 0
    for ids, w in zip(responses, weights, strict=True):
        if len(ids) != len(w):
            raise ValueError(f"a response has {len(ids)} tokens but {len(w)} weights")
        mean = sum(w) / len(w) if w else 0.0
        if mean <= 0:
            skipped += 1
            continue
        for t, x in zip(ids, w, strict=True):
            sums[t] = sums.get(t, 0.0) + x / mean
            counts[t] = counts.get(t, 0) + 1
    ranked = sorted((t for t in sums if counts[t] >= min_count), key=lambda t: (-sums[t] / counts[t], t))[:k]
    rows = [{"token": decode([t]), "id": t, "mean_weight": sums[t] / counts[t], "count": counts[t]} for t in ranked]
    return {"tokens": rows, "responses": len(responses) - skipped, "skipped": skipped, "min_count": min_count}


def heatmap_side(decode: Decode, ids: Sequence[int], weights: Sequence[float], special_ids: Collection[int]):
    """One response of a heatmap entry: display pieces, per-token weights, and the indices of special tokens."""
    if len(ids) != len(weights):
        raise ValueError(f"a response has {len(ids)} tokens but {len(weights)} weights")
    return {
        "tokens": token_pieces(decode, ids),
        "weights": [float(w) for w in weights],
        "special": [i for i, t in enumerate(ids) if t in special_ids],
    }
