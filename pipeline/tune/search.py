"""``tidpo tune``: the search driver. Shared inputs once, one MLflow parent run, a Ray Tune search, the outputs.

Layout under ``<output_dir>/tune/``: ``ray/search/`` (Tune's experiment state, what ``Tuner.restore`` reads),
``trials/<trial_id>/`` (each trial's training stage), ``state.json`` (the search's fingerprint and MLflow parent
run), and the outputs written by :mod:`pipeline.tune.report`. An unfinished search in that folder is resumed
(``--resume`` or not); a finished one with the same settings is a cache hit; other settings need ``--force``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, replace, to_dict, to_yaml
from pipeline.tune.space import Param, num_trials, parse_space, tune_space

log = logging.getLogger(__name__)
EXPERIMENT = "search"


def tune_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "tune"


def base_config(cfg: RunConfig) -> RunConfig:
    """The config every trial starts from: ``train.eval_every`` from ``tune.eval_every`` when it is 0."""
    if cfg.train.eval_every == 0 and cfg.tune.eval_every > 0:
        cfg = replace(cfg, {"train.eval_every": cfg.tune.eval_every})
    if cfg.tune.scheduler == "asha" and cfg.train.eval_every == 0:
        raise ConfigError("tune.scheduler=asha needs the metric at intermediate steps: set tune.eval_every > 0")
    return cfg


def fingerprint(base: RunConfig, params: list[Param]) -> str:
    """What makes two searches the same search (the base config, the space, the search settings)."""
    from pipeline.fingerprint import digest

    return digest([to_dict(base), [(p.key, p.kind, list(p.values)) for p in params]])


def _reference_dirs(cfg: RunConfig) -> dict[str, float]:
    """Reference log-prob caches (``<output_dir>/cache/ref-*``) -> completion time (their ``_DONE.json`` mtime)."""
    cache = Path(cfg.output_dir) / "cache"
    done = [d / "_DONE.json" for d in sorted(cache.glob("ref-*"))]
    return {f.parent.name: f.stat().st_mtime for f in done if f.exists()}


def shared_inputs(base: RunConfig, init_model: str) -> dict[str, Any]:
    """Prepare data, anchors and reference log-probs ONCE on the driver for the base config -> timing record.

    Each trial then builds its own inputs from its own plan (:func:`pipeline.train.inputs.build_job`): a trial
    whose plan needs what the base needs finds every cache warm; one whose sampled keys change the inputs (a
    preset with another reference kind or anchor context) builds those, cached by fingerprint.
    """
    from pipeline.plan import plan
    from pipeline.train.inputs import build_job

    start = time.time()
    build_job(base, plan(base, "trial", trial_id="shared", model=init_model))
    record = {"seconds": round(time.time() - start, 2), "init_model": init_model, "reference": _reference_dirs(base)}
    log.info("tune: shared inputs ready in %.1f s (reference caches %s)", record["seconds"], list(record["reference"]))
    return record


def _parent_run(base: RunConfig, params: list[Param], state: dict[str, Any]) -> str | None:
    """The search's MLflow parent run: created once, its id kept in state.json so a resumed search reuses it."""
    if not base.tracking.enabled:
        return None
    if state.get("parent_run_id"):
        return state["parent_run_id"]
    import mlflow

    from pipeline.tracking import mlflow_setup

    uri, experiment_id = mlflow_setup(base)
    client = mlflow.MlflowClient(uri)
    name = base.tracking.run_name or f"tune-{Path(base.output_dir).name}"
    run = client.create_run(experiment_id, run_name=name, tags={"tidpo.stage": "tune"})
    for key, value in to_dict(base.tune).items():
        client.log_param(run.info.run_id, f"tune.{key}", json.dumps(value)[:6000])
    client.log_text(run.info.run_id, to_yaml(base), "base_config.yaml")
    return run.info.run_id


def _search_alg(cfg: RunConfig):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tc = cfg.tune
    if tc.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # needs optuna (the `tune` extra)

        return ConcurrencyLimiter(OptunaSearch(seed=tc.seed), max_concurrent=tc.max_concurrent)
    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent)


