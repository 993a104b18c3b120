"""``tidpo train``: the driver around the Ray Train worker (``pipeline.train.worker.train_loop``).

It resolves inputs (prepared data, anchors, reference log-probs), starts or joins Ray, opens the MLflow run,
runs a ``TorchTrainer`` with a ``FailureConfig`` and checkpointing, shows progress, and writes
``<stage_dir>/summary.json``. Re-running the same command after the driver died resumes from the last
checkpoint: Ray Train V2 resumes a run found under the same (storage_path, name).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, flatten, to_dict, to_yaml
from pipeline.plan import StagePlan, describe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """One training run: its plan and the data it reads (the split, or the anchors / reference-cache folder
    that the driver materialised from it; see :func:`pipeline.train.inputs.build_job`)."""

    plan: StagePlan
    train_path: Path
    eval_path: Path | None
    # the worker's held-out pass after the last step (summary["final"], what Tune reports); the loop turns it off,
    # since its evaluate() of the exported model right after computes the same preference metrics and more
    final_eval: bool = True

    @property
    def stage_dir(self) -> Path:
        return self.plan.stage_dir

    @property
    def model_dir(self) -> Path:
        return self.plan.model_dir


@dataclass(frozen=True)
class WorkerJob:
    """What the Ray Train worker receives beside the run config (typed, as the driver resolved it)."""

    plan: StagePlan
    has_eval: bool
    final_eval: bool
    mlflow: dict[str, str] | None
    summary_path: Path


def _progress(metrics_path: Path, total: int, stop: threading.Event) -> None:
    """Driver progress bar fed by rank 0's metrics.jsonl: step, loss, ETA."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
    seen = 0
    while not stop.is_set():
        if metrics_path.exists():
            lines = metrics_path.read_text().split("\n")[:-1]  # complete lines only: rank 0 may be mid-write
            for line in lines[seen:]:
                rec = json.loads(line)
                bar.n = min(total, int(rec.get("step", bar.n)))
                if "loss" in rec:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec.get('rewards/accuracies', float('nan')):.2f}")
                bar.refresh()
            seen = len(lines)
        stop.wait(1.0)
    bar.close()


