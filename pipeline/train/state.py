"""Training state in Ray Train checkpoints: DeepSpeed model/optimizer/scheduler, step, data position, RNG.

A checkpoint folder holds the DeepSpeed checkpoint (tag ``ds``: model, optimizer and LR-scheduler states, one
optimizer partition per rank under ZeRO), ``trainer_state.json`` (epoch, batch position inside the epoch,
counters) from rank 0, and ``rng_rank<r>.pt`` per rank. Every rank reports its folder; Ray merges them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TAG = "ds"


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite: int = 0
    restarts: int = 0
    resumed_from: int | None = None


def restore(engine, rank: int) -> TrainState:
    """Load the latest reported checkpoint into ``engine`` (if any) and return the state to continue from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        load_path, _ = engine.load_checkpoint(str(folder), tag=TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        state = TrainState(**json.loads((folder / "trainer_state.json").read_text()))
        rng = folder / f"rng_rank{rank}.pt"
        if rng.exists():
            torch.set_rng_state(load_rng_state(rng))
    state.restarts += 1
    state.resumed_from = engine.global_steps
    return state


def load_rng_state(path: Path) -> torch.Tensor:
    """The CPU RNG state saved by :func:`saved`, read with ``weights_only=True``: tensors and plain containers
    only, so a tampered checkpoint cannot run code on load. A file that is not such a state raises naming it."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError by failure kind
        raise RuntimeError(f"{path}: not a training RNG state ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise RuntimeError(f"{path}: not a training RNG state (expected {{'cpu': tensor}})")
    return state["cpu"]


@contextlib.contextmanager
def saved(engine, state: TrainState, rank: int):
    """Write this rank's part of a checkpoint to a temporary folder and yield it as a ``ray.train.Checkpoint``."""
    import ray.train

    folder = Path(tempfile.mkdtemp(prefix="tidpo-ckpt-"))
    try:
        engine.save_checkpoint(str(folder), tag=TAG)  # collective
        if rank == 0:
            (folder / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state)))
        torch.save({"cpu": torch.get_rng_state()}, folder / f"rng_rank{rank}.pt")
        yield ray.train.Checkpoint.from_directory(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