def _scheduler(cfg: RunConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # ASHA stops a trial whose step reaches max_t; one past the last step lets a surviving trial finish its run
    # (final eval, export, summary) instead of being cut at its last training report.
    return ASHAScheduler(
        time_attr="step",
        max_t=cfg.train.max_steps + 1,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


def _trainable(base: RunConfig, init_model: str, parent_run_id: str | None):
    from ray import tune

    from pipeline.tune.trial import run_trial

    fn = tune.with_parameters(run_trial, base=to_dict(base), init_model=init_model, parent_run_id=parent_run_id)
    return tune.with_resources(fn, {"CPU": base.tune.trial_cpus})


def build_tuner(base: RunConfig, params: list[Param], trainable, *, restore: bool):
    """A fresh ``Tuner``, or ``Tuner.restore`` of the unfinished search (finished trials are not rerun)."""
    from ray import tune

    from pipeline.tune.report import trial_dirname

    path = (tune_dir(base) / "ray").resolve()
    if restore:
        log.info("tune: resuming the search in %s", path / EXPERIMENT)
        return tune.Tuner.restore(str(path / EXPERIMENT), trainable=trainable, resume_errored=True)
    tc = base.tune
    n = num_trials(base, params)
    return tune.Tuner(
        trainable,
        param_space=tune_space(params, tc.search_alg),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode=tc.mode,
            search_alg=_search_alg(base),
            scheduler=_scheduler(base),
            num_samples=1 if tc.search_alg == "grid" else tc.num_samples,
            max_concurrent_trials=min(tc.max_concurrent, n),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(path), verbose=1),
    )


def _load_state(cfg: RunConfig, fp: str, *, resume: bool, force: bool) -> dict[str, Any]:
    """Decide fresh / resume / cache hit from ``state.json``; returns the state (``status`` says which)."""
    from ray import tune

    folder = tune_dir(cfg)
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if force and folder.exists():
        log.info("tune: --force: removing %s", folder)
        shutil.rmtree(folder)
        state = {}
    if not state:
        if resume:
            raise ConfigError(f"tidpo tune --resume: no search to resume in {folder}")
        return {"fingerprint": fp, "status": "fresh"}
    if state.get("fingerprint") != fp:
        raise ConfigError(
            f"{folder} holds a search with other settings (config or space changed); use --force to replace it, "
            "or another output_dir"
        )
    if state.get("status") == "finished":
        return state
    if not tune.Tuner.can_restore(str((folder / "ray" / EXPERIMENT).resolve())):
        log.info("tune: no Tune state to restore in %s yet: starting the search afresh", folder)
        return {**state, "status": "fresh"}
    return {**state, "status": "resume"}


def main(cfg: RunConfig, args) -> dict[str, Any]:
    """``tidpo tune``: run (or resume) the search and return its summary."""
    from pipeline.plan import start_model
    from pipeline.ray_utils import ensure_ray
    from pipeline.tune import report

    base = base_config(cfg)
    params = parse_space(base)
    fp = fingerprint(base, params)
    state = _load_state(base, fp, resume=getattr(args, "resume", False), force=getattr(args, "force", False))
    if state["status"] == "finished":
        log.info("tune: the search in %s already finished with these settings (cache hit)", tune_dir(base))
        return json.loads((tune_dir(base) / "summary.json").read_text())
    start = time.time()
    ensure_ray(base.ray)
    # Trials run in Ray actors whose working directory is not ours: they get absolute paths.
    run_base = replace(base, {"output_dir": str(Path(base.output_dir).resolve())})
    # The initial policy is pinned when the search starts: a resumed search must not switch its trials to
    # another start model (an SFT export that appeared since).
    state["init_model"] = state.get("init_model") or start_model(run_base)
    inputs = shared_inputs(run_base, state["init_model"])
    state["parent_run_id"] = _parent_run(base, params, state)
    state_path = tune_dir(base) / "state.json"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    resumed = state["status"] == "resume"
    state_path.write_text(json.dumps({**state, "status": "running"}, indent=2))
    tuner = build_tuner(
        run_base, params, _trainable(run_base, state["init_model"], state["parent_run_id"]), restore=resumed
    )
    grid = tuner.fit()
    finished, expected = grid.num_terminated + grid.num_errors, num_trials(base, params)
    if finished < expected:
        raise RuntimeError(
            f"the search stopped with {finished} of {expected} trials finished; continue it with the same "
            "command plus --resume (finished trials are not rerun)"
        )
    summary = report.write_outputs(base, params, grid, parent_run_id=state["parent_run_id"], init=state["init_model"])
    summary.update(wall_time_s=round(time.time() - start, 1), resumed=resumed, shared_inputs=inputs)
    (tune_dir(base) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report.finish_parent_run(base, state["parent_run_id"], summary)
    state_path.write_text(json.dumps({**state, "status": "finished"}, indent=2))
    return summary
