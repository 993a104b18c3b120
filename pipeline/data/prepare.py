"""``tidpo prepare``: preference pairs in any supported layout -> validated, tokenized Parquet splits (Ray Data).

Pipeline: read (one Ray task per file; :mod:`pipeline.data.sources`) -> parse/validate
(:mod:`pipeline.data.formats`) -> template/tokenize/truncate (:mod:`pipeline.data.template`), in
``map_batches`` -> materialize -> on the driver, from a few small columns: duplicates, the train/eval split
by prompt hash (:mod:`pipeline.data.rows`) and the bad-fraction check -> write Parquet shards with Ray Data.

Output, under ``data_dir(output_dir) = <output_dir>/data``:

- ``train/`` and ``eval/``: Parquet shards ``<split>-NNNNN.parquet``, one row per pair, columns
  ``row_id`` (str: stable hash of source, index and content), ``source`` (str: file, ``hf:NAME/SPLIT`` or
  ``synthetic:TASK``), ``index`` (int64: 0-based row in that source), ``prompt_ids`` (list<int32>: templated
  prompt tokens, BOS included if the tokenizer adds one), ``chosen_ids`` / ``rejected_ids`` (list<int32>:
  RESPONSE tokens only, EOS appended), ``prompt_len`` / ``chosen_len`` / ``rejected_len`` (int32),
  ``prompt_text`` (last user message), ``chosen_text`` / ``rejected_text`` (response texts) and
  ``messages_json`` (the prompt conversation as a JSON list of ``{role, content}``). The full chosen sequence
  is ``prompt_ids + chosen_ids``; its response mask is ``position >= prompt_len``.
- ``quarantine.jsonl``: one record per rejected row (``source``, ``index``, ``reason``, ``detail``, ``raw``).
- ``manifest.json`` (written last): counts (``read == kept + quarantined``), ``reasons``, split sizes, length
  statistics, detected formats, tokenizer, and the fingerprint; same fingerprint -> the stage is a cache hit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, to_dict
from pipeline.data import manifest as mf
from pipeline.data import rows as rowlib
from pipeline.data.inputs import Inputs, resolve_inputs
from pipeline.data.sources import DataFileError

log = logging.getLogger(__name__)
META_COLUMNS = [
    "source",
    "index",
    "row_id",
    "reason",
    "detail",
    "dedup_key",
    "prompt_key",
    "prompt_len",
    "chosen_len",
    "rejected_len",
    "truncated",
]


def data_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/data``: where the splits, manifest and quarantine file live (the run plan's layout)."""
    from pipeline.plan import Layout

    return Layout(Path(output_dir)).data


@functools.lru_cache(maxsize=4)
def _tokenizer(model_cfg: Any) -> Any:
    from pipeline.models import build_tokenizer

    return build_tokenizer(model_cfg)


def _process_batch(batch: Any, *, model_cfg: Any, **kwargs: Any) -> Any:
    """Ray Data ``map_batches`` function: raw rows -> output rows (kept or quarantined)."""
    return rowlib.process_table(batch, tokenizer=_tokenizer(model_cfg), **kwargs)


def _select(
    batch: Any,
    *,
    row_ids: set[str] | None = None,
    split: str | None = None,
    eval_keys: frozenset[str] = frozenset(),
    dropped: frozenset[str] = frozenset(),
) -> Any:
    """Rows of one split (kept, not a duplicate, prompt in/out of eval), or the rows with given ids."""
    import pyarrow as pa

    t = batch.to_pydict()
    if row_ids is not None:
        keep = [rid in row_ids for rid in t["row_id"]]
        return batch.filter(pa.array(keep, pa.bool_())).select(["row_id", "raw"])
    keep = [
        not reason and rid not in dropped and ((key in eval_keys) == (split == "eval"))
        for reason, rid, key in zip(t["reason"], t["row_id"], t["prompt_key"])
    ]
    return batch.filter(pa.array(keep, pa.bool_())).select(rowlib.PAIR_SCHEMA.names)


class _ShardNames:
    """Shard file names ``<split>-NNNNN.parquet`` (a Ray Data FilenameProvider)."""

    def __init__(self, split: str) -> None:
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.split}-{task_index:05d}.parquet"

    def get_filename_for_block(self, block: Any, write_uuid: str, task_index: int, block_index: int) -> str:
        return self.get_filename_for_task(write_uuid, task_index)


