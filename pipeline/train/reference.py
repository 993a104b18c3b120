"""Reference per-token log-probs precomputed once by Ray Data batch inference, cached on disk.

Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` (and ``ref_anchor_logps`` when the rows carry anchors): one
float per RESPONSE token, log pi_ref(y_t | x, y_<t). The cache key is (fingerprint of the input Parquet files,
content of the reference model, code version; :mod:`pipeline.fingerprint`), so Tune trials and later rounds
reuse it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.batching import collate_pairs, pack_sequences, rows_from_columns
from pipeline.config import RunConfig
from pipeline.train.step import StepModels, reference_outputs, step_autocast

log = logging.getLogger(__name__)
CODE_VERSION = "ref-logps-v1"


class RefLogpsUDF:
    """Ray Data actor: loads the reference once, adds the reference log-prob columns to each batch."""

    def __init__(self, run: RunConfig, ref_name: str):
        from pipeline.models import build_model, build_tokenizer

        cfg = run
        self.tok = build_tokenizer(cfg.model)
        model = build_model(cfg.model, len(self.tok), name=ref_name, seed=cfg.seed).eval()
        self.models = StepModels(policy=model, reference=model)
        self.pad = self.tok.pad_token_id
        self.train = cfg.train

    def _side(self, packed: dict[str, torch.Tensor], lengths: list[int]) -> list[np.ndarray]:
        with step_autocast(self.train, "cpu"):  # as the training step computes the policy's log-probs
            logps, _ = reference_outputs(self.models, packed, need_logits=False)
        mask = packed["response_mask"]
        return [logps[i][mask[i]].numpy().astype(np.float32) for i in range(len(lengths))]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = rows_from_columns(batch)
        B = len(rows)
        pair = collate_pairs(rows, self.pad)["pair"]
        both = self._side(pair, [0] * (2 * B))
        batch["ref_chosen_logps"] = np.array(both[:B] + [None], dtype=object)[:B]
        batch["ref_rejected_logps"] = np.array(both[B:] + [None], dtype=object)[:B]
        if "anchor_ids" in batch:
            prompts = [list(r["prompt_ids"]) for r in rows]
            anchors = [list(r["anchor_ids"]) for r in rows]
            values = self._side(pack_sequences(prompts, anchors, self.pad), [0] * B)
            batch["ref_anchor_logps"] = np.array(values + [None], dtype=object)[:B]
        return batch


def precompute_reference(cfg: RunConfig, src: str | Path, ref_name: str, cache_root: str | Path) -> Path:
    """Parquet folder ``src`` + reference columns -> cached folder (computed once per (data, model) key)."""
    import ray

    from pipeline.fingerprint import digest, folder_fingerprint, model_fingerprint

    key = digest({
        "data": folder_fingerprint(src, (".parquet",)),
        "reference": model_fingerprint(ref_name, cfg.model, cfg.seed),
        "code": CODE_VERSION,
        "autocast": cfg.train.autocast,
    })  # fmt: skip
    out = Path(cache_root) / f"ref-{key}"
    done = out / "_DONE.json"
    if done.exists():
        log.info("reference log-probs: cache hit %s", out)
        return out
    ds = ray.data.read_parquet(str(src))
    n_in = ds.count()
    ds = ds.map_batches(
        RefLogpsUDF,
        fn_constructor_args=(cfg, ref_name),
        batch_size=max(8, cfg.train.micro_batch_size),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    import os
    import shutil

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # concurrent Tune trials may compute the same key
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp))
    n_out = ray.data.read_parquet(str(tmp)).count()
    if n_out != n_in:
        raise RuntimeError(f"reference precompute wrote {n_out} rows for {n_in} inputs of {src}")
    if out.exists():  # another process finished the same key first: identical content, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    done.write_text(json.dumps({"rows": n_in, "src": str(src), "reference": ref_name}))
    log.info("reference log-probs: computed %d rows into %s", n_in, out)
    return out
