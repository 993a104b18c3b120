"""The TI-DPO objective composed from a :class:`~tidpo.config.LossConfig` (docs/ALGORITHM.md section 11).

L_b = L_pref(b) + gamma * L_triplet(b) + rpo_alpha * NLL(b), and the loss is mean_b L_b. L_pref is the weighted
DPO (paper), TDPO2 (authors' code) or SimPO base loss. Every tensor is label-aligned (B, T); masks are bool.
The inputs of one response come grouped in a :class:`Side`, and ``required_inputs`` says which optional
fields a config needs. ``tidpo_objective`` composes small pure functions, each tested on its own:

    check_inputs -> token_weights and token_logratios per side -> preference_term, rpo_nll, triplet_term
    -> preference_metrics, weight_metrics, triplet_metrics

Metrics come back UNREDUCED: per-example (B,) tensors under TRL's names plus ``loss/...``, ``weights/...``,
``triplet/...``, ``kl/...``; degenerate events (all-zero attribution, empty span, anchor without tokens) are counted
in ``counts``. Their reduction over micro-batches and ranks is in :mod:`tidpo.metrics`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tidpo.config import LossConfig
from tidpo.logps import left_align, masked_sum
from tidpo.losses import PreferenceLoss, TripletLoss, dpo_loss, simpo_loss, tdpo_loss, triplet_loss
from tidpo.metrics import preference_metrics, triplet_metrics, weight_metrics
from tidpo.weights import hybrid_weights, normalize_scores, random_weights, uniform_weights


class Objective(NamedTuple):
    """``loss`` scalar to backpropagate; ``losses`` (B,); ``metrics`` name -> (B,); ``counts`` name -> ()."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]


class Side(NamedTuple):
    """The inputs of one response: the chosen or rejected one of each pair, or the anchor. All label-aligned.

    Attributes:
        policy_token_logps: (B, T) log pi_theta(y_t | x, y_<t), with grad.
        mask: (B, T) bool response tokens (EOS included).
        ref_token_logps: (B, T) log pi_ref, constants; needed unless base_loss=simpo.
        scores: (B, T) raw attribution scores; needed for weighting=attribution (unused for the anchor).
        span_mask: (B, T) bool weighting span (prompt + response positions); needed for span=sequence.
        kl: (B,) sequential KL K(y); needed for base_loss=tdpo with alpha_kl > 0.
    """

    policy_token_logps: torch.Tensor
    mask: torch.Tensor
    ref_token_logps: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    span_mask: torch.Tensor | None = None
    kl: torch.Tensor | None = None


class TokenWeights(NamedTuple):
    """``weights`` (B, T) constants; (B,) bool flags: all-zero attribution (prior used), empty span."""

    weights: torch.Tensor
    zero_attribution: torch.Tensor
    empty_span: torch.Tensor


def required_inputs(cfg: LossConfig) -> dict[str, str]:
    """The optional inputs ``cfg`` needs, ``"side.field"`` (or ``"anchor"``) -> the switch that needs it.

    Each side's ``policy_token_logps`` and ``mask`` are always required. The ``dpo`` preset needs the two
    ``ref_token_logps``; ``paper`` adds both ``scores`` and the anchor; ``official`` adds ``span_mask`` and ``kl``.
    """
    per_side = []
    if cfg.needs_reference:
        per_side.append(("ref_token_logps", f"base_loss={cfg.base_loss} needs reference log-probs"))
    if cfg.weighting == "attribution":
        per_side.append(("scores", "weighting=attribution"))
    if cfg.span == "sequence":
        per_side.append(("span_mask", "span=sequence: prompt + response positions"))
    if cfg.needs_ref_logits:
        per_side.append(("kl", f"base_loss=tdpo with alpha_kl={cfg.alpha_kl} > 0"))
    need = {f"{side}.{field}": why for side in ("chosen", "rejected") for field, why in per_side}
    if cfg.uses_triplet:
        need["anchor"] = f"gamma={cfg.gamma} > 0 turns on the triplet loss (or set loss.gamma=0)"
        if cfg.needs_reference:
            need["anchor.ref_token_logps"] = f"the triplet loss with base_loss={cfg.base_loss}"
    return need


def check_inputs(cfg: LossConfig, chosen: Side, rejected: Side, anchor: Side | None = None) -> None:
    """Raise ValueError naming every input of ``required_inputs(cfg)`` that is None (preset and reason)."""
    sides = {"chosen": chosen, "rejected": rejected, "anchor": anchor}
    missing = []
    for name, why in required_inputs(cfg).items():
        side, _, field = name.partition(".")
        if field and sides[side] is None:
            continue  # the missing side itself is reported
        if (getattr(sides[side], field) if field else sides[side]) is None:
            missing.append(f"{name} ({why})")
    if missing:
        raise ValueError(f"loss preset {cfg.preset!r} with these switches is missing: {'; '.join(missing)}")


