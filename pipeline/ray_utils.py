"""Connecting to Ray: an existing cluster (``ray.address`` or ``RAY_ADDRESS``) or a local one we start."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from pipeline.config import RayConfig

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def ensure_ray(cfg: RayConfig) -> str:
    """Initialise Ray once per process and say where: returns ``"existing"``, ``"cluster"`` or ``"local"``.

    ``ray job submit`` sets ``RAY_ADDRESS``, so a submitted ``tidpo`` joins the cluster instead of starting one.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return "cluster"
    num_cpus = cfg.num_cpus or max(4, os.cpu_count() or 1)
    with _loopback_only():
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=cfg.object_store_memory,
            configure_logging=False,
            _node_ip_address=LOOPBACK,
            dashboard_host=LOOPBACK,
        )
    log.info("started a local Ray with %d logical CPUs, listening on %s only", num_cpus, LOOPBACK)
    return "local"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While starting a local Ray: its node IP is the loopback address, so every server binds there.

    Ray binds its servers (GCS, raylet, workers, agents) to the node IP, and ``ray.init`` turns a loopback
    ``_node_ip_address`` into the machine's routable IP unless clustering is off (``ENABLE_RAY_CLUSTER``, read
    by ``ray._private.services.get_node_ip_address``). The processes Ray starts get the node IP as an argument;
    the switch is restored afterwards, so a later ``ray start`` or cluster join in this process is unchanged.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
