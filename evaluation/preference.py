"""Held-out preference metrics from per-example tensors: implicit rewards, KL to the reference, weight diagnostics.

Pure functions of tensors (no models, no Ray): the pipeline runs the forwards and passes the results in.
Shapes: B examples, T label positions (label-aligned: position t holds the log-prob of input token t + 1).
Every function returns plain ``float``/``int`` values under TRL's metric names with the ``eval/`` prefix
(TRL ``DPOTrainer`` docs), so dashboards of training and evaluation line up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tidpo.logps import masked_sum
from tidpo.metrics import weight_entropy as tidpo_weight_entropy


def implicit_rewards(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """Per-pair DPO implicit-reward terms as TRL's ``DPOTrainer`` defines them: (B,) float64 tensors under
    ``eval/rewards/{chosen,rejected,margins,accuracies}`` and ``eval/logps/{chosen,rejected}``.

    For each pair i, with sequence log-probs (sums of response-token log-probs, EOS included):
        r_c(i) = beta * (policy_chosen_logps[i] - ref_chosen_logps[i])      (chosen implicit reward)
        r_r(i) = beta * (policy_rejected_logps[i] - ref_rejected_logps[i])  (rejected implicit reward)
        margin = r_c - r_r;  accuracy = [r_c > r_r]  (strict: a tie counts as wrong, as in TRL)
    The training workers sum these over their shards (and ranks); :func:`implicit_reward_metrics` averages them.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) sequence log-probs.
        beta: the DPO temperature (> 0); it scales rewards and margins, not the accuracy.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    sizes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1 or next(iter(sizes))[0] == 0:
        raise ValueError(f"expected four (B,) tensors with B > 0, got shapes {sorted(map(tuple, sizes))}")
    chosen = beta * (policy_chosen_logps.double() - ref_chosen_logps.double())
    rejected = beta * (policy_rejected_logps.double() - ref_rejected_logps.double())
    return {
        "eval/rewards/chosen": chosen,
        "eval/rewards/rejected": rejected,
        "eval/rewards/margins": chosen - rejected,
        "eval/rewards/accuracies": (chosen > rejected).double(),
        "eval/logps/chosen": policy_chosen_logps.double(),
        "eval/logps/rejected": policy_rejected_logps.double(),
    }


def implicit_reward_metrics(**kwargs) -> dict[str, float]:
    """The means over the pairs of :func:`implicit_rewards` (same keyword arguments)."""
    return {k: v.mean().item() for k, v in implicit_rewards(**kwargs).items()}


