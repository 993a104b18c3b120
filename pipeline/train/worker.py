"""The Ray Train worker: setup -> loop -> report. It reads only its ``config`` argument.

``config = {"cfg": RunConfig, "job": WorkerJob}``: the run config and what the driver resolved (the stage's
:class:`~pipeline.plan.StagePlan`, the MLflow run, whether there is an eval split). The worker takes no
decision of its own: policy, reference, anchors, steps, learning rate and seeds all come from the plan.

Data order: each worker holds the whole train split (sorted by ``row_id``, a canonical order whatever order
Ray Data delivers blocks in) and walks one permutation per epoch, seeded by the run seed and the epoch, the
same on every rank (:func:`epoch_order`). Optimizer step s of an epoch consumes rows ``[s*G, (s+1)*G)`` of the
permutation (``G = micro_batch_size * grad_accum * num_workers``); micro-batch a of rank r takes its slice
``(a * world + r) * micro``. A global batch is therefore the same set of rows for any (workers, accumulation)
split, and a resumed run, which restores (epoch, micro-batch index), sees exactly the rows the uninterrupted run
would. The rows left over at the end of an epoch (fewer than G) are dropped; the permutation differs per
epoch, so every row is used over the run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.batching import collate_pairs, rows_from_columns
from pipeline.config import RunConfig
from pipeline.train import state as ckpt
from pipeline.train.engine import export_model, init_engine, wrap_reference
from pipeline.train.engine import step as optimizer_step
from pipeline.train.metrics import MetricWindow, peak_memory_mb
from pipeline.train.step import StepModels, eval_step, preference_step, sft_step, step_autocast
from tidpo import metric_sums

log = logging.getLogger(__name__)


def _load_models(cfg: RunConfig, plan, device: torch.device):
    from pipeline.models import apply_lora, build_model, build_tokenizer

    tok = build_tokenizer(cfg.model)
    policy = build_model(cfg.model, len(tok), name=plan.init_model, seed=plan.seed)
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora_r > 0:
        policy = apply_lora(cfg.model, policy)
    reference = None
    if plan.reference.worker_model:
        reference = build_model(cfg.model, len(tok), name=plan.reference.worker_model, seed=plan.seed).to(device)
    return tok, policy.to(device), reference


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the train split's rows for ``epoch`` (same on every rank, independent of world size)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def micro_batch_rows(order: np.ndarray, index: int, *, micro: int, accum: int, world: int, rank: int) -> np.ndarray:
    """Row positions of this rank's ``index``-th micro-batch of the epoch (see the module docstring)."""
    step, a = divmod(index, accum)
    start = step * micro * accum * world + (a * world + rank) * micro
    return order[start : start + micro]


