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


def _cache_dir(cfg: RunConfig, src: str | Path, ref_name: str, cache_root: str | Path) -> Path:
    from pipeline.fingerprint import digest, folder_fingerprint, model_fingerprint

    key = digest({
        "data": folder_fingerprint(src, (".parquet",)),
        "reference": model_fingerprint(ref_name, cfg.model, cfg.seed),
        "code": CODE_VERSION,
        "autocast": cfg.train.autocast,
    })  # fmt: skip
    return Path(cache_root) / f"ref-{key}"


SPLIT_COLUMN = "_ref_split"


def precompute_reference_splits(
    cfg: RunConfig, splits: dict[str, str | Path], ref_name: str, cache_root: str | Path
) -> dict[str, Path]:
    """Each Parquet folder of ``splits`` (name -> folder) + reference columns -> its cached folder, keyed per
    folder. The folders still to compute go through ONE Ray Data pass (one actor pool loads the reference
    once; a pool costs a process start and a model load, ~20 s of a tiny run) when they have the same
    columns; folders with other columns (anchors on the train split only) get a pass each."""
    import ray

    outs = {name: _cache_dir(cfg, src, ref_name, cache_root) for name, src in splits.items()}
    todo = {}
    for name, src in splits.items():
        if (outs[name] / "_DONE.json").exists():
            log.info("reference log-probs: cache hit %s", outs[name])
        elif outs[name] not in [outs[n] for n in todo]:  # two names, the same data: computed once
            todo[name] = ray.data.read_parquet(str(src))
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, ds in todo.items():
        groups.setdefault(tuple(sorted(ds.schema().names)), []).append(name)
    for names in groups.values():
        _compute(cfg, {n: todo[n] for n in names}, {n: splits[n] for n in names}, {n: outs[n] for n in names},
                 ref_name)  # fmt: skip
    return outs


def _compute(cfg: RunConfig, datasets: dict, srcs: dict, outs: dict[str, Path], ref_name: str) -> None:
    import os
    import shutil

    import pyarrow as pa
    import ray

    counts = {name: ds.count() for name, ds in datasets.items()}
    for name, n in counts.items():
        if n == 0:
            raise ValueError(f"{srcs[name]} has no rows: no reference log-probs to compute")

    def tagged(name):
        return lambda t: t.append_column(SPLIT_COLUMN, pa.array([name] * t.num_rows, pa.string()))

    parts = [ds.map_batches(tagged(name), batch_format="pyarrow") for name, ds in datasets.items()]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        RefLogpsUDF,
        fn_constructor_args=(cfg, ref_name),
        batch_size=max(8, cfg.train.micro_batch_size),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    # concurrent Tune trials may compute the same key: each writes its own tmp folder (hidden, outside the
    # ref-* names of finished caches), the first rename wins
    tmp = next(iter(outs.values())).with_name(f".ref-tmp-{os.getpid()}-{'-'.join(sorted(outs))}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp), partition_cols=[SPLIT_COLUMN])
    for name, out in outs.items():
        part = tmp / f"{SPLIT_COLUMN}={name}"
        n_out = ray.data.read_parquet(str(part)).count() if part.exists() else 0
        if n_out != counts[name]:
            raise RuntimeError(f"reference precompute wrote {n_out} rows for {counts[name]} inputs of {srcs[name]}")
        if out.exists():  # another process finished the same key first: identical content, keep theirs
            shutil.rmtree(part, ignore_errors=True)
        else:
            part.rename(out)
        done = {"rows": counts[name], "src": str(srcs[name]), "reference": ref_name}
        (out / "_DONE.json").write_text(json.dumps(done))
        log.info("reference log-probs: computed %d rows into %s", counts[name], out)
    shutil.rmtree(tmp, ignore_errors=True)
