"""Training state files: the RNG state is read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline.train.state import load_rng_state


def test_rng_state_round_trips(tmp_path):
    path = tmp_path / "rng_rank0.pt"
    torch.save({"cpu": torch.get_rng_state()}, path)
    assert torch.equal(load_rng_state(path), torch.get_rng_state())


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: what a tampered checkpoint could run on a full unpickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_state_file_runs_no_code_and_names_the_file(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rng_rank0.pt"
    with path.open("wb") as handle:
        pickle.dump({"cpu": _Payload(marker)}, handle, protocol=2)
    with pytest.raises(RuntimeError, match=r"rng_rank0\.pt: not a training RNG state"):
        load_rng_state(path)
    assert not marker.exists()
    torch.save({"cpu": [1, 2]}, path)
    with pytest.raises(RuntimeError, match="expected"):
        load_rng_state(path)
