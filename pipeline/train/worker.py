"""The Ray Train worker: setup -> loop -> report. It reads only its ``config`` argument.

``config = {"run": <RunConfig as a dict>, "job": {...}}`` where ``job`` carries what the driver resolved:
``mode`` (``preference`` | ``sft``), ``init_model`` (folder or ``tiny``), ``ref_model`` (folder, ``tiny`` or
None when reference log-probs are precomputed), ``model_dir`` (export folder), ``metrics_path``
(rank 0 appends one JSON line per logged step), ``mlflow`` (``{"uri", "run_id"}`` or None), ``max_steps``,
``lr`` and ``with_anchor``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.batching import collate_pairs, rows_from_columns
from pipeline.config import RunConfig, from_dict
from pipeline.train import state as ckpt
from pipeline.train.engine import export_model, init_engine, wrap_reference
from pipeline.train.engine import step as optimizer_step
from pipeline.train.metrics import MetricWindow, peak_memory_mb
from pipeline.train.step import StepModels, eval_step, preference_step, sft_step
from tidpo import metric_sums

log = logging.getLogger(__name__)


def _load_models(cfg: RunConfig, job: dict[str, Any], device: torch.device):
    from pipeline.models import build_model, build_tokenizer

    tok = build_tokenizer(cfg.model)
    policy = build_model(cfg.model, len(tok), name=job["init_model"], seed=cfg.seed)
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.model.lora_r > 0
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            policy,
            LoraConfig(
                r=cfg.model.lora_r,
                lora_alpha=cfg.model.lora_alpha,
                lora_dropout=cfg.model.lora_dropout,
                target_modules=list(cfg.model.lora_target_modules),
            ),
        )
    reference = None
    if job["ref_model"] and not (lora and cfg.model.reference == "lora"):
        reference = build_model(cfg.model, len(tok), name=job["ref_model"], seed=cfg.seed).to(device)
    return tok, policy.to(device), reference, lora and cfg.model.reference == "lora"


def _batches(shard, cfg: RunConfig, epoch: int, skip: int, device: torch.device, pad_id: int, with_anchor: bool):
    """Yield (batch_index, collated batch on device) for one epoch, skipping ``skip`` already-used batches.

    Every worker ends the epoch together: a shard that runs dry first tells the others (no collective hang).
    """
    it = iter(
        shard.iter_batches(
            batch_size=cfg.train.micro_batch_size, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=None
        )
    )
    index = 0
    while True:
        raw = next(it, None)
        flag = torch.tensor([0 if raw is None else 1], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) == 0:
            return
        if index >= skip:
            rows = rows_from_columns(raw)
            batch = collate_pairs(rows, pad_id, with_anchor=with_anchor)
            batch["rows"] = rows
            yield index, _to_device(batch, device)
        index += 1


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _any_nonfinite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _micro_step(cfg: RunConfig, job, engine, models, batch, generator, tok=None):
    if job["mode"] == "preference" and cfg.loss.uses_triplet and cfg.train.anchors == "online":
        from pipeline.train.anchors import online_anchor_pack

        pack = online_anchor_pack(
            cfg, models.policy, tok, batch["rows"], seed=cfg.generation.seed + engine.global_steps
        )
        batch["anchor"] = _to_device(pack, next(models.policy.parameters()).device)
    if job["mode"] == "sft":
        loss, per_example = sft_step(models, batch)
        return loss, metric_sums(per_example, {})
    obj = preference_step(cfg.loss, models, batch, generator=generator)
    return obj.loss, metric_sums(obj.metrics, obj.counts)


def run_eval(cfg: RunConfig, models: StepModels, shard, device, pad_id: int, mode: str) -> dict[str, float]:
    """Held-out metrics over this worker's eval shard, summed over workers (SFT: the chosen responses' NLL)."""
    if shard is None:
        return {}
    sums: dict[str, torch.Tensor] = {}
    models.policy.eval()
    for _, batch in _batches(shard, cfg, 0, 0, device, pad_id, with_anchor=False):
        if mode == "sft":
            with torch.no_grad():
                per_example = {"eval/loss": sft_step(models, batch)[1]["loss"]}
        else:
            per_example = eval_step(cfg.loss, models, batch)
        for k, v in metric_sums(per_example, {}).items():
            sums[k] = sums.get(k, 0) + v.detach().cpu()
    models.policy.train()
    return MetricWindow.reduce_global(sums) if sums else {}


def _register_worker(job: dict[str, Any], rank: int, state: ckpt.TrainState) -> None:
    """Write ``<stage>/workers/rank<r>.json`` (pid, node, attempt): where each live worker runs, for operators
    (``py-spy dump --pid``) and for the fault-injection test, which kills exactly this run's rank 0."""
    import os
    import socket

    folder = Path(job["metrics_path"]).parent / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "attempt": state.restarts,
        "started_at": time.time(),
    }
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / f"rank{rank}.json")


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see module docstring)."""
    import ray.train

    cfg, job = from_dict(config["run"]), config["job"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    tok, policy, reference, lora_ref = _load_models(cfg, job, device)
    if reference is not None:
        reference = wrap_reference(cfg.train, reference)
    engine = init_engine(cfg.train, policy, total_steps=job["max_steps"], lr=job["lr"])
    models = StepModels(engine.module, reference, lora_ref, shared_attribution=cfg.train.shared_attribution)
    if rank == 0:
        log.info("attribution pass: %s", "shared forward" if models.shared_attribution else "separate forward")
    state = ckpt.restore(engine, rank)
    _register_worker(job, rank, state)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if job.get("has_eval") else None
    tracker = _Tracker(job, rank, cfg.train.report_interval_s)
    window = MetricWindow()
    engine.train()
    while engine.global_steps < job["max_steps"]:
        batches = _batches(
            train_shard, cfg, state.epoch, state.batch_in_epoch, device, tok.pad_token_id, job["with_anchor"]
        )
        for index, batch in batches:
            loss, sums = _micro_step(cfg, job, engine, models, batch, generator, tok)
            state.batch_in_epoch = index + 1
            if _any_nonfinite(loss):
                state.nonfinite += 1
                if state.nonfinite > cfg.train.max_nonfinite_steps:
                    raise FloatingPointError(f"{state.nonfinite} non-finite losses (limit train.max_nonfinite_steps)")
                continue
            window.add(sums, num_tokens=int(batch["pair"]["attention_mask"].sum()))
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            grad_norm = optimizer_step(engine)
            if not boundary:
                continue
            step = engine.global_steps
            metrics = window.flush(engine, state, grad_norm) if step % cfg.train.log_every == 0 else None
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics = {
                    **(metrics or {}),
                    **run_eval(cfg, models, eval_shard, device, tok.pad_token_id, job["mode"]),
                }
            save = cfg.train.save_every and step % cfg.train.save_every == 0
            tracker.report(step, metrics, engine if save else None, state)
            if step >= job["max_steps"]:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
    final = run_eval(cfg, models, eval_shard, device, tok.pad_token_id, job["mode"])
    export_model(
        engine, tok, job["model_dir"], rank=rank, zero_stage=cfg.train.zero_stage, merge_lora=cfg.model.merge_lora
    )
    tracker.finish(engine.global_steps, final, state)


class _Tracker:
    """Rank 0 writes metrics.jsonl and MLflow; every rank calls ``ray.train.report`` (with checkpoints)."""

    def __init__(self, job: dict[str, Any], rank: int, report_interval_s: float):
        self.rank, self.job, self.report_interval_s = rank, job, report_interval_s
        self.last_report = time.time()
        self.path = Path(job["metrics_path"])
        self.mlflow = None
        self.start = time.time()
        if rank == 0 and job.get("mlflow"):
            import mlflow

            mlflow.set_tracking_uri(job["mlflow"]["uri"])
            self.mlflow = mlflow.tracking.MlflowClient(job["mlflow"]["uri"])

    def report(self, step: int, metrics: dict[str, float] | None, engine, state: ckpt.TrainState) -> None:
        import ray.train

        if metrics is None and engine is None:
            return
        metrics = {"step": step, **(metrics or {})}
        if self.rank == 0:
            self._log(step, metrics)
        if engine is None:
            # eval steps always (Tune's schedulers need them); other logged steps when the interval has passed
            # on any rank (one all-reduce, so every rank takes the same decision: report is collective)
            if self._report_due() or any(k.startswith("eval/") for k in metrics):
                ray.train.report(metrics)
                self.last_report = time.time()
            return
        with ckpt.saved(engine, state, self.rank) as checkpoint:
            ray.train.report(metrics, checkpoint=checkpoint)
        self.last_report = time.time()

    def _report_due(self) -> bool:
        if self.report_interval_s == 0:  # the same config on every rank: no collective needed
            return True
        due = torch.tensor([float(time.time() - self.last_report >= self.report_interval_s)])
        if dist.is_initialized():
            dist.all_reduce(due, op=dist.ReduceOp.MAX)
        return bool(due.item())

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"]
            self.mlflow.log_batch(self.job["mlflow"]["run_id"], metrics=batch)

    def finish(self, step: int, final: dict[str, float], state: ckpt.TrainState) -> None:
        import ray.train

        summary = {
            "step": step,
            "final": True,
            **final,
            "restarts": state.restarts,
            "resumed_from_step": state.resumed_from,
            "nonfinite_skipped": state.nonfinite,
            "peak_memory_mb": peak_memory_mb(),
        }
        if self.rank == 0:
            self._log(step, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
            Path(self.job["summary_path"]).write_text(json.dumps(summary, indent=2))
        ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, bool))})