def _run_pipeline(cfg: RunConfig, inputs: Inputs) -> Any:
    """read -> parse -> validate -> template -> tokenize, materialized (one output row per input row)."""
    d = cfg.data
    kwargs = {
        "model_cfg": cfg.model,
        "formats": inputs.formats,
        "fields": dict(d.fields),
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
    }
    import ray

    # Split the raw rows (one block per file after reading) so several tasks tokenize them.
    blocks = d.read_blocks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = inputs.read_dataset().repartition(blocks)
    return ds.map_batches(_process_batch, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=512).materialize()


def _decide(meta: Any, cfg: RunConfig) -> tuple[Any, frozenset[str], frozenset[str]]:
    """Mark duplicates in ``meta`` (reason ``duplicate``); return (meta, eval prompt keys, dropped row ids)."""
    file_errors = meta[meta["reason"] == "file_error"]
    if len(file_errors):
        raise DataFileError(file_errors["detail"].iloc[0])
    dropped: set[str] = set()
    if cfg.data.deduplicate:
        dups = rowlib.find_duplicates(list(meta["dedup_key"]), list(meta["reason"]))
        for pos, first in dups.items():
            meta.loc[pos, "reason"] = "duplicate"
            meta.loc[pos, "detail"] = f"same pair as {meta.at[first, 'source']} row {meta.at[first, 'index']}"
            dropped.add(meta.at[pos, "row_id"])
    kept = meta[meta["reason"] == ""]
    eval_keys = rowlib.eval_prompts(list(kept["prompt_key"]), fraction=cfg.data.eval_fraction, size=cfg.data.eval_size)
    return meta, frozenset(eval_keys), frozenset(dropped)


def _write_quarantine(processed: Any, meta: Any, path: Path) -> int:
    bad = meta[meta["reason"] != ""]
    ids = set(bad["row_id"])
    raws = {}
    if ids:
        part = processed.map_batches(_select, fn_kwargs={"row_ids": ids}, batch_format="pyarrow")
        raws = {r["row_id"]: r["raw"] for r in part.take_all()}
    records = ({**r, "raw": raws.get(r["row_id"], "")} for r in bad.to_dict("records"))
    return mf.write_quarantine(path, records)


def _write_splits(processed: Any, out: Path, cfg: RunConfig, eval_keys: frozenset, dropped: frozenset) -> dict:
    from ray.data import SaveMode

    splits = {}
    for split in ("train", "eval"):
        folder = out / split
        part = processed.map_batches(
            _select, fn_kwargs={"split": split, "eval_keys": eval_keys, "dropped": dropped}, batch_format="pyarrow"
        )
        part.repartition(cfg.data.num_shards).write_parquet(
            str(folder), filename_provider=_ShardNames(split), mode=SaveMode.OVERWRITE
        )
        folder.mkdir(parents=True, exist_ok=True)  # an empty split still gets its folder
        files = sorted(p.relative_to(out).as_posix() for p in folder.glob("*.parquet"))
        splits[split] = {"files": files}
    return splits


def _summary(meta: Any, splits: dict, eval_keys: frozenset) -> dict[str, Any]:
    kept = meta[meta["reason"] == ""]
    in_eval = kept["prompt_key"].isin(eval_keys)
    for split, rows in (("train", kept[~in_eval]), ("eval", kept[in_eval])):
        splits[split].update(rows=len(rows), prompts=int(rows["prompt_key"].nunique()))
    truncated = Counter(x for t in kept["truncated"] if t for x in t.split(","))
    return {
        "read": len(meta),
        "kept": len(kept),
        "quarantined": int((meta["reason"] != "").sum()),
        "reasons": dict(Counter(meta.loc[meta["reason"] != "", "reason"]).most_common()),
        "splits": splits,
        "lengths": {name: rowlib.length_stats(list(kept[f"{name}_len"])) for name in ("prompt", "chosen", "rejected")},
        "truncated": {k: truncated.get(k, 0) for k in ("prompt", "chosen", "rejected")},
    }


