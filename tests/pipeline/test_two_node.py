"""A two-node Ray cluster on one machine: where the train workers and the generation actors run.

``ray start --head`` (custom resource ``node_a``) and ``ray start --address`` (``node_b``), both on 127.0.0.1,
each with its own temp dir and its own ports (the session's shared Ray, ``tests/conftest.py``, holds the default
agent ports), started once for the module and stopped by process group with nothing left behind. One tiny
``tidpo run`` is submitted through the Job API with the checkout uploaded as its working_dir (``ray job submit
--working-dir .``); node b is killed mid-training and started again. The test reads where things ran from the
workers' registry and from Ray's state API. The module runs first in a session (tests/conftest.py): its job
then has the machine to itself, before the shared cluster and what earlier tests leave behind exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# In the default run (marked ray + slow): the tests below share one cluster and one submitted run (the module
# fixtures), so the proof (placement, job submit, node loss, storage) costs one job. Node death is
# detected in seconds rather than Ray's default ~30 s (the GCS health-check settings of ``FAST_DEATH``).
pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TwoNodes:
    gcs_address: str
    dashboard: str
    node_ids: dict[str, str]  # custom resource name -> Ray node id
    temps: list[str]
    procs: list[subprocess.Popen]  # the `ray start --block` of node a, node b
    start_b: Callable[[], subprocess.Popen]  # starts node b (again)

    def kill_raylet_b(self) -> int:
        """SIGKILL node b's raylet (the node dies as a preempted machine would); returns its pid."""
        raylets = [p for p in _processes_mentioning(self.temps[1]) if b"raylet" in _argv0(p)]
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)
        return raylets[0]

    def restart_b(self) -> None:
        """Stop what is left of node b, wait until the GCS has marked it dead, start a new node b."""
        _stop(self.procs[1])  # its `ray start --block` exits with the raylet
        old, deadline = self.node_ids["node_b"], time.time() + 120
        while old in {n.node_id for n in _alive_nodes(self.dashboard)} and time.time() < deadline:
            time.sleep(1)
        self.procs[1] = self.start_b()
        ids = {name: n.node_id for n in _alive_nodes(self.dashboard) for name in ("node_a", "node_b")
               if name in n.resources_total}  # fmt: skip
        self.node_ids.update(ids)


def _argv0(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


def _start_node(args: list[str], temp: str, env: dict[str, str]) -> subprocess.Popen:
    """``ray start --block`` in its own process group (so stopping it stops every process it started)."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1"]
    cmd += [f"--temp-dir={temp}", "--num-cpus=2", f"--object-store-memory={200 * 2**20}"]
    # every agent port of its own: the defaults are taken by the session's cluster
    cmd += [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}"]
    cmd += [f"--metrics-export-port={_port()}", f"--runtime-env-agent-port={_port()}", *args]
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (``ray start --block`` stops its processes), then SIGKILL to whatever
    is left in the group (workers, agents)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _alive_nodes(dashboard: str) -> list:
    """ALIVE nodes from the state API; [] while the dashboard's state module is still starting."""
    from ray.util.state import list_nodes

    try:
        return [n for n in list_nodes(address=dashboard, detail=True) if n.state == "ALIVE"]
    except Exception:  # ServerUnavailable / timeouts right after start, on a loaded machine
        return []


def _start_until(args: list[str], temp: str, env: dict[str, str], ready, what: str) -> subprocess.Popen:
    """Start a node and wait until ``ray start`` says it started and ``ready()``. Ray gives a raylet 30 s
    (hard-coded) to register with the GCS, which a loaded 2-core machine can miss (the dashboard may be up by
    then): a node whose ``ray start`` exited is stopped and started again, 6 tries (3 were not enough at a load
    average of 70)."""
    log = Path(temp) / "ray-start.log"
    for _ in range(6):
        proc, deadline = _start_node(args, temp, env), time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if b"Ray runtime started." in log.read_bytes() and ready():
                return proc
            time.sleep(1)
        _stop(proc)
    pytest.fail(f"{what} did not start in 6 tries: {log.read_text()[-3000:]}")


def _dashboard_up(dashboard: str) -> bool:
    try:
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=5).read()
        return True
    except OSError:
        return False


# The GCS marks a node dead after ``failure_threshold`` missed health checks of ``period_ms`` (Ray's defaults:
# 5 x 3 s after a 5 s delay, with a 10 s timeout each); here a killed raylet is dead within ~3-6 s. A healthy
# raylet on a loaded 2-core machine still answers a check within 2 s.
FAST_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}


