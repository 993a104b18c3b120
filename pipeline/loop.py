"""``tidpo run``: prepare -> SFT warm start -> N rounds of (generate anchors -> train -> evaluate).

Every stage is cached by fingerprint, so re-running the command resumes where it stopped. The reference stays
the SFT model (``model.reference_name`` overrides it). ``loop.compare`` runs several loss variants on the same
prepared data and SFT model, each under ``<output_dir>/compare/<name>/``, and writes one table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# Loss variants for loop.compare: a preset plus overrides (ablations of the paper preset).
VARIANTS: dict[str, dict[str, Any]] = {
    "dpo": {"loss.preset": "dpo"},
    "paper": {"loss.preset": "paper"},
    "official": {"loss.preset": "official"},
    "uniform": {"loss.preset": "paper", "loss.weighting": "uniform"},
    "no_triplet": {"loss.preset": "paper", "loss.gamma": 0.0},
    "no_prior": {"loss.preset": "paper", "loss.lam": 1.0},
    # The paper preset with the response's log-likelihood as the attribution target (not the last top logit).
    "logp_target": {"loss.preset": "paper", "loss.attribution_target": "response_logp"},
}
TABLE_KEYS = (
    "eval/synthetic/judge_greedy",
    "eval/synthetic/judge_sampled",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/kl/logratio_per_token",
    "eval/ifeval/prompt_level_loose_acc",
    "eval/truthfulqa/mc1",
    "eval/truthfulqa/mc2",
    "eval/diversity/distinct_2",
)


def variant_config(cfg: RunConfig, name: str) -> RunConfig:
    """The run config of one comparison variant (its own output folder, the same everything else).

    The base run's RPO term is kept, so every variant differs from the others only by its named switches.
    """
    from pipeline.config import replace

    if name not in VARIANTS:
        raise ConfigError(f"loop.compare: unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    overrides = {
        **VARIANTS[name],
        "loss.rpo_alpha": cfg.loss.rpo_alpha,
        "output_dir": str(Path(cfg.output_dir) / "compare" / name),
    }
    return replace(cfg, overrides)


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative symlink), replacing an older link."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def sft_warm_start(cfg: RunConfig, *, force: bool) -> str:
    """Supervised fine-tuning on the chosen responses; returns the model to start preference training from."""
    from pipeline.plan import plan
    from pipeline.train.inputs import build_job
    from pipeline.train.trainer import run_training

    if cfg.train.sft_steps <= 0:
        return cfg.model.name
    job = build_job(cfg, plan(cfg, "sft"))
    run_training(cfg, job, force=force)
    return str(job.model_dir)


def run_rounds(
    cfg: RunConfig, start_model: str, *, force: bool, start: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Evaluate the start (unless ``start``, its row, is given), then each round: anchors from the latest
    policy, train from it, evaluate it.

    The plan of round k says it all: it starts from round k-1's export (round 1: the SFT model), its anchors come
    from that policy, its reference is ``model.reference_name`` or the start model.
    """
    from pipeline.evaluate import evaluate
    from pipeline.plan import plan
    from pipeline.train.inputs import build_job
    from pipeline.train.trainer import run_training

    out = Path(cfg.output_dir)
    rows = [start if start is not None else evaluate_start(cfg, start_model)]
    for k in range(1, cfg.loop.rounds + 1):
        p = plan(cfg, "round", round_idx=k)
        job = dataclasses.replace(build_job(cfg, p, force=force), final_eval=False)  # evaluate() below measures it
        summary = run_training(cfg, job, force=force)
        _link(p.model_dir, out / "model")
        metrics = evaluate(cfg, model_path=str(p.model_dir), round_idx=k)
        rows.append(
            {
                "round": k,
                "stage": "train",
                "train_steps": summary["steps"],
                "train_tokens_per_s": summary["tokens_per_s"],
                "train_step_time_s": summary["step_time_s"],
                **_pick(metrics),
            }
        )
        log.info("round %d: %s", k, json.dumps(rows[-1]))
    return rows


def evaluate_start(cfg: RunConfig, start_model: str) -> dict[str, Any]:
    """Round 0's row: the start model evaluated before any preference training."""
    from pipeline.evaluate import evaluate

    return {"round": 0, "stage": "start", **_pick(evaluate(cfg, model_path=start_model, round_idx=0))}


def _pick(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in TABLE_KEYS}


def format_table(rows: list[dict[str, Any]], label: str = "round") -> str:
    """A plain-text table of the per-round (or per-variant) metrics that some row has."""
    keys = [k for k in TABLE_KEYS if any(r.get(k) is not None for r in rows)]
    cols = [label, *(k.removeprefix("eval/") for k in keys)]
    width = max(map(len, cols))
    lines = [" | ".join(f"{c:>{width}}" for c in cols)]
    for r in rows:
        cells = [str(r.get(label))] + ["n/a" if r.get(k) is None else f"{r[k]:.4f}" for k in keys]
        lines.append(" | ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def run_loop(cfg: RunConfig, *, force: bool = False) -> dict[str, Any]:
    """The whole loop (or the comparison, when ``loop.compare`` names variants); writes summary.json."""
    from pipeline.data.prepare import prepare
    from pipeline.ray_utils import ensure_ray

    start = time.time()
    where = ensure_ray(cfg.ray)
    out = Path(cfg.output_dir)
    prepare(cfg, force=force)
    start_model = sft_warm_start(cfg, force=force)
    result: dict[str, Any] = {"output_dir": str(out), "ray": where, "start_model": start_model}
    if cfg.loop.compare:
        start_row = evaluate_start(cfg, start_model)  # one start for every variant: the same model and data
        table = [{"variant": "start", **start_row}]
        for name in cfg.loop.compare:
            vcfg = variant_config(cfg, name)
            for shared in ("data", "sft"):
                if (out / shared).exists():
                    _link(out / shared, Path(vcfg.output_dir) / shared)
            rows = run_rounds(vcfg, start_model, force=force, start=start_row)
            table.append({"variant": name, **rows[-1]})
        result["compare"] = table
        result["table"] = format_table(table, "variant")
    else:
        rows = run_rounds(cfg, start_model, force=force)
        result["rounds"] = rows
        result["table"] = format_table(rows)
    result["wall_time_s"] = time.time() - start
    result["mlflow"] = _mlflow_hint(cfg)
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(result["table"])
    return result


def _mlflow_hint(cfg: RunConfig) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking import resolve_tracking_uri

    return f"mlflow ui --backend-store-uri {resolve_tracking_uri(cfg)}"


def main(cfg: RunConfig, args) -> dict[str, Any]:
    result = run_loop(cfg, force=getattr(args, "force", False))
    return {k: v for k, v in result.items() if k != "table"}
