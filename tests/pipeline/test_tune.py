"""``tidpo tune``: search-space parsing (pure) and one small real search (Ray Tune + Train + MLflow)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, from_dict, load_config
from pipeline.tune.space import DEFAULT_SPACE, Param, num_trials, parse_space, tune_space
from pipeline.tune.trial import trial_config
from tidpo.config import LossConfig

REPO = Path(__file__).resolve().parents[2]


def _with_space(space, *extra):
    from pipeline.config import from_dict, merge_overrides

    return from_dict(merge_overrides({"loss": {"gamma": 0.0}, "tune": {"space": space}}, list(extra)))


def test_parse_space_every_kind_and_tune_domains():
    space = {
        "loss.lam": {"uniform": [0, 1]},
        "loss.beta": {"loguniform": [0.01, 1]},
        "loss.sigma_div": {"choice": [2, 4, 8]},
        "train.lr": {"grid": [1e-4, 5e-4]},
    }
    params = parse_space(_with_space(space))
    assert params == [
        Param("loss.lam", "uniform", (0.0, 1.0)),
        Param("loss.beta", "loguniform", (0.01, 1.0)),
        Param("loss.sigma_div", "choice", (2, 4, 8)),
        Param("train.lr", "grid", (1e-4, 5e-4)),
    ]
    assert num_trials(_with_space(space, "tune.num_samples=3"), params) == 6  # 3 samples x a 2-point grid
    domains = tune_space(params, "random")
    assert (domains["loss.lam"].lower, domains["loss.lam"].upper) == (0.0, 1.0)
    assert domains["loss.sigma_div"].categories == [2, 4, 8]
    assert domains["train.lr"] == {"grid_search": [1e-4, 5e-4]}
    grid_space = {"loss.sigma_div": {"choice": [2, 4, 8]}, "loss.lam": {"grid": [0.2, 0.8]}}
    grid_cfg = _with_space(grid_space, "tune.search_alg=grid")
    assert num_trials(grid_cfg, parse_space(grid_cfg)) == 6  # choice is enumerated with search_alg=grid
    assert tune_space(parse_space(grid_cfg), "grid")["loss.sigma_div"] == {"grid_search": [2, 4, 8]}
    assert [p.key for p in parse_space(_with_space({}))] == list(DEFAULT_SPACE)


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ({"loss.lamda": {"uniform": [0, 1]}}, [], "unknown config key 'loss.lamda'"),
        ({"data.path": {"choice": ["a", "b"]}}, [], "'data.path' cannot be searched"),
        ({"loss.lam": {"normal": [0, 1]}}, [], "unknown distribution 'normal'"),
        ({"loss.lam": [0, 1]}, [], "tune.space.loss.lam: expected one of"),
        ({"loss.lam": {"uniform": [1, 0]}}, [], "need finite low < high"),
        ({"loss.lam": {"uniform": [0, 1, 2]}}, [], "expected [low, high]"),
        ({"loss.beta": {"loguniform": [0, 1]}}, [], "low must be > 0"),
        ({"loss.sigma_div": {"choice": []}}, [], "expected a non-empty list"),
        ({"loss.lam": {"uniform": [0, 1.5]}}, [], "value 1.5 is invalid: loss.lam must be in [0, 1]"),
        ({"loss.gamma": {"choice": [0, 0.1]}}, ["train.anchors=none"], "needs anchors"),
        ({"loss.lam": {"grid": [0.1, 0.9]}}, ["tune.search_alg=optuna"], "optuna cannot take grid"),
        ({"loss.lam": {"uniform": [0, 1]}}, ["tune.search_alg=grid"], "ranges: loss.lam"),
    ],
)
def test_parse_space_errors_name_the_key(space, extra, message):
    with pytest.raises(ConfigError) as info:
        parse_space(_with_space(space, *extra))
    assert message in str(info.value)


def test_tune_config_validation():
    with pytest.raises(ConfigError, match="tune.trial_cpus must be > 0"):
        load_config(None, ["tune.trial_cpus=0"])
    with pytest.raises(ConfigError, match="tune.num_samples must be >= 1"):
        load_config(None, ["tune.num_samples=0"])


def test_search_yaml_files_load():
    files = sorted((REPO / "configs" / "search").glob("*.yaml"))
    assert files, "configs/search/ holds the search spaces"
    for path in files:
        assert path.read_text().startswith("# tidpo tune "), path
        cfg = load_config(path)
        assert {"loss.lam", "loss.sigma_div"} <= {p.key for p in parse_space(cfg)}, path


def _mlflow_children(out: Path, parent: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tidpo")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def _wait_for(predicate, proc, timeout_s: float, what: str) -> None:
    import time

    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the search driver exited (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_search_resumes_and_finishes_end_to_end(ray_cluster, tmp_path):
    """A grid of 2 trials (loss.preset dpo, paper; lam and sigma_div sampled) x 6 steps on 1 worker. The driver
    (a subprocess on the session's Ray) is SIGKILLed once trial 1 finished and trial 2 trains; --resume
    completes trial 2 and leaves trial 1's training untouched. Then the finished search: results.csv,
    best.yaml, MLflow parent + children, the reference computed once before any trial, each trial's resolved
    loss its preset's (with the sampled and the base's explicit keys on top), and a rerun is a cache hit."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline.tune import main

    out = tmp_path / "out"
    overrides = [
        f"output_dir={out}",
        "data.synthetic_num_pairs=128",
        "data.eval_size=16",
        "loss.gamma=0",
        "train.num_workers=1",
        "train.max_steps=6",
        "train.save_every=0",
        "train.warmup_steps=1",
        "tune.num_samples=1",
        "tune.scheduler=fifo",
        "tune.eval_every=3",
        "tune.space={loss.lam: {uniform: [0, 1]}, loss.sigma_div: {choice: [2, 8]}, loss.preset: {grid: [dpo, paper]}}",
        # explicit: the subprocess inherits os.environ, where an earlier test's mlflow.set_tracking_uri may have
        # left MLFLOW_TRACKING_URI pointing at another store
        f"tracking.tracking_uri=sqlite:///{out.resolve() / 'mlflow.db'}",
    ]
    tune_dir = out / "tune"
    trials = tune_dir / "trials"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", *overrides], env=env, stdout=log, stderr=log)
    try:
        _wait_for(lambda: len(list(trials.glob("*/summary.json"))) == 1, proc, 600, "trial 1 finished")
        _wait_for(
            lambda: any(
                p.stat().st_size for p in trials.glob("*/metrics.jsonl") if not (p.parent / "summary.json").exists()
            ),
            proc,
            300,
            "trial 2 training",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (first,) = trials.glob("*/summary.json")
    first_mtime = first.stat().st_mtime
    assert json.loads((tune_dir / "state.json").read_text())["status"] == "running"
    cfg = load_config(None, overrides)
    args = SimpleNamespace(resume=True, force=False)
    summary = main(cfg, args)
    assert summary["resumed"] is True and summary["trials"]["completed"] == 2
    assert first.stat().st_mtime == first_mtime  # trial 1 was not trained again
    rows = list(csv.DictReader((tune_dir / "results.csv").open()))
    assert len(rows) == 2 and summary["num_trials"] == 2
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [int(r["step"]) for r in rows] == [6, 6]
    children = _mlflow_children(out, summary["mlflow_parent_run_id"])
    statuses = sorted(c.info.status for c in children)
    assert statuses.count("FINISHED") == 2 and len(statuses) <= 3  # + the interrupted trial-2 run, KILLED
    children = [c for c in children if c.info.status == "FINISHED"]
    metric = cfg.tune.metric
    assert all(metric in c.data.metrics and "loss" in c.data.metrics for c in children)
    values = [float(r[metric]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in values)
    best = max(rows, key=lambda r: float(r[metric]))
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert math.isclose(summary["best"][metric], max(values))
    best_cfg = load_config(tune_dir / "best.yaml")
    sampled = {"loss.lam": float(best["loss.lam"]), "loss.sigma_div": int(best["loss.sigma_div"])}
    assert best_cfg == trial_config(
        load_config(None, [*overrides, "train.eval_every=3"]), {**sampled, "loss.preset": best["loss.preset"]}
    )
    assert sorted(r["loss.preset"] for r in rows) == ["dpo", "paper"]
    weightings = {}
    for r in rows:
        trial = from_dict(json.loads((trials / r["trial_id"] / "summary.json").read_text())["config"])
        lam, sigma_div = float(r["loss.lam"]), int(r["loss.sigma_div"])
        assert trial.loss == LossConfig.from_preset(r["loss.preset"], gamma=0.0, lam=lam, sigma_div=sigma_div)
        weightings[r["loss.preset"]] = trial.loss.weighting
    assert weightings == {"dpo": "uniform", "paper": "attribution"}
    assert (tune_dir / "metric_vs_lambda_sigma.png").stat().st_size > 10_000
    # The reference log-probs were computed once (train + eval split) before the trials, never per trial, and
    # the resumed search reused them.
    refs = sorted(p.name for p in (out / "cache").glob("ref-*"))
    assert len(refs) == 2 and refs == sorted(summary["shared_inputs"]["reference"])
    first_trial = min((trials / r["trial_id"] / "summary.json").stat().st_mtime for r in rows)
    done_times = [(out / "cache" / r / "_DONE.json").stat().st_mtime for r in refs]
    assert done_times == [summary["shared_inputs"]["reference"][r] for r in refs]
    assert max(done_times) < first_trial
    # A second call with the same settings is a cache hit; other settings need --force.
    again = SimpleNamespace(resume=False, force=False)
    assert main(cfg, again) == json.loads((tune_dir / "summary.json").read_text())
    with pytest.raises(ConfigError, match="other settings"):
        main(load_config(None, [*overrides, "tune.seed=1"]), again)