def weighting_span(cfg: LossConfig, side: Side) -> torch.Tensor:
    """(B, T) bool positions the weights are normalised over: ``side.mask``, or ``side.span_mask`` for
    span=sequence (then the response's share of the weights is not mean 1)."""
    if cfg.span == "sequence":
        if side.span_mask is None:
            raise ValueError("span=sequence needs span_mask (prompt + response) on both sides")
        return side.span_mask.bool()
    return side.mask.bool()


def token_weights(
    cfg: LossConfig,
    response_mask: torch.Tensor,
    span_mask: torch.Tensor,
    scores: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> TokenWeights:
    """Weights (B, T) for one side of the pair, plus (B,) flags: all-zero attribution, empty span.

    ``uniform`` ignores the span (ones on the response, exactly DPO); ``random`` and ``attribution`` (hybrid
    of normalised scores and the Gaussian prior, docs/ALGORITHM.md section 5) have mean 1 over ``span_mask``.
    """
    empty = ~span_mask.any(-1)
    no_flag = torch.zeros_like(empty)
    if cfg.weighting == "uniform":
        return TokenWeights(uniform_weights(response_mask), no_flag, ~response_mask.any(-1))
    if cfg.weighting == "random":
        return TokenWeights(random_weights(span_mask, generator=generator), no_flag, empty)
    if scores is None:
        raise ValueError("weighting=attribution needs attribution scores (Side.scores) on both sides")
    _, zero_rows = normalize_scores(scores, span_mask)
    return TokenWeights(hybrid_weights(scores, span_mask, lam=cfg.lam, sigma_div=cfg.sigma_div), zero_rows, empty)


def side_weights(cfg: LossConfig, side: Side, *, generator: torch.Generator | None = None) -> TokenWeights:
    """``token_weights`` of one :class:`Side` over its ``weighting_span``."""
    return token_weights(cfg, side.mask.bool(), weighting_span(cfg, side), side.scores, generator)


def token_logratios(cfg: LossConfig, side: Side) -> torch.Tensor:
    """(B, T) per-token log-ratios l_t(y) = log pi_theta - log pi_ref (reference detached); for the
    reference-free SimPO, l_t(y) = log pi_theta(y_t) (any ``ref_token_logps`` is ignored)."""
    if not cfg.needs_reference:
        return side.policy_token_logps - torch.zeros_like(side.policy_token_logps)
    if side.ref_token_logps is None:
        raise ValueError(f"base_loss={cfg.base_loss} needs reference token log-probs (Side.ref_token_logps)")
    return side.policy_token_logps - side.ref_token_logps.detach()


def side_kl(side: Side, like: torch.Tensor) -> torch.Tensor:
    """(B,) the side's sequential KL K(y), or zeros shaped as ``like`` when it has none (alpha_kl = 0)."""
    return torch.zeros_like(like) if side.kl is None else side.kl


def preference_term(
    cfg: LossConfig, chosen_sums: torch.Tensor, rejected_sums: torch.Tensor, chosen: Side, rejected: Side
) -> PreferenceLoss:
    """The base preference loss on weighted log-ratio sums m(y) (docs/ALGORITHM.md sections 6-8).

    dpo: DPO family on z = m(y_w) - m(y_l); tdpo: TDPO2, z also gets - alpha_kl (K(y_l) - sg K(y_w)); simpo:
    SimPO on m(y) / |y|. For loss_type=ipo, m(y) is first divided by the response length (as TRL).

    Args:
        chosen_sums, rejected_sums: (B,) m(y). chosen, rejected: the sides (their masks give |y|, their
            ``kl`` K(y) for tdpo).

    Returns:
        PreferenceLoss of (B,) unreduced losses and detached rewards.
    """
    len_c, len_r = chosen.mask.bool().sum(-1), rejected.mask.bool().sum(-1)
    m_c, m_r, eps = chosen_sums, rejected_sums, cfg.label_smoothing
    if cfg.base_loss == "simpo":
        return simpo_loss(m_c, m_r, len_c, len_r, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=eps)
    if cfg.loss_type == "ipo":  # IPO works on length-averaged log-ratios (TRL)
        m_c, m_r = m_c / len_c.clamp(min=1), m_r / len_r.clamp(min=1)
    if cfg.base_loss == "tdpo":
        k_c, k_r = side_kl(chosen, m_c), side_kl(rejected, m_r)
        kw = {"beta": cfg.beta, "alpha": cfg.alpha_kl, "loss_type": cfg.loss_type, "label_smoothing": eps}
        return tdpo_loss(m_c, m_r, k_c, k_r, **kw)
    zeros = torch.zeros_like(m_c)  # m(y) already holds the policy - reference difference
    return dpo_loss(m_c, m_r, zeros, zeros, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=eps)


def rpo_nll(policy_chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """RPO's term (Pang et al. 2024, TRL ``rpo_alpha``): (B,) NLL of the chosen response, mean over its tokens
    (an empty response gives 0). Args: (B, T) log-probs with grad, (B, T) bool mask."""
    mask = chosen_mask.bool()
    return -masked_sum(policy_chosen_token_logps, mask) / mask.sum(-1).clamp(min=1)


def triplet_term(
    chosen_logratios: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logratios: torch.Tensor,
    rejected_mask: torch.Tensor,
    anchor_logratios: torch.Tensor,
    anchor_mask: torch.Tensor,
    *,
    margin: float,
) -> TripletLoss:
    """``triplet_loss`` on (B, T*) label-aligned per-token log-ratios and bool masks, each side left-aligned
    first so index 0 is the first response token whatever the padding or prompt length (docs/ALGORITHM.md 9)."""
    a, a_mask = left_align(anchor_logratios, anchor_mask.bool())
    w, w_mask = left_align(chosen_logratios, chosen_mask.bool())
    r, r_mask = left_align(rejected_logratios, rejected_mask.bool())
    return triplet_loss(a, a_mask, w, w_mask, r, r_mask, margin=margin)


def tidpo_objective(
    cfg: LossConfig,
    chosen: Side,
    rejected: Side,
    anchor: Side | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Objective:
    """TI-DPO loss and metrics for one micro-batch (docs/ALGORITHM.md section 11).

    Args:
        cfg: the loss switches (a preset plus overrides); ``required_inputs(cfg)`` lists the optional
            :class:`Side` fields it needs, and a missing one raises ValueError naming it.
        chosen, rejected: (B, T) sides of each pair. anchor: (B, Ta) policy sample, needed when gamma > 0.
        generator: RNG for weighting=random (drawn for the chosen side, then the rejected).

    Returns:
        Objective(loss = mean of losses, losses (B,), metrics name -> (B,), counts name -> ()).
    """
    check_inputs(cfg, chosen, rejected, anchor)
    w_c, w_r = side_weights(cfg, chosen, generator=generator), side_weights(cfg, rejected, generator=generator)
    lr_c, lr_r = token_logratios(cfg, chosen), token_logratios(cfg, rejected)  # l_t(y)
    m_c = masked_sum(w_c.weights * lr_c, chosen.mask.bool())  # m(y_w) = sum_t W_t l_t(y_w)
    m_r = masked_sum(w_r.weights * lr_r, rejected.mask.bool())
    pref = preference_term(cfg, m_c, m_r, chosen, rejected)
    metrics: dict[str, torch.Tensor] = {}
    if cfg.base_loss == "tdpo":
        metrics["kl/chosen"], metrics["kl/rejected"] = side_kl(chosen, m_c).detach(), side_kl(rejected, m_r).detach()
    losses = pref.losses
    if cfg.rpo_alpha > 0:
        nll = rpo_nll(chosen.policy_token_logps, chosen.mask)
        losses = losses + cfg.rpo_alpha * nll
        metrics["loss/nll"] = nll.detach()
    w_metrics, counts = weight_metrics(w_c, chosen.mask, w_r, rejected.mask)
    if cfg.uses_triplet:
        lr_a = token_logratios(cfg, anchor)
        trip = triplet_term(lr_c, chosen.mask, lr_r, rejected.mask, lr_a, anchor.mask, margin=cfg.margin)
        losses = losses + cfg.gamma * trip.losses
        t_metrics, t_counts = triplet_metrics(trip, anchor.mask)
        metrics.update(t_metrics)
        counts.update(t_counts)
    logps_c = masked_sum(chosen.policy_token_logps, chosen.mask.bool())
    logps_r = masked_sum(rejected.policy_token_logps, rejected.mask.bool())
    metrics.update(preference_metrics(losses, pref, logps_c, logps_r))
    metrics.update(w_metrics)
    return Objective(losses.mean(), losses, metrics, counts)
