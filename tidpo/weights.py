"""Token importance: gradient attribution, the Gaussian position prior and their hybrid (docs/ALGORITHM.md 3-5).

A "model" here is any module with ``get_input_embeddings()`` that maps ``inputs_embeds`` (and
``attention_mask``; ``position_ids`` when its forward accepts them) to logits, or to an output with ``.logits``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from tidpo.logps import token_logps


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last attended position (left, right or mixed padding)."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only (0 at each row's first real token; 0 on padding), so a
    left-padded row sees the same positions as the same row right-padded."""
    mask = attention_mask.long()
    return ((mask.cumsum(-1) - 1) * mask).clamp(min=0)


def _accepts_position_ids(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_model(model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Forward ``model`` on embeddings and return the logits tensor (B, T, V)."""
    kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    out = model(**kwargs)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


def attribution_target(
    logits: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    target: str = "top_logit",
    input_ids: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar whose embedding gradient is the attribution (docs/ALGORITHM.md section 3), summed over rows.

    ``top_logit`` (the paper's and the authors' code): the max logit at each row's last valid position.
    ``response_logp``: the response's log-likelihood, sum_j target_mask[j] * log p(input_ids[j + 1] | < j + 1),
    with ``target_mask`` label-aligned (B, T - 1); it needs ``input_ids`` and ``target_mask``.
    """
    if target == "top_logit":
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, last_valid_index(attention_mask)].max(-1).values.sum()
    if target == "response_logp":
        if input_ids is None or target_mask is None:
            raise ValueError("attribution target response_logp needs input_ids and the label-aligned target_mask")
        logps = token_logps(logits[:, :-1], input_ids[:, 1:])
        return (logps * target_mask.to(logps.dtype)).sum()
    raise ValueError(f"unknown attribution target {target!r}; choose top_logit or response_logp")


def forward_with_attribution(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    target: str = "top_logit",
    target_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One policy forward that yields both the training logits and the attribution scores.

    The embeddings are computed once; ``autograd.grad(target, embeds, retain_graph=True)`` gives
    d(max logit at the last valid position)/d(embeddings) without touching any parameter ``.grad``, and the
    caller's loss backward then reuses the same graph (docs/ALGORITHM.md section 14: no second forward). The
    embeddings stay attached to the embedding matrix, so training updates it exactly as a plain forward would.
    Equal to ``attribution_scores`` plus a plain forward when dropout is off.

    Args:
        model: see module docstring. input_ids: (B, T) long. attention_mask: (B, T) 0/1.
        target, target_mask: the attribution target (:func:`attribution_target`).

    Returns:
        logits (B, T, V) with the graph alive, and scores (B, T) detached, zero on padding.
    """
    embeds = model.get_input_embeddings()(input_ids)
    if not embeds.requires_grad:  # frozen embeddings (e.g. LoRA): attribute w.r.t. a leaf copy instead
        embeds = embeds.detach().requires_grad_(True)
    logits = call_model(model, embeds, attention_mask)
    objective = attribution_target(logits, attention_mask, target=target, input_ids=input_ids, target_mask=target_mask)
    (grad,) = torch.autograd.grad(objective, embeds, retain_graph=True)
    scores = grad.detach().abs().sum(-1) * attention_mask.to(grad.dtype)  # I_t = ||g_t||_1
    return logits, scores


def attribution_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    target: str = "top_logit",
    target_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw gradient-attribution scores, the separate-pass definition (docs/ALGORITHM.md section 3).

    I_t = || d target / d E_t ||_1 (by default max_v logits[last valid position, v]) with E = embed(input_ids)
    a leaf, for each row independently (the target is summed over rows; rows do not interact). The model runs
    in eval mode (no dropout) and its train/eval mode is restored; no parameter ``.grad`` is touched.

    Args:
        model: see module docstring. input_ids: (B, T) long. attention_mask: (B, T) 0/1, any padding side.
        target, target_mask: the attribution target (:func:`attribution_target`).

    Returns:
        (B, T) non-negative scores in the embedding dtype, detached, exactly 0 on padding positions.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            logits = call_model(model, embeds, attention_mask)
            objective = attribution_target(
                logits, attention_mask, target=target, input_ids=input_ids, target_mask=target_mask
            )
            (grad,) = torch.autograd.grad(objective, embeds)
    finally:
        model.train(was_training)
    return grad.abs().sum(-1) * attention_mask.to(grad.dtype)


def gaussian_prior(mask: torch.Tensor, *, sigma_div: float) -> torch.Tensor:
    """Gaussian position prior over each row's span, normalised to sum 1 (docs/ALGORITHM.md section 4).

    For a span of n positions (t = 0..n-1 counted over ``mask``): P(t) = exp(-0.5 ((t - mu) / sigma)^2),
    mu = (n - 1) / 2, sigma = max(1, n / sigma_div); larger ``sigma_div`` = narrower prior.

    Args:
        mask: (B, T) bool span (response tokens, or prompt + response). sigma_div: > 0.

    Returns:
        (B, T) float32, sums to 1 over each non-empty span, exactly 0 outside it (all 0 for an empty span).
    """
    mask = mask.bool()
    n = mask.sum(-1, keepdim=True).to(torch.float32)  # (B, 1)
    t = (mask.long().cumsum(-1) - 1).to(torch.float32)  # rank of each position inside the span
    mu = (n - 1) / 2
    sigma = torch.clamp(n / sigma_div, min=1.0)
    density = torch.exp(-0.5 * ((t - mu) / sigma) ** 2) * mask
    total = density.sum(-1, keepdim=True)
    return torch.where(total > 0, density / total.clamp(min=torch.finfo(torch.float32).tiny), density)


def normalize_scores(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I_norm = I / sum(I) over the span (docs/ALGORITHM.md section 3, step 5).

    Returns:
        (I_norm (B, T) float32, zero_rows (B,) bool): rows whose span scores are all zero get I_norm = 0 and
        are flagged, so the caller can fall back to the prior and count the event.
    """
    masked = torch.where(mask.bool(), scores.detach().to(torch.float32), torch.zeros((), dtype=torch.float32))
    total = masked.sum(-1, keepdim=True)
    zero_rows = (total.squeeze(-1) <= 0) & mask.bool().any(-1)
    return torch.where(total > 0, masked / total.clamp(min=torch.finfo(torch.float32).tiny), masked), zero_rows


def hybrid_weights(scores: torch.Tensor, mask: torch.Tensor, *, lam: float, sigma_div: float) -> torch.Tensor:
    """TI-DPO token weights W = lam * I_norm + (1 - lam) * P, rescaled to mean 1 over the span (docs/ALGORITHM.md 5).

    lam = 0 gives the normalised prior scaled to mean 1 (not uniform weights). A row whose scores are all
    zero uses the prior in place of I_norm (``normalize_scores`` flags such rows for counting).

    Args:
        scores: (B, T) raw attribution scores (any non-negative values; detached internally).
        mask: (B, T) bool span. lam: in [0, 1]. sigma_div: Gaussian width divisor.

    Returns:
        (B, T) float32 constants (no grad): sum = n over each span of n tokens, exactly 0 outside it.
    """
    mask = mask.bool()
    prior = gaussian_prior(mask, sigma_div=sigma_div)
    i_norm, zero_rows = normalize_scores(scores, mask)
    i_norm = torch.where(zero_rows[:, None], prior, i_norm)
    mixed = lam * i_norm + (1.0 - lam) * prior
    return rescale_to_mean_one(mixed, mask)


def rescale_to_mean_one(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale each row so its weights sum to n (mean 1) over the span; 0 outside it and on empty spans."""
    mask = mask.bool()
    w = torch.where(mask, weights.detach().to(torch.float32), torch.zeros((), dtype=torch.float32))
    n = mask.sum(-1, keepdim=True).to(torch.float32)
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w * n / total.clamp(min=torch.finfo(torch.float32).tiny), w)


def uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """All-ones weights over the span (the DPO ablation), 0 outside it."""
    return mask.to(torch.float32)


def random_weights(mask: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform(0, 1) weights rescaled to mean 1 over the span (the random-weights ablation)."""
    noise = torch.rand(mask.shape, generator=generator, device=mask.device if generator is None else "cpu")
    return rescale_to_mean_one(noise.to(mask.device), mask)