def mean_token_logratio(policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-example mean over masked tokens of log pi(y_t | .) - log pi_ref(y_t | .): (B, T) x3 -> (B,).

    On tokens SAMPLED FROM THE POLICY this is the standard single-sample (k1) Monte-Carlo estimate of the
    per-token KL(pi || pi_ref) along the sequence. On the eval split's observed (dataset) tokens it is not a KL
    estimate but the mean log-ratio the policy has moved on those tokens; both uses are reported under
    different names. Rows with no masked token raise (a response of length 0 is a data error).
    """
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("mean_token_logratio: a row has no masked (response) token")
    return masked_sum((policy_token_logps - ref_token_logps).double(), mask) / counts


def kl_metrics(
    *,
    policy_token_logps: Tensor,
    ref_token_logps: Tensor,
    mask: Tensor,
    full_kl: Tensor | None = None,
    prefix: str = "eval/kl",
) -> dict[str, float]:
    """KL-to-reference measures on a set of responses. The two go in OPPOSITE directions:

    - ``{prefix}/logratio_per_token``: mean over examples of :func:`mean_token_logratio`. On the policy's own
      samples it is the k1 Monte-Carlo estimate of the per-token KL(pi || pi_ref) (biased when the samples were
      drawn with top-k/top-p filtering or a temperature other than 1); on dataset tokens, just the mean log-ratio.
    - ``{prefix}/full_per_token`` (only when ``full_kl`` is given): ``full_kl`` is (B,) sums over response tokens
      of the full-vocabulary KL(pi_ref(.|prefix) || pi(.|prefix)), as ``tidpo.tdpo_kl`` computes it (TDPO's
      sequential KL, docs/ALGORITHM.md section 7); reported per token: mean over examples of full_kl / response length.
      Exact at each observed prefix, so it is a KL whichever tokens were observed.
    """
    out = {f"{prefix}/logratio_per_token": mean_token_logratio(policy_token_logps, ref_token_logps, mask).mean()}
    if full_kl is not None:
        if full_kl.shape != mask.shape[:1]:
            raise ValueError(f"full_kl must be (B,) = {tuple(mask.shape[:1])}, got {tuple(full_kl.shape)}")
        out[f"{prefix}/full_per_token"] = (full_kl.double() / mask.sum(-1)).mean()
    return {k: v.item() for k, v in out.items()}


def _span_probs(weights: Tensor, mask: Tensor) -> Tensor:
    """Weights normalised to a distribution over each row's masked span: p_t = w_t / sum_span w (B, T)."""
    w = weights.double() * mask
    total = w.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("token weights: a row has no positive weight on its span")
    return w / total


def weight_entropy(weights: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy of the normalised weights over each span, in nats, and its ratio to the uniform maximum.

    H = -sum_t p_t ln p_t with p_t = w_t / sum_span w (0 ln 0 = 0); ratio = H / ln n for a span of n tokens
    (1 = uniform weights, lower = weight concentrated on few tokens). Rows with n = 1 give ratio NaN.
    Returns two (B,) float64 tensors.
    """
    _span_probs(weights, mask)  # raises on a row without positive weight
    entropy = tidpo_weight_entropy(weights.double(), mask)
    n = mask.sum(-1).double()
    ratio = torch.where(n > 1, entropy / torch.log(n.clamp_min(2)), torch.full_like(n, math.nan))
    return entropy, ratio


def middle_share(weights: Tensor, mask: Tensor) -> Tensor:
    """Share of each row's weight on the middle third of its span: (B, T) -> (B,) in [0, 1].

    Span positions are renumbered i = 0..n-1 (masked positions in order); token i is in the middle third when
    n/3 <= i < 2n/3 (compared as 3i >= n and 3i < 2n, exact in integers). The ends' share is 1 - middle.
    Uniform weights give (number of middle positions) / n, e.g. 1/3 when 3 divides n; the Gaussian prior
    puts more than that in the middle.
    """
    p = _span_probs(weights, mask)
    index = torch.cumsum(mask.long(), -1) - 1  # i of each masked position
    n = mask.sum(-1, keepdim=True)
    middle = mask & (3 * index >= n) & (3 * index < 2 * n)
    return (p * middle).sum(-1)


def weight_logratio_correlation(weights: Tensor, token_logratio: Tensor, mask: Tensor) -> Tensor:
    """Per-row Pearson correlation of weights with the per-token log-ratio over the span: (B,), NaN if degenerate.

    r = sum (w - mean w)(l - mean l) / sqrt(sum (w - mean w)^2 * sum (l - mean l)^2), sums over the row's span.
    A row with fewer than 2 tokens or zero variance in either variable has no correlation: NaN.
    """
    m = mask.double()
    n = m.sum(-1, keepdim=True).clamp_min(1)
    w = weights.double()
    l = token_logratio.double()
    dw = (w - (w * m).sum(-1, keepdim=True) / n) * m
    dl = (l - (l * m).sum(-1, keepdim=True) / n) * m
    cov = (dw * dl).sum(-1)
    var = (dw * dw).sum(-1) * (dl * dl).sum(-1)
    degenerate = (mask.sum(-1) < 2) | (var <= 1e-24)
    return torch.where(degenerate, torch.full_like(cov, math.nan), cov / var.clamp_min(1e-300).sqrt())


def weight_diagnostics(
    *, weights: Tensor, token_logratio: Tensor, mask: Tensor, prefix: str = "eval/weights"
) -> dict[str, float]:
    """Token-weight diagnostics over a set of responses (means over rows, NaN-safe, with counts).

    Args:
        weights: (B, T) TI-DPO token weights (any positive scale; normalised per row over the span).
        token_logratio: (B, T) policy - reference per-token log-probs of the same tokens.
        mask: (B, T) bool, the response span the diagnostics are taken over.
    Returns ``{prefix}/entropy`` (nats), ``/entropy_ratio`` (H / ln n, mean over rows with n > 1),
    ``/middle_share`` and ``/ends_share`` (:func:`middle_share`), ``/logratio_corr`` (mean Pearson r over
    non-degenerate rows; NaN if every row is degenerate), ``/corr_rows`` (rows averaged) and
    ``/corr_degenerate`` (rows left out), and ``/rows``.
    """
    if not (weights.shape == token_logratio.shape == mask.shape):
        raise ValueError(f"shape mismatch: {tuple(weights.shape)}, {tuple(token_logratio.shape)}, {tuple(mask.shape)}")
    entropy, ratio = weight_entropy(weights, mask)
    mid = middle_share(weights, mask)
    corr = weight_logratio_correlation(weights, token_logratio, mask)
    ok = ~torch.isnan(corr)
    ok_ratio = ~torch.isnan(ratio)
    return {
        f"{prefix}/entropy": entropy.mean().item(),
        f"{prefix}/entropy_ratio": ratio[ok_ratio].mean().item() if bool(ok_ratio.any()) else math.nan,
        f"{prefix}/middle_share": mid.mean().item(),
        f"{prefix}/ends_share": (1 - mid).mean().item(),
        f"{prefix}/logratio_corr": corr[ok].mean().item() if bool(ok.any()) else math.nan,
        f"{prefix}/corr_rows": int(ok.sum()),
        f"{prefix}/corr_degenerate": int((~ok).sum()),
        f"{prefix}/rows": int(mask.shape[0]),
    }
