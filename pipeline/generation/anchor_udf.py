"""The per-batch work of the anchor stage: build each row's context, sample, and add the anchor columns.

:class:`AnchorGenerator` is the Ray Data callable class of the actor pool (one engine per actor). The pure
functions beside it (:func:`anchor_context`, :func:`anchor_columns`) hold the row logic so it is tested
without Ray.

Anchor context (docs/ALGORITHM.md section 9, loss.anchor_context):
    - ``prompt`` (official code): the policy answers the prompt alone; the anchor is the sampled response.
    - ``chosen_prefix`` (paper): the policy continues from the prompt plus the first ``P`` tokens of the
      preferred response; the anchor is that prefix followed by the continuation, so it aligns position by
      position with the chosen/rejected responses. ``P = min(anchor_prefix_tokens, chosen_len - 1)``: at least
      the chosen response's last token (its EOS) is never copied, so the policy always writes the ending.
      The copied prefix tokens get log-prob 0.0 in ``anchor_logps``; ``anchor_prefix_len`` says how many.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.generation.engine import Generation, SamplingParams, stop_token_ids

log = logging.getLogger(__name__)

ANCHOR_COLUMNS = ("anchor_ids", "anchor_text", "anchor_logps", "anchor_prefix_len", "anchor_version")
FAULT_MARKER_ENV = "TIDPO_GENERATION_FAULT_MARKER"


def anchor_context(prompt_ids: list[int], chosen_ids: list[int], mode: str, prefix_tokens: int):
    """(context token ids, copied prefix) of one row for ``mode`` ``prompt`` or ``chosen_prefix``."""
    if mode == "prompt":
        return list(prompt_ids), []
    if mode == "chosen_prefix":
        n = max(0, min(prefix_tokens, len(chosen_ids) - 1))
        prefix = list(chosen_ids[:n])
        return list(prompt_ids) + prefix, prefix
    raise ValueError(f"loss.anchor_context: {mode!r} is not 'prompt' or 'chosen_prefix'")


def anchor_columns(prefixes: list[list[int]], gens: list[Generation], version: str, decode) -> dict[str, Any]:
    """The anchor columns (pyarrow arrays) for rows with copied ``prefixes`` and sampled ``gens``.

    Raises ValueError naming the row index when a log-prob is not finite (no NaN is ever written).
    """
    ids, logps = [], []
    for i, (prefix, g) in enumerate(zip(prefixes, gens)):
        bad = [x for x in g.logprobs if not math.isfinite(x)]
        if bad or len(g.logprobs) != len(g.token_ids):
            raise ValueError(f"row {i}: {len(bad)} non-finite log-probs / {len(g.logprobs)} for "
                             f"{len(g.token_ids)} tokens")  # fmt: skip
        ids.append(prefix + list(g.token_ids))
        logps.append([0.0] * len(prefix) + list(g.logprobs))
    return {
        "anchor_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "anchor_text": pa.array([decode(x) for x in ids], type=pa.string()),
        "anchor_logps": pa.array(logps, type=pa.list_(pa.float32())),
        "anchor_prefix_len": pa.array([len(p) for p in prefixes], type=pa.int32()),
        "anchor_version": pa.array([version] * len(ids), type=pa.string()),
    }


class AnchorGenerator:
    """Ray Data callable class: one engine per actor; ``__call__`` adds the anchor columns to a batch.

    Args:
        cfg: the run config (engine choice, sampling, anchor context).
        model_path: policy folder (or the base model name).
        version: the policy version label written to ``anchor_version``.
        kind: engine kind (``hf`` or ``vllm``), chosen once on the driver.
        stats_dir: each actor writes one JSON line per batch there (rows, tokens, seconds) and one start file.
        fault_marker: test hook: if set and the file does not exist, the actor creates it and exits on its
            first batch (simulates a killed engine once; the pool must replace it and retry the batch).
    """

    def __init__(self, cfg, model_path: str, version: str, kind: str, stats_dir: str,
                 fault_marker: str | None = None):  # fmt: skip
        from pipeline.generation.engine import build_engine

        self.cfg = cfg
        self.version = version
        self.fault_marker = fault_marker
        self.engine = build_engine(cfg, model_path, kind=kind, version=version)
        tokenizer = getattr(self.engine, "tokenizer", None)
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.params = SamplingParams.from_config(cfg.generation, stop_token_ids(tokenizer, cfg.generation.stop))
        self.actor_id = uuid.uuid4().hex[:12]
        self.stats_path = Path(stats_dir) / f"{self.actor_id}.jsonl"
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        (Path(stats_dir) / f"{self.actor_id}.start").touch()
        self.batches = 0

    def _maybe_fail(self) -> None:
        if self.fault_marker and self.batches == 0:
            try:
                fd = os.open(self.fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            log.warning("fault injection: engine actor %s exits on its first batch", self.actor_id)
            os._exit(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._maybe_fail()
        self.batches += 1
        row_ids = [str(x) for x in batch.column("row_id").to_pylist()]
        prompts = batch.column("prompt_ids").to_pylist()
        chosen = batch.column("chosen_ids").to_pylist()
        mode, k = self.cfg.loss.anchor_context, self.cfg.loss.anchor_prefix_tokens
        pairs = [anchor_context(p, c, mode, k) for p, c in zip(prompts, chosen)]
        contexts, prefixes = [c for c, _ in pairs], [p for _, p in pairs]
        start = time.perf_counter()
        gens = [g[0] for g in self.engine.generate(contexts, self.params, row_keys=row_ids)]
        seconds = time.perf_counter() - start
        try:
            cols = anchor_columns(prefixes, gens, self.version, self.decode)
        except ValueError as exc:
            raise ValueError(f"anchor generation failed for a row of batch {row_ids[:3]}...: {exc}") from exc
        tokens = sum(len(g.token_ids) for g in gens)
        with self.stats_path.open("a") as f:
            f.write(json.dumps({"rows": len(gens), "tokens": tokens, "seconds": seconds}) + "\n")
        for name in ANCHOR_COLUMNS:
            if name in batch.column_names:
                batch = batch.drop_columns([name])  # a re-run over an anchored table replaces old anchors
            batch = batch.append_column(name, cols[name])
        return batch