@pytest.fixture(scope="module")
def two_nodes():
    pytest.importorskip("ray")
    temps = [tempfile.mkdtemp(prefix=f"r2{n}", dir="/tmp") for n in "ab"]  # socket paths must stay short
    gcs, dash = _port(), _port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **FAST_DEATH}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    head_args = ["--head", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-port={dash}"]
    head_args += ["--dashboard-host=127.0.0.1", f"--ray-client-server-port={_port()}", '--resources={"node_a": 1}']
    dashboard, procs = f"http://127.0.0.1:{dash}", []
    try:
        # the dashboard (the state API) comes up last on the head
        procs.append(_start_until(head_args, temps[0], env, lambda: _dashboard_up(dashboard), "the head"))
        worker_args = [f"--address=127.0.0.1:{gcs}", '--resources={"node_b": 1}']

        def start_b() -> subprocess.Popen:
            return _start_until(worker_args, temps[1], env, lambda: len(_alive_nodes(dashboard)) == 2, "node b")

        procs.append(start_b())
        nodes = _alive_nodes(dashboard)
        ids = {name: n.node_id for n in nodes for name in ("node_a", "node_b") if name in n.resources_total}
        assert len(ids) == 2, nodes
        yield TwoNodes(f"127.0.0.1:{gcs}", dashboard, ids, temps, procs, start_b)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        left = [pid for temp in temps for pid in _processes_mentioning(temp)]
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


def _submit(cluster: TwoNodes, entrypoint: str) -> tuple[object, str]:
    """``ray job submit`` through the head's Job API (retrying "No available agent" right after start)."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(cluster.dashboard), time.time() + 120
    env = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    while True:
        try:
            return client, client.submit_job(entrypoint=entrypoint, runtime_env={
                "working_dir": str(ROOT),  # `ray job submit --working-dir .`: the checkout is uploaded
                "excludes": ["outputs/", ".git/", "*.parquet", "mlruns/"],
                "env_vars": env,
            })  # fmt: skip
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(3)


def _steps(stage: Path) -> list[int]:
    path = stage / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in lines if '"loss"' in x and '"final"' not in x]


def _registry(stage: Path) -> list[dict]:
    return [json.loads((stage / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _latest_checkpoint_step(snapshots: Path) -> int | None:
    """The step of the newest checkpoint Ray Train registered (its snapshot under the storage path), or None."""
    for snapshot in snapshots.glob("rounds/round-1/preference/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError):  # being rewritten
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            return latest["metrics"]["step"] if latest else None
    return None


@dataclass
class LostNodeRun:
    out: Path
    store: Path
    registered: int  # the newest registered checkpoint's step when node b was killed
    before_kill: list[dict]  # the workers' registry just before the kill
    steps_before: int  # metrics.jsonl's step lines 2 s after the kill
    recovery_s: float | None  # the kill to the first step after the restart
    seconds: float  # submit to the job's end


MAX_STEPS = 10


@pytest.fixture(scope="module")
def lost_node_run(two_nodes, tmp_path_factory) -> LostNodeRun:
    """``tidpo run`` (evaluate the start model, generate anchors, train, evaluate) submitted as a Ray job.
    The 2 train workers are ``STRICT_SPREAD`` (one per node), generation actors need ``node_b``, checkpoints go
    to a ``file://`` storage path outside output_dir. Once Ray Train registered a checkpoint, node b's raylet
    is SIGKILLed; with ``train.on_node_loss=wait`` the group can only restart once a second node is back, which
    the fixture then starts."""
    from ray.job_submission import JobStatus

    base = tmp_path_factory.mktemp("two-node-loop")
    out, store = base / "out", base / "store"
    stage = out / "rounds" / "round-1"
    args = [f"output_dir={out}", "data.synthetic_num_pairs=32", "train.sft_steps=0", "loop.rounds=1"]
    args += ["train.num_workers=2", "train.placement_strategy=STRICT_SPREAD", "train.on_node_loss=wait"]
    args += [f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4", "train.save_every=2", "train.max_failures=1"]
    args += [f"train.storage_path=file://{store}", "generation.engine=hf", "generation.num_engines=1"]
    args += ["generation.resources={node_b: 0.01}", "generation.max_new_tokens=8", "generation.batch_size=16"]
    args += ["eval.num_prompts=2", "eval.benchmarks=[preference]", "eval.heatmap_pairs=1", "eval.weight_diag_pairs=4"]
    start = time.time()
    command = shlex.join([sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", *args])
    client, job = _submit(two_nodes, command)  # runs in the uploaded working_dir
    registered, deadline = None, start + 900

    def running() -> bool:
        return client.get_job_status(job) in {JobStatus.PENDING, JobStatus.RUNNING} and time.time() < deadline

    while registered is None and running():
        registered = _latest_checkpoint_step(store)
        time.sleep(0.5)
    assert registered is not None, client.get_job_logs(job)[-4000:]
    before_kill = _registry(stage)
    two_nodes.kill_raylet_b()
    killed_at, recovered_at = time.time(), None
    time.sleep(2)  # a step in flight at the kill may still be written; none can finish without node b's rank
    steps_before = len(_steps(stage))
    two_nodes.restart_b()
    while running():
        if recovered_at is None and len(_steps(stage)) > steps_before:
            recovered_at = time.time()
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-6000:]
    assert "joined Ray cluster" in logs  # the submitted-to cluster, not a Ray of its own
    recovery = None if recovered_at is None else round(recovered_at - killed_at, 1)
    run = LostNodeRun(out, store, registered, before_kill, steps_before, recovery, round(time.time() - start, 1))
    (base / "figures.json").write_text(json.dumps({"recovery_s": run.recovery_s, "job_s": run.seconds}))
    print(f"two-node loop: job {run.seconds} s, node lost at step >= {registered}, recovery {recovery} s")
    return run


def test_train_workers_sit_on_both_nodes(two_nodes, lost_node_run: LostNodeRun) -> None:
    """``STRICT_SPREAD``: before the kill the run's two ranks sat on node a and on (the first) node b; the
    restarted group (attempt 1) again spans node a and the new node b, so it ran only once node b was back."""
    nodes, before = two_nodes.node_ids, {rec["node_id"] for rec in lost_node_run.before_kill}
    assert len(before) == 2 and nodes["node_a"] in before
    assert _first_b(two_nodes, lost_node_run) != nodes["node_b"]  # the restarted node b is a new Ray node
    after = _registry(lost_node_run.out / "rounds" / "round-1")
    assert {rec["attempt"] for rec in after} == {1} and {rec["node_id"] for rec in after} == set(nodes.values())


def test_lost_node_costs_no_step_and_none_twice(lost_node_run: LostNodeRun) -> None:
    """``train.on_node_loss=wait``: one restart, resumed from a registered checkpoint at or after the one seen
    before the kill; the first attempt's steps, then every step after the checkpoint once (nothing lost)."""
    run, stage = lost_node_run, lost_node_run.out / "rounds" / "round-1"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["restarts"] == 1
    resumed = summary["resumed_from_step"]
    assert resumed >= run.registered
    steps = _steps(stage)
    assert steps[: run.steps_before] == list(range(1, run.steps_before + 1))
    assert steps[run.steps_before :] == list(range(resumed + 1, MAX_STEPS + 1))
    assert run.recovery_s is not None and run.recovery_s > 0
    _assert_mlflow_has_every_step(run.out, summary["mlflow_run_id"])


def test_checkpoints_in_storage_path_and_the_loop_finished(lost_node_run: LostNodeRun) -> None:
    """Checkpoints in ``train.storage_path`` (``file://``), none in output_dir; the loop evaluated both rounds
    on the cluster the job was submitted to."""
    run, stage = lost_node_run, lost_node_run.out / "rounds" / "round-1"
    ray_run = run.store / "rounds" / "round-1" / "preference"
    assert any(ray_run.glob("checkpoint_*")) and not (stage / "ray").exists()
    loop = json.loads((run.out / "summary.json").read_text())
    assert loop["ray"] == "cluster" and [r["round"] for r in loop["rounds"]] == [0, 1]
    assert (stage / "model" / "config.json").exists() and (run.out / "eval" / "report.html").exists()


def test_generation_on_the_configured_node_and_reads_on_both(two_nodes, lost_node_run: LostNodeRun) -> None:
    """``generation.resources={node_b: ..}`` put every anchor actor on node b; Ray Data read on both nodes."""
    first_b = _first_b(two_nodes, lost_node_run)
    _assert_generation_on_node_b(two_nodes, {first_b, two_nodes.node_ids["node_b"]}, lost_node_run.out)
    _assert_reads_on_both_nodes(two_nodes, {two_nodes.node_ids["node_a"], first_b})


def _first_b(cluster: TwoNodes, run: LostNodeRun) -> str:
    return ({rec["node_id"] for rec in run.before_kill} - {cluster.node_ids["node_a"]}).pop()


def _assert_generation_on_node_b(cluster: TwoNodes, node_b_ids: set[str], out: Path) -> None:
    from ray.util.state import list_actors

    actors = [a for a in list_actors(address=cluster.dashboard, detail=True, limit=1000) if "AnchorGenerator" in
              f"{a.class_name} {a.repr_name}"]  # fmt: skip
    assert actors and {a.node_id for a in actors} <= node_b_ids, [(a.class_name, a.node_id) for a in actors]
    anchors = out / "anchors" / "round-1"
    assert (anchors / "manifest.json").is_file() and any(anchors.glob("*.parquet"))


def _assert_reads_on_both_nodes(cluster: TwoNodes, first_nodes: set[str]) -> None:
    """Ray Data's read tasks (Ray Data schedules them SPREAD) ran on both nodes of the first attempt."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=cluster.dashboard, detail=True, limit=10000)
    reads = [t for t in tasks if t.name.startswith("Read") and "Parquet" in t.name]  # ReadFilesParquetV2 in 2.60
    assert first_nodes <= {t.node_id for t in reads}, [(t.name, t.node_id) for t in reads]


def _assert_mlflow_has_every_step(out: Path, run_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert logged == set(range(1, MAX_STEPS + 1))
