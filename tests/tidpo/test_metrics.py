"""The metrics of the objective (tidpo/metrics.py): TRL's names, weight diagnostics, triplet counts."""

import math

import torch
from torch.testing import assert_close

from tidpo import (
    PreferenceLoss,
    TokenWeights,
    TripletLoss,
    metric_sums,
    preference_metrics,
    reduce_sums,
    summarize,
    triplet_metrics,
    weight_diagnostics,
    weight_metrics,
)


def test_preference_metrics_hand_worked():
    """Rewards chosen [0.3, -0.1], rejected [0.1, 0.2]: margins [0.2, -0.3], accuracies [1, 0]; losses and
    summed log-probs pass through, detached."""
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    pref = PreferenceLoss(losses * 0.5, torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2]))
    out = preference_metrics(losses, pref, torch.tensor([-4.0, -5.0]), torch.tensor([-6.0, -7.0]))
    assert_close(out["rewards/margins"], torch.tensor([0.2, -0.3]))
    assert out["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert_close(out["loss"], torch.tensor([1.0, 2.0]))
    assert_close(out["loss/preference"], torch.tensor([0.5, 1.0]))
    assert out["logps/chosen"].tolist() == [-4.0, -5.0] and out["logps/rejected"].tolist() == [-6.0, -7.0]
    assert not any(v.requires_grad for v in out.values())


def test_weight_diagnostics_hand_worked():
    """Weights [1.5, 0.5] on the response (9 is outside it): mean (1.5 + 0.5) / 2 = 1, max 1.5;
    p = [0.75, 0.25], entropy -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335 nats."""
    out = weight_diagnostics(torch.tensor([[1.5, 0.5, 9.0]]), torch.tensor([[True, True, False]]))
    assert_close(out["response_mean"], torch.tensor([1.0]))
    assert_close(out["max"], torch.tensor([1.5]))
    assert_close(out["entropy"], torch.tensor([-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))


def test_weight_metrics_counts_both_sides():
    """Zero-attribution flags [1, 0] and [1, 1] count 3; empty spans [0, 0] and [0, 1] count 1."""
    ones, mask = torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool)
    chosen = TokenWeights(ones, torch.tensor([True, False]), torch.tensor([False, False]))
    rejected = TokenWeights(ones, torch.tensor([True, True]), torch.tensor([False, True]))
    metrics, counts = weight_metrics(chosen, mask, rejected, mask)
    assert int(counts["weights/zero_attribution"]) == 3 and int(counts["weights/empty_span"]) == 1
    keys = ("response_mean", "max", "entropy")
    assert set(metrics) == {f"weights/{side}_{k}" for side in ("chosen", "rejected") for k in keys}
    assert_close(metrics["weights/chosen_entropy"], torch.full((2,), math.log(2)))  # uniform over 2 tokens


def test_triplet_metrics_hand_worked():
    """Losses [0, 2]: active [0, 1]; the second anchor has no response token: no_anchor 1."""
    trip = TripletLoss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]), torch.tensor([8.0, 2.0]))
    metrics, counts = triplet_metrics(trip, torch.tensor([[True, False], [False, False]]))
    assert metrics["triplet/active"].tolist() == [0.0, 1.0]
    assert metrics["triplet/positive_distance"].tolist() == [1.0, 3.0]
    assert int(counts["triplet/no_anchor"]) == 1


def test_sums_reduce_to_the_batch_means():
    """Two micro-batches of losses [1, 2] and [6]: sums 3 and 6 over 3 examples -> mean 3; counts add up."""
    a = metric_sums({"loss": torch.tensor([1.0, 2.0])}, {"c": torch.tensor(1)})
    b = metric_sums({"loss": torch.tensor([6.0])}, {"c": torch.tensor(2)})
    out = reduce_sums({k: a[k] + b[k] for k in a})
    assert float(out["loss"]) == 3.0 and float(out["c"]) == 3.0 and float(out["num_examples"]) == 3.0
    assert float(summarize({"loss": torch.tensor([1.0, 2.0])}, {})["loss"]) == 1.5