def _clear(out: Path) -> None:
    for name in ("train", "eval"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("manifest.json", "quarantine.jsonl"):
        (out / name).unlink(missing_ok=True)


def prepare(cfg: RunConfig, *, force: bool = False) -> dict[str, Any]:
    """Run the stage (or reuse its output when the fingerprint matches); returns the manifest."""
    start = time.perf_counter()
    out = data_dir(cfg.output_dir)
    inputs = resolve_inputs(cfg.data)
    tok_fp = mf.tokenizer_fingerprint(_tokenizer(cfg.model))
    parts = {
        "inputs": inputs.fingerprint,
        "formats": inputs.formats,
        "data": to_dict(cfg.data),
        "tokenizer": tok_fp,
        "code_version": mf.code_version(),
    }
    parts["data"].pop("path")  # the content is in inputs; moving a file does not change the rows' tokens
    fp = mf.fingerprint(parts)
    previous = mf.read_manifest(out / "manifest.json")
    if not force and mf.is_cache_hit(previous, fp, out):
        log.info("prepare: cache hit (fingerprint %s) in %s; use --force to redo", fp[:12], out)
        return {**previous, "cache_hit": True}
    for source, fmt in inputs.formats.items():
        log.info("prepare: %s: format %s (%s)", source, fmt, inputs.format_origin)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    from pipeline.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    with _ordered():
        return _run(cfg, inputs, out, fp, parts, tok_fp, start)


@contextlib.contextmanager
def _ordered() -> Any:
    """Ray Data keeps row order (deterministic shards) while the stage runs; the setting is restored after."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def _run(cfg: RunConfig, inputs: Inputs, out: Path, fp: str, parts: dict, tok_fp: dict, start: float) -> dict:
    """The Ray part of :func:`prepare`: pipeline, decisions, quarantine, bad-fraction check, splits, manifest."""
    processed = _run_pipeline(cfg, inputs)
    meta = processed.select_columns(META_COLUMNS).to_pandas()
    meta = meta.sort_values(["source", "index"], kind="stable", key=inputs.sort_key).reset_index(drop=True)
    meta, eval_keys, dropped = _decide(meta, cfg)
    quarantine_path = out / "quarantine.jsonl"
    n_quarantined = _write_quarantine(processed, meta, quarantine_path)
    bad = meta[meta["reason"] != ""]
    if len(meta) == 0:
        raise ConfigError(f"{inputs.describe()}: no rows read")
    if n_quarantined / len(meta) > cfg.data.max_bad_fraction:
        raise ConfigError(
            mf.too_many_bad_message(
                read=len(meta),
                bad_by_source=Counter(bad["source"]),
                reasons=Counter(bad["reason"]),
                limit=cfg.data.max_bad_fraction,
                quarantine_path=quarantine_path,
            )
        )
    splits = _write_splits(processed, out, cfg, eval_keys, dropped)
    summary = _summary(meta, splits, eval_keys)
    if summary["kept"] + summary["quarantined"] != summary["read"]:  # pragma: no cover - by construction
        raise RuntimeError(
            f"prepare lost rows: kept {summary['kept']} + quarantined {summary['quarantined']} "
            f"!= read {summary['read']}"
        )
    seconds = time.perf_counter() - start
    manifest = {
        "fingerprint": fp,
        "cache_hit": False,
        "code_version": parts["code_version"],
        "inputs": inputs.describe_all(Counter(meta["source"])),
        "format": inputs.format_summary(),
        "format_origin": inputs.format_origin,
        **summary,
        "blank_lines_skipped": inputs.blank_lines,
        "tokenizer": tok_fp,
        "limits": {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length},
        "data_dir": str(out),
        "quarantine_path": str(quarantine_path),
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(meta) / seconds, 1),
    }
    mf.write_json(out / "manifest.json", manifest)
    log.info(
        "prepare: read %d, kept %d (train %d, eval %d), quarantined %d %s -> %s",
        manifest["read"],
        manifest["kept"],
        splits["train"]["rows"],
        splits["eval"]["rows"],
        manifest["quarantined"],
        json.dumps(manifest["reasons"]),
        out,
    )
    return manifest


def main(cfg: RunConfig, args: Any) -> dict[str, Any]:
    """``tidpo prepare``: the manifest summary (without per-file detail) for the CLI to print."""
    manifest = prepare(cfg, force=bool(getattr(args, "force", False)))
    return {k: v for k, v in manifest.items() if k not in ("tokenizer",)}
