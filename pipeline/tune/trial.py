"""One Tune trial: the sampled keys applied to the base config, then the ``tidpo train`` job on Ray Train.

The trial is a thin Tune function that drives a ``TorchTrainer`` (Ray 2.60, Train V2: a Trainer is no longer
passed to the Tuner). The workers' ``ray.train.report`` metrics reach Tune through
:class:`MetricReportCallback`, a ``TuneReportCallback`` that forwards only reports carrying the searched metric
(held-out metrics exist only at eval steps; Tune rejects results without the metric the scheduler watches).
The trial resolves its own plan (stage ``trial``) and inputs: what the base config needs was built once on the
search driver, so those are cache hits; it trains into ``<output_dir>/tune/trials/<trial_id>/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import RunConfig, from_dict, replace
from pipeline.plan import Layout

log = logging.getLogger(__name__)


class MetricReportCallback(TuneReportCallback):
    """Forward to Tune only the reports that contain ``metric`` (and ``step``, the scheduler's time axis)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and self.metric in metrics[0] and "step" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trials_dir(cfg: RunConfig) -> Path:
    return Layout(Path(cfg.output_dir)).tune / "trials"


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The trial's complete config: the base with the sampled dotted keys applied (validated)."""
    return replace(base, params)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], init_model: str, parent_run_id: str | None) -> None:
    """Tune function trainable (bound with ``tune.with_parameters``): train one config, metrics go to Tune."""
    from ray import tune

    from pipeline.plan import plan
    from pipeline.train.inputs import build_job
    from pipeline.train.trainer import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(base), params)
    job = build_job(cfg, plan(cfg, "trial", trial_id=trial_id, model=init_model))
    log.info("trial %s: %s -> %s", trial_id, params, job.stage_dir)
    summary_path = job.stage_dir / "summary.json"
    before = json.loads(summary_path.read_text()) if summary_path.exists() else None
    summary = run_training(
        cfg,
        job,
        callbacks=[MetricReportCallback(cfg.tune.metric)],
        mlflow_parent_id=parent_run_id,
        progress=False,
    )
    if before is not None and summary == before:
        # A resumed search restarted a trial whose training had finished (the driver died before Tune recorded
        # it): run_training was a cache hit and reported nothing, so hand Tune the finished run's final metrics.
        tune.report({**summary["final"], "step": summary["steps"], "final": True, "cached": True})
