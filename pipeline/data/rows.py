"""Pure row logic of the prepare stage: raw rows -> output rows (kept or quarantined), duplicates, splits, stats.

No Ray here: the Ray Data pipeline in :mod:`pipeline.data.prepare` calls :func:`process_table` on each batch, and
the unit tests call :func:`process_rows` directly. Every input row yields exactly one output row; a row that
cannot be kept carries a non-empty ``reason`` (and ``detail``, and its ``raw`` text for the quarantine file).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data import template as tpl
from pipeline.data.formats import Pair, RowError, parse_record

_IDS = pa.list_(pa.int32())
# The columns written to the train/eval Parquet shards (documented in pipeline.data.prepare).
PAIR_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("index", pa.int64()),
        ("prompt_ids", _IDS),
        ("chosen_ids", _IDS),
        ("rejected_ids", _IDS),
        ("prompt_len", pa.int32()),
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
        ("prompt_text", pa.string()),
        ("chosen_text", pa.string()),
        ("rejected_text", pa.string()),
        ("messages_json", pa.string()),
    ]
)
# Bookkeeping columns, dropped before writing.
EXTRA_SCHEMA = pa.schema(
    [
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
        ("dedup_key", pa.string()),
        ("prompt_key", pa.string()),
        ("truncated", pa.string()),
    ]
)
ROW_SCHEMA = pa.schema(list(PAIR_SCHEMA) + list(EXTRA_SCHEMA))
EXTRA_COLUMNS = EXTRA_SCHEMA.names


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _empty(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: "" for name in ROW_SCHEMA.names}
    out.update(source=row["source"], index=int(row["index"]), raw=row["raw"] or "")
    out.update(prompt_ids=[], chosen_ids=[], rejected_ids=[], prompt_len=0, chosen_len=0, rejected_len=0)
    return out


def quarantined(row: Mapping[str, Any], reason: str, detail: str) -> dict[str, Any]:
    out = _empty(row)
    out.update(reason=reason, detail=detail, row_id=_sha(f"{row['source']}\0{row['index']}\0{row['raw']}"))
    return out


def _parse(row: Mapping[str, Any], fmt: str, fields: Mapping[str, str]) -> Pair:
    if row["error"]:
        reason, _, detail = row["error"].partition(":")
        raise RowError(reason, detail)
    try:
        record = json.loads(row["raw"])
    except (ValueError, RecursionError) as exc:  # the readers check this; rows from elsewhere may not be
        raise RowError("bad_json", " ".join(str(exc).split())[:120]) from None
    return parse_record(record, fmt, fields)


def _kept(row: Mapping[str, Any], pair: Pair, ids: tpl.PairIds) -> dict[str, Any]:
    out = _empty(row)
    messages_json = json.dumps(pair.message_dicts(), ensure_ascii=False)
    dedup_key = _sha(json.dumps([messages_json, pair.chosen, pair.rejected]))
    out.update(
        row_id=_sha(f"{row['source']}\0{row['index']}\0{dedup_key}"),
        prompt_ids=ids.prompt_ids,
        chosen_ids=ids.chosen_ids,
        rejected_ids=ids.rejected_ids,
        prompt_len=len(ids.prompt_ids),
        chosen_len=len(ids.chosen_ids),
        rejected_len=len(ids.rejected_ids),
        prompt_text=pair.prompt_text,
        chosen_text=pair.chosen,
        rejected_text=pair.rejected,
        messages_json=messages_json,
        dedup_key=dedup_key,
        prompt_key=_sha(messages_json),
        truncated=",".join(ids.truncated),
    )
    return out


def process_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    formats: Mapping[str, str],
    fields: Mapping[str, str],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
) -> list[dict[str, Any]]:
    """parse -> validate -> template -> tokenize -> check boundary -> truncate, one output row per input row.

    ``formats`` maps each row's ``source`` to its layout. Texts of the whole batch are tokenized in one call.
    """
    out: list[dict[str, Any] | None] = [None] * len(rows)
    good: list[tuple[int, Pair]] = []
    for i, row in enumerate(rows):
        try:
            good.append((i, _parse(row, formats[row["source"]], fields)))
        except RowError as exc:
            out[i] = quarantined(row, exc.reason, exc.detail)
    texts = []
    for _, pair in good:
        msgs = pair.message_dicts()
        texts += [
            tpl.render_prompt(tokenizer, msgs),
            tpl.response_text(tokenizer, pair.chosen),
            tpl.response_text(tokenizer, pair.rejected),
            tpl.render_conversation(tokenizer, msgs, pair.chosen),
            tpl.render_conversation(tokenizer, msgs, pair.rejected),
        ]
    ids = tpl.encode_texts(tokenizer, texts)
    bos, eos = tpl.bos_prefix(tokenizer), tpl.eos_id(tokenizer)
    for k, (i, pair) in enumerate(good):
        p, c, r, full_c, full_r = ids[5 * k : 5 * k + 5]
        prompt, chosen, rejected = bos + p, c + [eos], r + [eos]
        try:
            tpl.check_boundary(prompt, chosen, bos + full_c, "chosen")
            tpl.check_boundary(prompt, rejected, bos + full_r, "rejected")
            pair_ids = tpl.truncate(
                prompt,
                chosen,
                rejected,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                keep_first=len(bos),
            )
            out[i] = _kept(rows[i], pair, pair_ids)
        except RowError as exc:
            out[i] = quarantined(rows[i], exc.reason, exc.detail)
    return out  # type: ignore[return-value]


def process_table(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """:func:`process_rows` on an Arrow batch of raw rows (the Ray Data ``map_batches`` function)."""
    rows = process_rows(batch.to_pylist(), **kwargs)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ----------------------------------------------------------------------------------------------------------
# Whole-dataset decisions (made on the driver from a few small columns).


def find_duplicates(dedup_keys: Sequence[str], reasons: Sequence[str]) -> dict[int, int]:
    """{position: position of its first occurrence} for every kept row repeating an earlier kept row."""
    first: dict[str, int] = {}
    dups: dict[int, int] = {}
    for i, (key, reason) in enumerate(zip(dedup_keys, reasons)):
        if reason:
            continue
        if key in first:
            dups[i] = first[key]
        else:
            first[key] = i
    return dups


def eval_prompts(prompt_keys: Sequence[str], *, fraction: float, size: int | None) -> set[str]:
    """The prompt keys that go to eval: whole prompt groups in ascending hash order until the target is met.

    The target is ``size`` rows when given, else ``round(fraction * rows)``; a group is never split, so eval may
    overshoot by less than one group, and at least one group always stays in train.
    """
    groups = Counter(prompt_keys)
    target = size if size is not None else round(fraction * len(prompt_keys))
    chosen: set[str] = set()
    taken = 0
    for key in sorted(groups)[: max(len(groups) - 1, 0)]:
        if taken >= target:
            break
        chosen.add(key)
        taken += groups[key]
    return chosen


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """min / mean / p50 / p95 / max of token lengths (zeros for no rows)."""
    if len(values) == 0:
        return {"min": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    a = np.asarray(values, dtype=np.int64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 2),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "max": int(a.max()),
    }
