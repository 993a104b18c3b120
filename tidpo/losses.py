"""Preference losses: weighted log-ratios, the DPO family, SimPO, TDPO2 and the TI-DPO triplet loss.

All functions are pure: tensors in, unreduced per-example tensors out, hyperparameters keyword-only.
Rewards are detached. B = batch, T = tokens (label-aligned), V = vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tidpo.logps import masked_sum

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


class PreferenceLoss(NamedTuple):
    """Unreduced (B,) losses and detached (B,) implicit rewards."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def weighted_logratio(
    policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """m(y) = sum_t W_t * (log pi_theta(y_t) - log pi_ref(y_t)) over ``mask`` (docs/ALGORITHM.md section 6).

    Args:
        policy_token_logps, ref_token_logps, weights: (B, T). mask: (B, T) bool (response tokens).

    Returns:
        (B,) weighted log-ratio sums; gradient flows through ``policy_token_logps`` only when the weights and
        reference are constants (the caller passes detached ones).
    """
    return masked_sum(weights * (policy_token_logps - ref_token_logps), mask.bool())


def margin_losses(margin: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """Per-example loss of a preference margin z (TRL's ``DPOTrainer.dpo_loss`` definitions).

    - sigmoid: -(1 - eps) log s(beta z) - eps log s(-beta z)  (eps > 0 = conservative DPO, cDPO)
    - robust:  (-(1 - eps) log s(beta z) + eps log s(-beta z)) / (1 - 2 eps)  (Chowdhury et al. 2024)
    - hinge:   relu(1 - beta z)  (SLiC)
    - ipo:     (z - 1 / (2 beta))^2  (Azar et al. 2023, eq. 17; TRL feeds length-averaged log-probs)
    """
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin) * (1 - eps) - F.logsigmoid(-beta * margin) * eps
    if loss_type == "robust":
        return (-F.logsigmoid(beta * margin) * (1 - eps) + F.logsigmoid(-beta * margin) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO-family loss (Rafailov et al. 2023, eq. 7) on sequence log-probs (or weighted log-ratio sums).

    margin z = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected); losses by ``margin_losses``.
    With TI-DPO weights, pass m(y_w) as ``policy_chosen_logps`` and zeros as ``ref_chosen_logps`` (or the
    weighted sums of each side): only the differences enter.

    Args:
        *_logps: (B,) summed log-probs. beta: > 0. loss_type: sigmoid | robust | ipo | hinge.
        label_smoothing: eps in [0, 0.5) for sigmoid/robust.

    Returns:
        PreferenceLoss of (B,) losses, rewards beta * (policy - reference) detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    losses = margin_losses(margin, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target reward margin.

    r(y) = beta * logp(y) / |y|;  loss = -(1 - eps) log s(r_w - r_l - gamma) - eps log s(-(r_w - r_l - gamma))
    (TRL's CPOTrainer with loss_type="simpo", where gamma enters as gamma / beta inside the beta-scaled logit).

    Args:
        policy_*_logps: (B,) summed log-probs. *_lengths: (B,) response token counts (> 0).
        beta: > 0. gamma: target margin >= 0. label_smoothing: eps in [0, 0.5).

    Returns:
        PreferenceLoss with rewards r(y) detached.
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1).to(policy_chosen_logps.dtype)
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1).to(policy_rejected_logps.dtype)
    margin = chosen_avg - rejected_avg - gamma / beta
    losses = margin_losses(margin, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing)
    return PreferenceLoss(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def tdpo_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequential KL of TDPO: K(y) = sum_t KL(pi_ref(.|prefix_t) || pi_theta(.|prefix_t)) over ``mask``.

    KL(p || q) = sum_v p_v (log p_v - log q_v) over the full vocabulary (Zeng et al. 2024, TDPO).

    Args:
        policy_logits, ref_logits: (B, T, V) label-aligned. mask: (B, T) bool.

    Returns:
        (B,) float32; differentiable w.r.t. ``policy_logits``.
    """
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)  # float32, or float64 for float64 input
    ref_logp = ref_logits.detach().to(dtype).log_softmax(-1)
    policy_logp = policy_logits.to(dtype).log_softmax(-1)
    per_token = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)  # (B, T)
    return masked_sum(per_token, mask.bool())


def tdpo_loss(
    chosen_margin: torch.Tensor,
    rejected_margin: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """TDPO2 (Zeng et al. 2024, eq. 17; TI-DPO's official-code base loss, docs/ALGORITHM.md section 7).

    z = m(y_w) - m(y_l) - alpha * (K(y_l) - stopgrad(K(y_w))), loss by ``margin_losses`` (TDPO: sigmoid).
    Rewards follow the TDPO code: beta * (m(y) + K(y)), detached.

    Args:
        chosen_margin, rejected_margin: (B,) (weighted) log-ratio sums m(y). chosen_kl, rejected_kl: (B,) K(y).
        beta: > 0. alpha: KL coefficient >= 0.

    Returns:
        PreferenceLoss of (B,) losses and rewards.
    """
    margin = chosen_margin - rejected_margin - alpha * (rejected_kl - chosen_kl.detach())
    losses = margin_losses(margin, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return PreferenceLoss(
        losses, beta * (chosen_margin + chosen_kl).detach(), beta * (rejected_margin + rejected_kl).detach()
    )


class TripletLoss(NamedTuple):
    """Unreduced (B,) triplet losses and the two squared distances."""

    losses: torch.Tensor
    positive_distance: torch.Tensor
    negative_distance: torch.Tensor


def overlap_sq_distance(u: torch.Tensor, u_mask: torch.Tensor, v: torch.Tensor, v_mask: torch.Tensor) -> torch.Tensor:
    """d(u, v) = sum over positions present in BOTH of (u_i - v_i)^2, on left-aligned (B, L*) vectors -> (B,)."""
    width = min(u.shape[-1], v.shape[-1])
    both = u_mask[:, :width].bool() & v_mask[:, :width].bool()
    diff = u[:, :width] - v[:, :width]
    return masked_sum(diff * diff, both)


def triplet_loss(
    anchor_logratios: torch.Tensor,
    anchor_mask: torch.Tensor,
    chosen_logratios: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logratios: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    margin: float,
) -> TripletLoss:
    """TI-DPO triplet loss relu(d(a, y_w) - d(a, y_l) + margin) per example (docs/ALGORITHM.md section 9).

    Each response is embedded as its vector of per-token log-ratios, LEFT-ALIGNED (index 0 = first response
    token; see ``tidpo.logps.left_align``); d sums squared differences over positions present in both.

    Args:
        *_logratios: (B, L*) left-aligned per-token log-ratios (widths may differ). *_mask: (B, L*) bool.
        margin: >= 0.

    Returns:
        TripletLoss of (B,) losses (the objective takes their mean) and the distances, all differentiable.
    """
    d_pos = overlap_sq_distance(anchor_logratios, anchor_mask, chosen_logratios, chosen_mask)
    d_neg = overlap_sq_distance(anchor_logratios, anchor_mask, rejected_logratios, rejected_mask)
    return TripletLoss(torch.relu(d_pos - d_neg + margin), d_pos, d_neg)
