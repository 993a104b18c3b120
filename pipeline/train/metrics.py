"""Per-step training metrics: accumulate sums over micro-batches, all-reduce over workers, reduce to means.

Metric names follow TRL (``loss``, ``rewards/...``, ``logps/...``, ``grad_norm``, ``learning_rate``,
``num_tokens``) plus ``tokens_per_s``, ``step_time_s``, ``peak_memory_mb``, the TI-DPO extras, and where a step's
time goes: ``time/{anchors,forward,backward,optimizer}_s`` (this worker's seconds per optimizer step in each phase:
anchor sampling, the loss forwards with attribution, ``engine.backward``, the optimizer step).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch
import torch.distributed as dist

from tidpo import reduce_sums


def peak_memory_mb() -> float:
    """Peak accelerator memory (CUDA) or peak resident set size of this process (CPU), in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricWindow:
    """Sums since the last logged step (this worker), turned into global means by ``flush``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.steps_since = 0
        self.phases: dict[str, float] = {}
        self.last = time.perf_counter()

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the wall seconds of the block to ``time/<phase>_s`` of the window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def add(self, sums: dict[str, torch.Tensor], *, num_tokens: int) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float().cpu()
        self.tokens += num_tokens

    @staticmethod
    def reduce_global(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """All-reduce (sum) the per-worker sums in a fixed key order, then means (``tidpo.reduce_sums``)."""
        keys = sorted(sums)
        flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys])
        if dist.is_initialized():
            dist.all_reduce(flat)
        reduced = reduce_sums({k: flat[i] for i, k in enumerate(keys)})
        return {k: float(v) for k, v in reduced.items() if k != "num_examples"}

    def flush(self, engine, state, grad_norm: float | None) -> dict[str, float]:
        """Global metrics of the window, plus optimizer and throughput figures; resets the window.

        ``grad_norm``: the last step's norm, from ``pipeline.train.engine.step``."""
        sums = dict(self.sums)
        sums["count:num_tokens"] = torch.tensor(float(self.tokens))
        out = self.reduce_global(sums)
        elapsed = time.perf_counter() - self.last
        steps = max(1, engine.global_steps - getattr(self, "_last_step", 0))
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out["learning_rate"] = float(engine.get_lr()[0])
        out["tokens_per_s"] = out["num_tokens"] / max(elapsed, 1e-9)
        out["step_time_s"] = elapsed / steps
        out |= {f"time/{phase}_s": seconds / steps for phase, seconds in self.phases.items()}
        out["peak_memory_mb"] = peak_memory_mb()
        out["epoch"] = float(state.epoch)
        self._last_step = engine.global_steps
        self.sums, self.tokens, self.phases, self.last = {}, 0, {}, time.perf_counter()
        return out
