"""Materialising what a training run reads, as its plan says: prepared data, anchors, reference log-probs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.plan import StagePlan, describe, plan
from pipeline.train.trainer import TrainJob, run_training

log = logging.getLogger(__name__)


def build_job(cfg: RunConfig, p: StagePlan, *, force: bool = False) -> TrainJob:
    """Prepare (a cache hit when done), generate column anchors and precompute reference log-probs where the plan
    asks for them (each cached by its fingerprint; ``force`` regenerates the anchors) -> the run's TrainJob."""
    from pipeline.data.prepare import prepare

    prepare(cfg)
    train_path, eval_path = p.train_split, p.eval_split
    if p.anchors.in_batches:
        from pipeline.generation.stage import generate_anchors

        generate_anchors(cfg, round_idx=p.round_idx, model_path=p.anchors.generate_from, force=force)
        train_path = p.anchors.folder
    if p.reference.precompute:
        from pipeline.train.reference import precompute_reference_splits

        refs = precompute_reference_splits(
            cfg, {"train": train_path, "eval": eval_path}, p.reference.model, p.layout.cache
        )
        train_path, eval_path = refs["train"], refs["eval"]
    log.info("train inputs: data %s; %s", train_path, describe(p))
    return TrainJob(plan=p, train_path=Path(train_path), eval_path=Path(eval_path))


def train(cfg: RunConfig, *, init_model: str | None = None, force: bool = False) -> dict[str, Any]:
    """``tidpo train``: one preference-training run into ``<output_dir>/train/``."""
    from pipeline.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    job = build_job(cfg, plan(cfg, "train", model=init_model))
    return run_training(cfg, job, force=force)


def main(cfg: RunConfig, args) -> dict[str, Any]:
    summary = train(cfg, init_model=getattr(args, "model", None), force=getattr(args, "force", False))
    return {k: summary[k] for k in ("mode", "model_dir", "steps", "wall_time_s", "tokens_per_s", "final", "restarts")}
