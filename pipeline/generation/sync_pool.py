"""``generation.sync=steps``: a pool of Ray generation actors makes the anchors of the steps the trainer runs next.

Who does what:
    - :class:`AnchorActor` (one per ``generation.num_engines``, placed by ``cpus_per_engine`` /
      ``gpus_per_engine`` / ``generation.resources``) holds an engine (hf on CPU, vLLM on GPU), loads published
      weights in place (``Engine.update_weights``) and samples the anchors of one micro-batch per request with
      the same row logic and seeds as ``train.anchors=online`` (:func:`pipeline.train.anchors.sample_anchors`).
    - :class:`AnchorPool` lives in train rank 0, the pool's only Ray client: it publishes the policy weights
      (``ray.put``, once per sync, every actor ``load``s the same object), submits the requests of every rank
      and replaces an actor that died (same index, the weights its pending requests need, the requests again).
    - :class:`StepAnchors` is the worker's hook on every rank: ``attach`` gives a micro-batch its anchors,
      ``after_step`` publishes at sync points, ``metrics`` reduces the anchor figures for the step's log.

Which weights (:func:`anchor_version`, a pure function of the step): sync points are step 0, every
``sync_every``-th step and every checkpoint step (``train.save_every``). Step s uses the newest sync point
before it when that lags at most ``max_staleness`` steps, so its generation overlaps step s-1's training; else
(and always right after a checkpoint, or at the start) it waits for the weights published after step s-1. A
resumed run therefore asks exactly the versions the first attempt asked from the checkpoint on, and makes
the same anchors from the restored weights: no step runs twice with different data. Requests and loads go to
an actor from one caller in order, so a request runs on exactly the version it was submitted after; the actor
checks it, and the hook checks every anchor's ``row_id`` against its pair.

Transport: weights go through Ray's object store (CPU copies; fine for the CPU engines and one node). A GPU
deployment would broadcast them over NCCL from rank 0 into the engines' GPUs (OpenRLHF's
``init_process_group`` + ``broadcast`` into vLLM's workers, verl's sharding managers), behind the same
``publish``/``load`` pair; not built here, as nothing here can test it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def is_sync_point(version: int, *, sync_every: int, save_every: int) -> bool:
    """Weights published after ``version`` optimizer steps: the start, every sync_every-th, every checkpoint."""
    return version % sync_every == 0 or (save_every > 0 and version % save_every == 0)


def anchor_version(step: int, *, sync_every: int, max_staleness: int, save_every: int) -> int:
    """The weights version (optimizer steps done) the anchors of 0-based step ``step`` come from (module doc)."""
    if step == 0 or (save_every > 0 and step % save_every == 0):
        return step
    last = (step - 1) // sync_every * sync_every
    if save_every > 0:
        last = max(last, (step - 1) // save_every * save_every)
    if step - last <= max_staleness:
        return last
    if not is_sync_point(step, sync_every=sync_every, save_every=save_every):
        raise ValueError(f"step {step}: no published weights within max_staleness={max_staleness}")
    return step


def weights_checksum(named: list[tuple[str, torch.Tensor]]) -> int:
    """CRC-32 of the names and raw bytes of ``named``, in order (recorded per sync, checked by every actor)."""
    crc = 0
    for name, tensor in named:
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


@torch.no_grad()
def policy_weights(module: torch.nn.Module, kind: str) -> list[tuple[str, torch.Tensor]]:
    """CPU copies of what rank 0 publishes: ``full`` every parameter; a LoRA policy's ``adapters`` (its lora_A /
    lora_B tensors, for an engine holding a peft copy) or ``merged`` target layers under the base model's names
    (``W + delta``, peft's ``get_delta_weight``; the frozen rest never changes, so it is not sent)."""
    if kind == "full":
        return [(n.removeprefix("module."), p.detach().to("cpu", copy=True)) for n, p in module.named_parameters()]
    if kind == "adapters":
        return [(n, p.detach().to("cpu", copy=True)) for n, p in module.named_parameters() if ".lora_" in n]
    if kind != "merged":
        raise ValueError(f"unknown weights kind {kind!r}: full, adapters or merged")
    from peft.tuners.lora import LoraLayer

    out = []
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
            out.append((name.removeprefix("base_model.model.") + ".weight", merged.to("cpu", copy=True)))
    return out


class AnchorActor:
    """A generation actor (``ray.remote`` applied by :class:`AnchorPool`): an engine, its weights version."""

    def __init__(self, cfg, model_path: str, kind: str, weights: str, registry: str, index: int):
        from pipeline.generation.engine import build_engine

        self.cfg, self.version = cfg, None
        self.engine = build_engine(cfg, model_path, kind=kind, version="unsynced")
        if weights == "adapters":
            from pipeline.models import apply_lora

            self.engine.model = apply_lora(cfg.model, self.engine.model).eval()
        record = {"index": index, "pid": os.getpid(), "started_at": time.time()}
        Path(registry).mkdir(parents=True, exist_ok=True)
        with (Path(registry) / f"anchor_actor{index}.jsonl").open("a") as fh:  # one line per (re)start
            fh.write(json.dumps(record) + "\n")

    def load(self, named: list, version: int) -> dict[str, Any]:
        start = time.perf_counter()
        count = self.engine.update_weights(named, version=f"step-{version}")
        self.version = version
        return {"version": version, "tensors": count, "load_s": time.perf_counter() - start,
                "checksum": self._loaded_checksum(named)}  # fmt: skip

    def _loaded_checksum(self, named: list) -> int:
        """The checksum of what the engine now holds under the sent names (vLLM fuses its layers, so there it
        is the checksum of the tensors received)."""
        model = getattr(self.engine, "model", None)
        if not isinstance(model, torch.nn.Module):
            return weights_checksum(named)
        state = model.state_dict()
        return weights_checksum([(n, state[n.removeprefix("module.")]) for n, _ in named])

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        from pipeline.train.anchors import sample_anchors

        if request["version"] != self.version:
            raise RuntimeError(f"anchor request for weights {request['version']} ran on {self.version}")
        start = time.perf_counter()
        engine = self.engine
        anchors, tokens = sample_anchors(self.cfg, engine.generate, engine.tokenizer, request["rows"],
                                         seed=request["seed"])  # fmt: skip
        row_ids = [str(r["row_id"]) for r in request["rows"]]
        return {"key": request["key"], "row_ids": row_ids, "version": self.version, "anchors": anchors,
                "tokens": tokens, "seconds": time.perf_counter() - start}  # fmt: skip


class AnchorPool:
    """Train rank 0's generation actors: publish weights, submit requests, collect results, replace the dead."""

    def __init__(self, cfg, plan, registry: Path):
        from pipeline.generation.engine import select_engine

        self.cfg, self.plan, self.registry = cfg, plan, registry
        self.kind, reason = select_engine(cfg.generation)
        if self.kind == "vllm" and (plan.anchors.weights == "adapters" or cfg.generation.tensor_parallel_size > 1):
            raise ValueError("generation.sync=steps on vLLM: needs generation.lora_sync=merged (vLLM reloads "
                             "checkpoint-format weights in place) and tensor_parallel_size=1")  # fmt: skip
        log.info("anchor pool: %d %s engine(s) (%s)", cfg.generation.num_engines, self.kind, reason)
        self.published: dict[int, tuple[Any, int]] = {}  # version -> (object ref, checksum)
        self.pending: dict[tuple, tuple[int, dict, Any]] = {}  # key -> (actor index, request, result ref)
        self.loads: dict[tuple[int, int], Any] = {}  # (actor, version) -> load ref, checked on first use
        self.load_s: list[float] = []
        self.restarts = 0
        self.actors = [self._start(i) for i in range(cfg.generation.num_engines)]
        self.actor_version: list[int | None] = [None] * len(self.actors)

    def _start(self, index: int):
        import ray

        from pipeline.generation.engine import gpu_available

        g = self.cfg.generation
        gpus = g.gpus_per_engine if self.kind == "vllm" or gpu_available() else 0
        actor = ray.remote(AnchorActor).options(
            num_cpus=g.cpus_per_engine, num_gpus=gpus, resources=g.resources or None, max_restarts=0
        )
        return actor.remote(self.cfg, self.plan.init_model, self.kind, self.plan.anchors.weights,
                            str(self.registry), index)  # fmt: skip

    def publish(self, named: list, version: int) -> int:
        """Put ``named`` (the weights after ``version`` steps) in the object store; every actor loads it."""
        import ray

        start = time.perf_counter()
        checksum = weights_checksum(named)
        self.published[version] = (ray.put(named), checksum)
        for index in range(len(self.actors)):
            self._load(index, version)
        size = sum(t.numel() * t.element_size() for _, t in named)
        record = {"version": version, "crc32": checksum, "tensors": len(named), "bytes": size,
                  "publish_s": time.perf_counter() - start}  # fmt: skip
        with (self.registry / "anchor_syncs.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        return checksum

    def _load(self, index: int, version: int) -> None:
        self.loads[(index, version)] = self.actors[index].load.remote(self.published[version][0], version)
        self.actor_version[index] = version

    def submit(self, request: dict[str, Any]) -> None:
        """Queue ``request`` on its actor, after a load of its weights version if the actor holds another."""
        index = request["slot"] % len(self.actors)
        if self.actor_version[index] != request["version"]:
            self._load(index, request["version"])
        self.pending[request["key"]] = (index, request, self.actors[index].generate.remote(request))

    def take(self, keys: list[tuple]) -> list[dict[str, Any]]:
        """The results of ``keys`` (blocking), each from the weights it asked for, checked by checksum."""
        import ray

        out = []
        for key in keys:
            while True:
                index, request, ref = self.pending[key]
                try:
                    result = ray.get(ref)
                    self._check_load(index, result["version"])
                    break
                except ray.exceptions.RayActorError as exc:
                    self._replace(index, exc)
            del self.pending[key]
            out.append(result)
        return out

    def _check_load(self, index: int, version: int) -> None:
        import ray

        ref = self.loads.pop((index, version), None)
        if ref is None:
            return
        info = ray.get(ref)
        if info["checksum"] != self.published[version][1]:
            raise RuntimeError(f"anchor actor {index} holds other weights than version {version} published")
        self.load_s.append(info["load_s"])

    def _replace(self, index: int, exc: Exception) -> None:
        """Start actor ``index`` again and resubmit its pending requests (their weights are loaded first)."""
        log.warning("anchor actor %d died (%s): replacing it and regenerating its batches", index, type(exc).__name__)
        self.restarts += 1
        self.actors[index] = self._start(index)
        self.actor_version[index] = None
        self.loads = {k: v for k, v in self.loads.items() if k[0] != index}
        mine = sorted((r for i, r, _ in self.pending.values() if i == index), key=lambda r: r["version"])
        for request in mine:
            self.submit(request)

    def prune(self, oldest: int) -> None:
        """Forget published versions older than ``oldest`` (no request will ask for them again)."""
        keep = {v for _, r, _ in self.pending.values() for v in [r["version"]]} | {max(self.published)}
        self.published = {v: x for v, x in self.published.items() if v >= oldest or v in keep}

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
