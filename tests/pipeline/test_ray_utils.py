"""``ensure_ray``: a local Ray started by tidpo listens on the loopback interface only; joining is unchanged."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import RayConfig

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the test session's shared Ray (tests/conftest.py) must not be disturbed.
PROBE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import psutil, ray
from pipeline.config import RayConfig
from pipeline.ray_utils import ensure_ray

where = ensure_ray(RayConfig(num_cpus=1, object_store_memory=80 * 1024**2))
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
time.sleep(2)  # the agents open their ports after start-up
session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
pids |= {p.pid for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])}
listening = sorted(
    {(psutil.Process(c.pid).name(), c.laddr.ip, c.laddr.port)
     for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids}
)
print(json.dumps({"where": where, "listening": listening}))
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in result["listening"]}
    assert result["where"] == "local" and {"gcs_server", "raylet"} <= names, result
    exposed = [entry for entry in result["listening"] if not _is_loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_joining_a_cluster_passes_only_the_address(monkeypatch):
    import ray

    from pipeline import ray_utils

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert ray_utils.ensure_ray(RayConfig(address="10.0.0.5:6379")) == "cluster"
    assert calls == [{"address": "10.0.0.5:6379", "log_to_driver": True}]