def _mlflow_run(cfg: RunConfig, job: TrainJob, parent_run_id: str | None = None) -> dict[str, str] | None:
    """Create this job's MLflow run (a nested child of ``parent_run_id`` when given, e.g. a Tune search)."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from pipeline.tracking import mlflow_setup

    uri, experiment_id = mlflow_setup(cfg)
    name = cfg.tracking.run_name or f"{job.stage_dir.name}-{job.plan.mode}"
    tags = {"tidpo.stage": job.plan.mode, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = mlflow.MlflowClient(uri).create_run(experiment_id, run_name=name, tags=tags)
    client = mlflow.MlflowClient(uri)
    for k, v in flatten(to_dict(cfg)).items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    client.log_text(run.info.run_id, to_yaml(cfg), "config.yaml")
    return {"uri": uri, "run_id": run.info.run_id}


def _inputs(cfg: RunConfig, job: TrainJob) -> dict[str, Any]:
    """What a finished run was trained from, by content (a cache hit needs the same config AND these)."""
    from pipeline.fingerprint import folder_fingerprint, model_fingerprint

    plan = job.plan
    ref = plan.reference.model
    return {
        "train": folder_fingerprint(job.train_path, (".parquet",)),
        "eval": folder_fingerprint(job.eval_path, (".parquet",)) if _has_rows(job.eval_path) else None,
        "init": model_fingerprint(plan.init_model, cfg.model, plan.seed),
        "ref": model_fingerprint(ref, cfg.model, plan.seed) if ref else None,
        "plan": {"reference": plan.reference.kind, "anchors": plan.anchors.source, "steps": plan.max_steps},
    }


def _has_rows(path: Path | None) -> bool:
    return path is not None and any(Path(path).rglob("*.parquet"))


def _datasets(job: TrainJob) -> dict[str, Any]:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # the training bar is the driver's view
    out = {"train": ray.data.read_parquet(str(job.train_path))}
    if _has_rows(job.eval_path):
        out["eval"] = ray.data.read_parquet(str(job.eval_path))
    return out


def run_training(
    cfg: RunConfig,
    job: TrainJob,
    *,
    force: bool = False,
    callbacks: list[Any] | None = None,
    mlflow_parent_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one training job to completion (or resume it) and return its summary.

    ``callbacks`` go to the trainer's ``ray.train.RunConfig`` (Tune passes a ``TuneReportCallback``);
    ``mlflow_parent_id`` nests the job's MLflow run under a parent run; ``progress`` shows the driver's bar.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.worker import train_loop

    plan = job.plan
    summary_path = job.stage_dir / "summary.json"
    inputs = _inputs(cfg, job)
    if summary_path.exists() and not force:
        done = json.loads(summary_path.read_text())
        if done.get("completed") and done.get("config") == to_dict(cfg) and done.get("inputs") == inputs:
            log.info("train: %s already finished with this config (cache hit; --force to redo)", job.stage_dir)
            return done
        changed = "config" if done.get("config") != to_dict(cfg) else "inputs (data or models)"
        log.warning("train: %s holds a run with other %s: replacing it with a fresh run", job.stage_dir, changed)
        force = True  # a finished (or half-done) run with other settings: start afresh rather than resume it
    storage = checkpoint_storage(cfg, job.stage_dir)
    if force:
        shutil.rmtree(job.stage_dir, ignore_errors=True)
        _delete_run(storage, plan.mode)  # (storage, name) is what Ray Train would resume
    job.stage_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    log.info("%s", describe(plan))
    datasets = _datasets(job)
    mlflow_info = _mlflow_run(cfg, job, mlflow_parent_id)
    worker_job = WorkerJob(
        plan=plan,
        has_eval="eval" in datasets,
        final_eval=job.final_eval,
        mlflow=mlflow_info,
        summary_path=job.stage_dir / "worker_summary.json",
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "job": worker_job},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=scaling_config(tc),
        # the train split goes whole to every worker, which walks its seeded per-epoch permutation (worker.py)
        dataset_config=ray.train.DataConfig(datasets_to_split=["eval"]),
        run_config=ray.train.RunConfig(
            name=plan.mode,
            storage_path=storage,
            # on_node_loss=wait: a worker group that cannot be placed again is retried without limit
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures, controller_failure_limit=-1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_last),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
    )
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(plan.metrics_path, plan.max_steps, stop), daemon=True)
    if progress:
        bar.start()
    start = time.time()
    try:
        trainer.fit()
    finally:
        stop.set()
        if progress:
            bar.join(timeout=5)
    return _finish(cfg, job, worker_job, inputs, time.time() - start)


def scaling_config(tc):
    """Ray Train's ScalingConfig for ``train``: a fixed group of ``num_workers`` (``on_node_loss=wait``: after a
    node loss the controller restarts the whole group once it can be placed), CPU/GPU plus custom resources."""
    import ray.train

    if tc.on_node_loss != "wait":  # TrainConfig refuses the other modes; never run one silently as wait
        raise ValueError(f"train.on_node_loss={tc.on_node_loss} has no Ray Train mapping")
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})}
    resources.update(tc.resources_per_worker)  # custom resources: which nodes may host a worker
    return ray.train.ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker=resources,
        placement_strategy=tc.placement_strategy,
    )


def checkpoint_storage(cfg: RunConfig, stage_dir: Path) -> str:
    """Ray Train's ``storage_path`` for a stage: ``<stage_dir>/ray``, or ``train.storage_path`` joined with the
    stage's path under ``output_dir`` (one run folder per stage, the same on every node)."""
    if not cfg.train.storage_path:
        return str((stage_dir / "ray").resolve())
    try:
        rel = stage_dir.resolve().relative_to(Path(cfg.output_dir).resolve())
    except ValueError:
        raise ValueError(f"stage folder {stage_dir} is not under output_dir {cfg.output_dir}") from None
    return f"{cfg.train.storage_path.rstrip('/')}/{rel.as_posix()}"


def _delete_run(storage: str, name: str) -> None:
    """Remove a Ray Train run folder ``<storage>/<name>`` (a local path or any pyarrow URI) if it exists."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(), storage)
    if fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(f"{path}/{name}")


def median_step_time(steps: list[dict[str, Any]]) -> float | None:
    """Median ``step_time_s`` of the logged steps after the first (which pays the warm-up); None with none."""
    import statistics

    times = [r["step_time_s"] for r in steps[1:] if "step_time_s" in r] or [r["step_time_s"] for r in steps[:1]]
    return statistics.median(times) if times else None


def _finish(cfg, job: TrainJob, worker_job: WorkerJob, inputs: dict[str, Any], wall: float) -> dict[str, Any]:
    from pipeline.plan import to_record

    mlflow_info = worker_job.mlflow
    worker = json.loads(worker_job.summary_path.read_text())
    records = [json.loads(x) for x in job.plan.metrics_path.read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    summary = {
        "completed": True,
        "mode": job.plan.mode,
        "model_dir": str(job.model_dir),
        "wall_time_s": wall,
        "steps": worker["step"],
        "restarts": worker["restarts"],
        "resumed_from_step": worker["resumed_from_step"],
        "nonfinite_skipped": worker["nonfinite_skipped"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / max(1, len(steps)),
        "step_time_s": median_step_time(steps),
        "final": {k: v for k, v in worker.items() if k.startswith("eval/")},
        "last_step": steps[-1] if steps else {},
        "mlflow_run_id": (mlflow_info or {}).get("run_id"),
        "config": to_dict(cfg),
        "inputs": inputs,
        "plan": to_record(job.plan),
    }
    (job.stage_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if mlflow_info:
        import mlflow

        client = mlflow.MlflowClient(mlflow_info["uri"])
        client.log_artifact(mlflow_info["run_id"], str(job.stage_dir / "summary.json"))
        client.set_terminated(mlflow_info["run_id"])
    return summary
