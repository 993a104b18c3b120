"""Collating prepared preference rows into padded tensors, padded per batch to the longest sequence.

A prepared row holds ``prompt_ids`` and RESPONSE-only ``chosen_ids`` / ``rejected_ids`` (EOS included); the
optional ``anchor_ids`` (generation stage) and precomputed reference log-probs ``ref_chosen_logps`` /
``ref_rejected_logps`` / ``ref_anchor_logps`` (one float per response token). Sequences are right-padded
(the attribution and the models handle any padding; see ``tidpo.weights.position_ids_from_mask``).

Label alignment (as in ``tidpo``): tensors named ``*_mask`` / ``ref_*_token_logps`` are (N, T-1) over labels
``input_ids[:, 1:]``; the label at index j is sequence token j + 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def rows_from_columns(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A Ray Data / pandas column batch -> list of row dicts."""
    keys = list(batch.keys())
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    ref_logps: Sequence[Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Concatenate prompt + response per row and right-pad to the longest.

    Returns:
        ``input_ids`` (N, T) long, ``attention_mask`` (N, T) long, ``response_mask`` (N, T-1) bool (labels that
        are response tokens), ``span_mask`` (N, T-1) bool (every real label: the prompt + response span), and
        ``ref_token_logps`` (N, T-1) float32 (0 off the response) when ``ref_logps`` is given.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(max((len(s) for s in seqs), default=1), 2)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width - 1), dtype=torch.bool)
    ref = torch.zeros((n, width - 1), dtype=torch.float32) if ref_logps is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        length = len(p) + len(r)
        input_ids[i, :length] = torch.tensor(seqs[i], dtype=torch.long)
        attention[i, :length] = 1
        start = len(p) - 1  # label index of the first response token
        response[i, start : start + len(r)] = True
        if ref is not None:
            values = _as_list(ref_logps[i])
            if len(values) != len(r):
                raise ValueError(f"row {i}: {len(values)} reference log-probs for {len(r)} response tokens")
            ref[i, start : start + len(r)] = torch.tensor(values, dtype=torch.float32)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "response_mask": response,
        "span_mask": attention[:, 1:].bool(),
    }
    if ref is not None:
        out["ref_token_logps"] = ref
    return out


def collate_pairs(
    rows: Sequence[Mapping[str, Any]], pad_id: int, *, with_anchor: bool = False, with_reference: bool = False
) -> dict[str, Any]:
    """Rows -> one concatenated batch: the first B sequences are chosen, the next B rejected (one forward).

    Returns ``pair`` (``pack_sequences`` of the 2B sequences), ``num_pairs`` B, and with ``with_anchor`` an
    ``anchor`` pack of prompt + ``anchor_ids``. ``with_reference``: the rows carry precomputed reference log-probs
    (``ref_chosen_logps`` / ``ref_rejected_logps``, and ``ref_anchor_logps`` with anchors), which become the
    packs' ``ref_token_logps``; a row without them raises naming the row. Without it such columns are ignored.
    """
    if not rows:
        raise ValueError("collate_pairs got an empty batch")
    prompts = [_as_list(r["prompt_ids"]) for r in rows]
    chosen = [_as_list(r["chosen_ids"]) for r in rows]
    rejected = [_as_list(r["rejected_ids"]) for r in rows]
    for i, (c, rj) in enumerate(zip(chosen, rejected)):
        if not c or not rj or not prompts[i]:
            raise ValueError(f"row {rows[i].get('row_id', i)}: empty prompt or response")
    ref = None
    if with_reference:
        columns = ("ref_chosen_logps", "ref_rejected_logps") + (("ref_anchor_logps",) if with_anchor else ())
        _require(rows, columns)
        ref = [*(r["ref_chosen_logps"] for r in rows), *(r["ref_rejected_logps"] for r in rows)]
    out: dict[str, Any] = {
        "pair": pack_sequences(prompts + prompts, chosen + rejected, pad_id, ref),
        "num_pairs": len(rows),
    }
    if with_anchor:
        _require(rows, ("anchor_ids",))
        anchors = [_as_list(r["anchor_ids"]) for r in rows]
        anchor_ref = [r["ref_anchor_logps"] for r in rows] if with_reference else None
        out["anchor"] = pack_sequences(prompts, anchors, pad_id, anchor_ref)
    return out


def _require(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    for i, r in enumerate(rows):
        missing = [c for c in columns if r.get(c) is None]
        if missing:
            raise ValueError(
                f"row {r.get('row_id', i)}: no {', '.join(missing)} (the stage plan says the rows carry it)"
            )


def split_pair(t: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> chosen (B, ...), rejected (B, ...)."""
    return t[:num_pairs], t[num_pairs:]