def micro_batches_per_epoch(num_rows: int, *, micro: int, accum: int, world: int) -> int:
    return (num_rows // (micro * accum * world)) * accum


def read_split(shard):
    """The whole dataset behind an (unsplit) Ray Data iterator as one pyarrow Table sorted by ``row_id``."""
    import pyarrow as pa

    tables = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
    if not tables:
        raise ValueError("the train split is empty")
    return pa.concat_tables(tables).sort_by("row_id")


def _batches(table, plan, cfg: RunConfig, epoch: int, skip: int, device: torch.device, pad_id: int):
    """Yield (micro-batch index, collated batch on device) for one epoch, from micro-batch ``skip`` on."""
    tc, world, rank = cfg.train, _world(), _rank()
    order = epoch_order(table.num_rows, plan.seed, epoch)
    total = micro_batches_per_epoch(table.num_rows, micro=tc.micro_batch_size, accum=tc.grad_accum, world=world)
    if total == 0:
        raise ValueError(
            f"the train split has {table.num_rows} rows, fewer than one global batch "
            f"({tc.micro_batch_size} x {tc.grad_accum} x {world} workers)"
        )
    for index in range(skip, total):
        positions = micro_batch_rows(order, index, micro=tc.micro_batch_size, accum=tc.grad_accum, world=world,
                                     rank=rank)  # fmt: skip
        rows = rows_from_columns(table.take(positions).to_pydict())
        yield index, _collate(rows, plan, pad_id, device)


def _collate(rows, plan, pad_id: int, device: torch.device, *, anchors: bool | None = None):
    anchors = plan.anchors.in_batches if anchors is None else anchors
    batch = collate_pairs(rows, pad_id, with_anchor=anchors, with_reference=plan.reference.precompute)
    batch["rows"] = rows
    return _to_device(batch, device)


def _eval_batches(shard, plan, cfg: RunConfig, device: torch.device, pad_id: int):
    """This worker's eval shard in micro-batches; every worker stops together (no collective hang)."""
    it = iter(shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"))
    while True:
        raw = next(it, None)
        flag = torch.tensor([0 if raw is None else 1], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) == 0:
            return
        yield _collate(rows_from_columns(raw), plan, pad_id, device, anchors=False)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


def _attach_anchors(cfg: RunConfig, plan, engine, models, batch, tok, feed, tracker, epoch: int, index: int):
    """Anchors made during training (``online``: sampled here; ``steps``: from the generation actors, ``feed``)
    go into ``batch["anchor"]`` and ``workers/anchors_rank<r>.jsonl``."""
    step = engine.global_steps
    if plan.anchors.source == "online":
        from pipeline.train.anchors import anchor_seed, online_anchor_pack

        pack, anchors = online_anchor_pack(cfg, models.policy, tok, batch["rows"], seed=anchor_seed(cfg, step))
        version = step
    elif feed is not None:
        pack, anchors, version = feed.attach(batch["rows"], epoch, index, step, tok.pad_token_id)
    else:
        return
    batch["anchor"] = _to_device(pack, next(models.policy.parameters()).device)
    tracker.record_anchors(epoch, index, step, version, anchors)


def _step_anchors(cfg: RunConfig, plan, table, engine):
    """The generation-actor hook of ``generation.sync=steps`` (None for every other anchor source)."""
    if plan.anchors.source != "steps":
        return None
    from pipeline.train.anchors import StepAnchors

    return StepAnchors(cfg, plan, table, engine.module, start_step=engine.global_steps)


def _micro_step(cfg: RunConfig, plan, engine, models, batch, generator, tok):
    if plan.mode == "sft":
        loss, per_example = sft_step(models, batch)
        return loss, metric_sums(per_example, {})
    obj = preference_step(cfg.loss, models, batch, generator=generator)
    return obj.loss, metric_sums(obj.metrics, obj.counts)


def run_eval(cfg: RunConfig, plan, models: StepModels, shard, device, pad_id: int) -> dict[str, float]:
    """Held-out metrics over this worker's eval shard, summed over workers (SFT: the chosen responses' NLL)."""
    if shard is None:
        return {}
    sums: dict[str, torch.Tensor] = {}
    models.policy.eval()
    for batch in _eval_batches(shard, plan, cfg, device, pad_id):
        if plan.mode == "sft":
            with torch.no_grad():
                per_example = {"eval/loss": sft_step(models, batch)[1]["loss"]}
        else:
            per_example = eval_step(cfg.loss, models, batch)
        for k, v in metric_sums(per_example, {}).items():
            sums[k] = sums.get(k, 0) + v.detach().cpu()
    models.policy.train()
    return MetricWindow.reduce_global(sums) if sums else {}


def _register_worker(plan, rank: int, state: ckpt.TrainState) -> None:
    """Write ``<stage>/workers/rank<r>.json`` (pid, node, attempt): where each live worker runs, for operators
    (``py-spy dump --pid``) and for the fault-injection test, which kills exactly this run's rank 0."""
    import os
    import socket

    import ray

    folder = plan.stage_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "attempt": state.restarts,
        "started_at": time.time(),
    }
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / f"rank{rank}.json")


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see module docstring)."""
    import ray.train

    cfg, job = config["cfg"], config["job"]
    plan = job.plan
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(plan.train_seed)
    tok, policy, reference = _load_models(cfg, plan, device)
    if reference is not None:
        reference = wrap_reference(cfg.train, reference)
    engine = init_engine(cfg.train, policy, total_steps=plan.max_steps, lr=plan.lr)
    models = StepModels(
        engine.module, reference, plan.reference.adapters_off, shared_attribution=cfg.train.shared_attribution
    )
    if rank == 0:
        log.info("attribution pass: %s", "shared forward" if models.shared_attribution else "separate forward")
    state = ckpt.restore(engine, rank)
    _register_worker(plan, rank, state)
    generator = torch.Generator().manual_seed(plan.train_seed * 1000 + rank)
    table = read_split(ray.train.get_dataset_shard("train"))
    eval_shard = ray.train.get_dataset_shard("eval") if job.has_eval else None
    tracker = _Tracker(job, rank, cfg.train.report_interval_s)
    window = MetricWindow()
    feed = _step_anchors(cfg, plan, table, engine)
    engine.train()
    while engine.global_steps < plan.max_steps:
        for index, batch in _batches(table, plan, cfg, state.epoch, state.batch_in_epoch, device, tok.pad_token_id):
            tracker.record_rows(state.epoch, index, batch["rows"])
            with window.timed("anchors"):
                _attach_anchors(cfg, plan, engine, models, batch, tok, feed, tracker, state.epoch, index)
            with window.timed("forward"), step_autocast(cfg.train, device.type):
                loss, sums = _micro_step(cfg, plan, engine, models, batch, generator, tok)
            state.batch_in_epoch = index + 1
            if _any_nonfinite(loss):
                state.nonfinite += 1
                if state.nonfinite > cfg.train.max_nonfinite_steps:
                    raise FloatingPointError(f"{state.nonfinite} non-finite losses (limit train.max_nonfinite_steps)")
                continue
            window.add(sums, num_tokens=int(batch["pair"]["attention_mask"].sum()))
            boundary = engine.is_gradient_accumulation_boundary()
            with window.timed("backward"):
                engine.backward(loss)
            with window.timed("optimizer"):
                grad_norm = optimizer_step(engine)
            if not boundary:
                continue
            step = engine.global_steps
            if feed is not None:
                feed.after_step(step, engine.module)
            metrics = window.flush(engine, state, grad_norm) if step % cfg.train.log_every == 0 else None
            if metrics is not None and feed is not None:
                metrics.update(feed.metrics())
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics = {**(metrics or {}), **run_eval(cfg, plan, models, eval_shard, device, tok.pad_token_id)}
            save = cfg.train.save_every and step % cfg.train.save_every == 0
            tracker.report(step, metrics, engine if save else None, state)
            if step >= plan.max_steps:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
    if feed is not None:
        feed.close()
    final = run_eval(cfg, plan, models, eval_shard, device, tok.pad_token_id) if job.final_eval else {}
    export_model(
        engine, tok, str(plan.model_dir), rank=rank, zero_stage=cfg.train.zero_stage, merge_lora=cfg.model.merge_lora
    )
    tracker.finish(engine.global_steps, final, state)


class _Tracker:
    """Rank 0 writes metrics.jsonl and MLflow; every rank calls ``ray.train.report`` (with checkpoints)."""

    def __init__(self, job, rank: int, report_interval_s: float):
        self.rank, self.job, self.report_interval_s = rank, job, report_interval_s
        self.last_report = time.time()
        self.path = job.plan.metrics_path
        self.rows_path = job.plan.stage_dir / "workers" / f"rows_rank{rank}.jsonl"
        self.anchors_path = job.plan.stage_dir / "workers" / f"anchors_rank{rank}.jsonl"
        self.mlflow = None
        self.start = time.time()
        if rank == 0 and job.mlflow:
            import mlflow

            mlflow.set_tracking_uri(job.mlflow["uri"])
            self.mlflow = mlflow.tracking.MlflowClient(job.mlflow["uri"])

    def record_rows(self, epoch: int, index: int, rows) -> None:
        """Append (epoch, micro-batch index, row_ids) to ``workers/rows_rank<r>.jsonl``: the data order of this
        rank, auditable (the shuffling and resume tests read it; a restarted worker appends the steps it redoes)."""
        record = {"epoch": epoch, "index": index, "row_ids": [str(r["row_id"]) for r in rows]}
        with self.rows_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def record_anchors(self, epoch: int, index: int, step: int, version: int, anchors) -> None:
        """Append the anchors a micro-batch trained with, and the weights version (optimizer steps) they come
        from, to ``workers/anchors_rank<r>.jsonl`` (the exactness and resume tests compare them)."""
        record = {"epoch": epoch, "index": index, "step": step, "version": version, "anchor_ids": anchors}
        with self.anchors_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

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
            self.mlflow.log_batch(self.job.mlflow["run_id"], metrics=batch)

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
            Path(self.job.summary_path).write_text(json.dumps(summary, indent=2))
        ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, bool))})
