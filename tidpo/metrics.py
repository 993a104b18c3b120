"""Per-example metrics of the objective, and their reduction over micro-batches and ranks.

Names follow TRL (``loss``, ``rewards/...``, ``logps/...``) with the TI-DPO extras under ``loss/...``,
``weights/...`` and ``triplet/...``. Metrics are UNREDUCED (B,) tensors, counts are () tensors: sum both over
micro-batches and ranks (``metric_sums``), then divide once (``reduce_sums``), so the result does not depend on
how the global batch was split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tidpo.logps import masked_sum
from tidpo.losses import PreferenceLoss, TripletLoss

if TYPE_CHECKING:
    from tidpo.objective import TokenWeights


def preference_metrics(
    losses: torch.Tensor, pref: PreferenceLoss, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor
) -> dict[str, torch.Tensor]:
    """(B,) detached metrics under TRL's names from (B,) tensors: ``loss`` (the total per example),
    ``loss/preference``, ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}`` (the
    summed policy log-probs of each response)."""
    return {
        "loss": losses.detach(),
        "loss/preference": pref.losses.detach(),
        "rewards/chosen": pref.chosen_rewards,
        "rewards/rejected": pref.rejected_rewards,
        "rewards/margins": pref.chosen_rewards - pref.rejected_rewards,
        "rewards/accuracies": (pref.chosen_rewards > pref.rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def weight_entropy(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) entropy in nats of the weights normalised over each row's masked tokens (the one definition):
    H = -sum_t p_t ln p_t, p_t = w_t / sum_mask w, 0 ln 0 = 0; a row without positive weight gives 0.
    weights (B, T), mask (B, T) bool; computed in the weights' dtype."""
    w = torch.where(mask, weights, torch.zeros_like(weights))
    p = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return -masked_sum(torch.where(p > 0, p * p.clamp(min=1e-12).log(), torch.zeros_like(p)), mask)


def weight_diagnostics(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B,) mean weight on response tokens (1 unless the span is the whole sequence), max weight, and the
    entropy (nats) of the weights normalised over the response. weights (B, T), mask (B, T) bool."""
    n = mask.sum(-1).clamp(min=1)
    w = torch.where(mask, weights, torch.zeros_like(weights))
    return {"response_mean": w.sum(-1) / n, "max": w.max(-1).values, "entropy": weight_entropy(weights, mask)}


def weight_metrics(
    chosen: TokenWeights, chosen_mask: torch.Tensor, rejected: TokenWeights, rejected_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(``weights/{side}_{diagnostic}`` (B,) metrics, () counts ``weights/zero_attribution`` and
    ``weights/empty_span`` over both sides). Masks (B, T) bool response tokens."""
    counts = {
        "weights/zero_attribution": (chosen.zero_attribution.sum() + rejected.zero_attribution.sum()).detach(),
        "weights/empty_span": (chosen.empty_span.sum() + rejected.empty_span.sum()).detach(),
    }
    metrics = {}
    for side, w, mask in (("chosen", chosen.weights, chosen_mask), ("rejected", rejected.weights, rejected_mask)):
        for key, value in weight_diagnostics(w, mask.bool()).items():
            metrics[f"weights/{side}_{key}"] = value.detach()
    return metrics, counts


def triplet_metrics(
    trip: TripletLoss, anchor_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """((B,) ``loss/triplet``, ``triplet/{positive,negative}_distance``, ``triplet/active`` (hinge > 0); the ()
    count ``triplet/no_anchor`` of anchors without a response token). anchor_mask (B, Ta) bool."""
    metrics = {
        "loss/triplet": trip.losses.detach(),
        "triplet/positive_distance": trip.positive_distance.detach(),
        "triplet/negative_distance": trip.negative_distance.detach(),
        "triplet/active": (trip.losses > 0).float().detach(),
    }
    return metrics, {"triplet/no_anchor": (~anchor_mask.bool().any(-1)).sum().detach()}


def summarize(objective_metrics: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch means of the per-example metrics, and the counts as they are (0-dim tensors)."""
    out = {k: v.float().mean() for k, v in objective_metrics.items()}
    out.update({k: v.float() for k, v in counts.items()})
    return out


def metric_sums(objective_metrics: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums to accumulate over micro-batches and ranks: each metric's sum, ``num_examples``, and the counts."""
    out = {k: v.float().sum() for k, v in objective_metrics.items()}
    first = next(iter(objective_metrics.values()))
    out["num_examples"] = torch.tensor(float(first.shape[0]), device=first.device)
    out.update({f"count:{k}": v.float() for k, v in counts.items()})
    return out


def reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
    """Turn accumulated ``metric_sums`` (already summed over micro-batches and ranks) into means and counts."""
    n = sums["num_examples"].clamp(min=1)
    out = {}
    for k, v in sums.items():
        if k == "num_examples":
            out[k] = v
        elif k.startswith("count:"):
            out[k[len("count:") :]] = v
        else:
            out[k] = v / n
    return out
