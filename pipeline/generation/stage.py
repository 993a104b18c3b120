"""``tidpo generate``: anchors for a prepared split with a Ray Data actor pool of engines.

Reads ``<output_dir>/data/<split>/*.parquet``, runs :class:`~pipeline.generation.anchor_udf.AnchorGenerator`
with ``map_batches`` over ``generation.num_engines`` actors, and writes every input column plus the anchor
columns to ``<output_dir>/anchors/round-<k>/*.parquet`` with a ``manifest.json`` beside them (read the folder
with ``ray.data.read_parquet``, which keeps only ``.parquet`` files, or :func:`read_anchors`). For a train split other
than ``train`` the folder is ``round-<k>-<split>``.

Guarantees:
    - Row count out == in, checked by ``row_id`` after writing; otherwise the stage fails naming the rows.
    - A killed engine actor is restarted by Ray and its batch retried, at most ``generation.max_retries``
      times per actor; restarts are counted in the manifest (``engine_restarts``).
    - Cache: the manifest holds a fingerprint of (data files, model weights, sampling + anchor settings,
      engine); the same fingerprint is a cache hit unless ``force``.
    - Output appears atomically: written to a temporary folder, verified, then renamed.

Round sync (``generation.sync=round``, the loop's default): anchors of round k+1 come from the checkpoint
that round k exported, by calling this with ``round_idx=k+1`` and that folder as ``model_path``.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.generation.anchor_udf import FAULT_MARKER_ENV, AnchorGenerator
from pipeline.generation.engine import select_engine

log = logging.getLogger(__name__)


def resolve_model_path(cfg, model_path: str | None = None) -> str:
    """``model_path`` (checked), else the run's current policy: the generate stage's plan decides."""
    from pipeline.plan import plan

    return plan(cfg, "generate", model=model_path or None).init_model


def stage_fingerprint(cfg, split_dir: Path, model_path: str, kind: str) -> str:
    """Everything that changes the anchors: the data's content, the model's, the anchor settings, the engine."""
    from pipeline.fingerprint import digest, folder_fingerprint, model_fingerprint
    from pipeline.plan import anchor_settings

    return digest({
        "data": folder_fingerprint(split_dir, (".parquet",)),
        "model": model_fingerprint(model_path, cfg.model, cfg.seed),
        "anchors": anchor_settings(cfg),
        "engine": kind,
    })  # fmt: skip


def parquet_files(folder: Path) -> list[Path]:
    """The ``*.parquet`` files under ``folder`` (a manifest or stats beside them are not data)."""
    return sorted(p for p in Path(folder).rglob("*.parquet") if not p.name.startswith(("_", ".")))


def read_anchors(folder: str | Path, columns: list[str] | None = None):
    """An anchors folder (``anchors/round-<k>``) as one pyarrow Table."""
    import pyarrow as pa

    files = parquet_files(Path(folder))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {folder}")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def _row_ids(folder: Path) -> list[str]:
    return [str(x) for x in read_anchors(folder, ["row_id"]).column("row_id").to_pylist()]


def check_rows(in_ids: list[str], out_ids: list[str]) -> None:
    """Raise naming the rows when the output's row_ids are not exactly the input's (as a multiset)."""
    missing = collections.Counter(in_ids) - collections.Counter(out_ids)
    extra = collections.Counter(out_ids) - collections.Counter(in_ids)
    if missing or extra:
        raise RuntimeError(
            f"anchor stage: {len(in_ids)} rows in, {len(out_ids)} out; missing {sum(missing.values())} "
            f"(e.g. {sorted(missing)[:10]}), unexpected {sum(extra.values())} (e.g. {sorted(extra)[:10]}); "
            "see the engine actors' errors above"
        )


def _engine_stats(stats_dir: Path, num_engines: int) -> dict[str, Any]:
    per_engine = {f.stem: [json.loads(x) for x in f.read_text().splitlines() if x] for f in stats_dir.glob("*.jsonl")}
    lines = [x for batches in per_engine.values() for x in batches]
    starts = len(list(stats_dir.glob("*.start")))
    tokens, seconds = sum(x["tokens"] for x in lines), sum(x["seconds"] for x in lines)
    return {
        "engine_starts": starts,
        "engine_restarts": max(0, starts - num_engines),
        "batches": len(lines),
        "batches_per_engine": sorted((len(v) for v in per_engine.values()), reverse=True),
        "sampled_tokens": tokens,
        "engine_seconds": round(seconds, 3),
        "engine_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }


def _run_pool(cfg, split_dir: Path, out_dir: Path, model_path: str, version: str, kind: str, rows: int) -> None:
    """The Ray Data pipeline: read -> repartition -> map_batches(actor pool) -> write_parquet.

    The split is cut into about one block per batch (at least one per engine): a few large Parquet files
    otherwise arrive as one block, which only one actor of the pool would ever see.
    """
    import ray.data

    gen = cfg.generation
    gpus = gen.gpus_per_engine if kind == "vllm" and gen.tensor_parallel_size == 1 else 0
    if kind == "hf" and gen.gpus_per_engine > 0:
        from pipeline.generation.engine import gpu_available

        gpus = gen.gpus_per_engine if gpu_available() else 0
    blocks = max(gen.num_engines, math.ceil(rows / gen.batch_size))
    ds = ray.data.read_parquet(str(split_dir)).repartition(blocks)
    ds = ds.map_batches(
        AnchorGenerator,
        fn_constructor_kwargs={
            "cfg": cfg, "model_path": model_path, "version": version, "kind": kind,
            "stats_dir": str(out_dir / "_stats"), "fault_marker": os.environ.get(FAULT_MARKER_ENV),
        },
        batch_size=gen.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=gen.num_engines),
        num_cpus=gen.cpus_per_engine,
        num_gpus=gpus,
        resources=gen.resources or None,  # custom resources pin the actors to the nodes that have them
        # Bounded (Ray Data's default is unlimited): a replaced actor reruns its batch at most max_retries times.
        # Passed as ray_remote_args, which Ray 2.60 marks deprecated (removal in 2.64) with no named successor.
        max_restarts=gen.max_retries,
        max_task_retries=gen.max_retries,
    )  # fmt: skip
    ds.write_parquet(str(out_dir))


def generate_anchors(cfg, *, split: str = "train", round_idx: int = 0, model_path: str | None = None,
                     force: bool = False) -> dict[str, Any]:  # fmt: skip
    """Generate anchors for ``<output_dir>/data/<split>``; returns the manifest (``cached`` says if reused)."""
    from pipeline.plan import Layout
    from pipeline.ray_utils import ensure_ray

    layout = Layout(Path(cfg.output_dir))
    split_dir = layout.split(split)
    if not parquet_files(split_dir):
        raise FileNotFoundError(f"no prepared data under {split_dir}: run `tidpo prepare` first")
    model_path = resolve_model_path(cfg, model_path)
    kind, reason = select_engine(cfg.generation)
    log.info("generation engine: %s (%s); policy %s", kind, reason, model_path)
    final = layout.anchors(round_idx, split)
    name = final.name
    fingerprint = stage_fingerprint(cfg, split_dir, model_path, kind)
    manifest_path = final / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            log.info("anchors %s: cache hit (fingerprint %s); --force to redo", final, fingerprint)
            return {**manifest, "cached": True}
    from pipeline.fingerprint import model_fingerprint

    version = f"{model_path}@{model_fingerprint(model_path, cfg.model, cfg.seed)}"
    tmp = final.with_name(f"{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_ray(cfg.ray)
    in_ids = _row_ids(split_dir)
    start = time.perf_counter()
    try:
        _run_pool(cfg, split_dir, tmp, model_path, version, kind, len(in_ids))
        wall = time.perf_counter() - start
        out_ids = _row_ids(tmp)
        check_rows(in_ids, out_ids)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written round is ever left behind
        raise
    stats = _engine_stats(tmp / "_stats", cfg.generation.num_engines)
    shutil.rmtree(tmp / "_stats")
    manifest = {
        "split": split, "round": round_idx, "rows_in": len(in_ids), "rows_out": len(out_ids),
        "engine": kind, "engine_reason": reason, "num_engines": cfg.generation.num_engines,
        "model_path": str(model_path), "anchor_version": version, "fingerprint": fingerprint,
        "seed": cfg.generation.seed, "anchor_context": cfg.loss.anchor_context,
        "anchor_prefix_tokens": cfg.loss.anchor_prefix_tokens, "wall_seconds": round(wall, 3),
        "tokens_per_s": round(stats["sampled_tokens"] / wall, 1) if wall > 0 else None,
        "retries": stats["engine_restarts"], **stats, "data_dir": str(final), "cached": False,
    }  # fmt: skip
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log.info("anchors: %d rows -> %s (%.1f tokens/s)", len(out_ids), final, manifest["tokens_per_s"] or 0)
    return manifest


def main(cfg, args) -> dict[str, Any]:
    """``tidpo generate [CONFIG] [k=v...] [--model DIR] [--round K] [--force]``."""
    return generate_anchors(
        cfg, round_idx=getattr(args, "round", 0) or 0, model_path=getattr(args, "model", None),
        force=bool(getattr(args, "force", False)),
    )  # fmt: skip
