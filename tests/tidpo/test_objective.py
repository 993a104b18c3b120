"""The composed objective: reductions to DPO, presets, anchors, counts and reduction invariance."""

import math

import pytest
import torch
from torch.testing import assert_close

from tidpo import PRESETS, LossConfig, Side, dpo_loss, metric_sums, reduce_sums, tidpo_objective


def _batch(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(B, T, generator=g) * 3 for _ in range(4))
    c_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)[:B]
    r_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)[:B]
    scores = torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    return dict(
        chosen=Side(pc, c_mask, ref_token_logps=rc, scores=scores[0]),
        rejected=Side(pr, r_mask, ref_token_logps=rr, scores=scores[1]),
    )


def _seq_sums(b):
    s = lambda x, m: (x * m).sum(-1)  # noqa: E731
    c, r = b["chosen"], b["rejected"]
    return (
        s(c.policy_token_logps, c.mask),
        s(r.policy_token_logps, r.mask),
        s(c.ref_token_logps, c.mask),
        s(r.ref_token_logps, r.mask),
    )


@pytest.mark.parametrize("base", ["dpo", "tdpo"])
def test_uniform_weights_gamma_zero_alpha_zero_is_sigmoid_dpo(base):
    b = _batch()
    cfg = LossConfig(base_loss=base, weighting="uniform", gamma=0.0, alpha_kl=0.0, beta=0.2)
    out = tidpo_objective(cfg, **b)
    ref = dpo_loss(*_seq_sums(b), beta=0.2)
    assert_close(out.losses, ref.losses)
    assert_close(out.loss, ref.losses.mean())
    if base == "dpo":
        assert_close(out.metrics["rewards/margins"], ref.chosen_rewards - ref.rejected_rewards)


def test_policy_equals_reference_gives_ln2_for_any_weights():
    b = _batch()
    for side in ("chosen", "rejected"):
        b[side] = b[side]._replace(ref_token_logps=b[side].policy_token_logps.clone())
    out = tidpo_objective(LossConfig(gamma=0.0), **b)
    assert_close(out.losses, torch.full((3,), math.log(2)))
    assert torch.all(out.metrics["rewards/chosen"] == 0)


def test_weighted_margin_hand_worked():
    """One pair, 2 response tokens each, scores equal -> I_norm = prior = [0.5, 0.5] -> weights [1, 1].
    Chosen log-ratios [0.5, 1.5], rejected [-1, 0]: z = 2 - (-1) = 3; loss = softplus(-0.1 * 3)."""
    mask = torch.tensor([[True, True]])
    out = tidpo_objective(
        LossConfig(gamma=0.0, beta=0.1),
        chosen=Side(torch.tensor([[-1.0, -1.0]]), mask, torch.tensor([[-1.5, -2.5]]), torch.ones(1, 2)),
        rejected=Side(torch.tensor([[-2.0, -1.0]]), mask, torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2)),
    )
    assert_close(out.losses, torch.tensor([math.log1p(math.exp(-0.3))]))


def test_presets_match_the_table():
    paper, official = LossConfig.from_preset("paper"), LossConfig.from_preset("official")
    assert (paper.base_loss, paper.span, paper.lam, paper.sigma_div, paper.beta, paper.gamma) == (
        "dpo",
        "response",
        0.7,
        4.0,
        0.1,
        0.1,
    )
    assert (official.base_loss, official.alpha_kl, official.span, official.lam, official.sigma_div) == (
        "tdpo",
        0.5,
        "sequence",
        0.2,
        8.0,
    )
    assert (official.beta, official.gamma, official.margin, official.anchor_context) == (0.2, 0.001, 0.001, "prompt")
    assert paper.anchor_context == "chosen_prefix"
    assert LossConfig.from_preset("official", gamma=0.0).gamma == 0.0
    assert set(PRESETS) >= {"paper", "official", "dpo"}
    with pytest.raises(ValueError, match="loss.lam"):
        LossConfig(lam=1.5)


def test_triplet_needs_anchors_and_adds_gamma_times_loss():
    b = _batch()
    cfg = LossConfig(gamma=0.5, margin=1.0)
    with pytest.raises(ValueError, match="anchor"):
        tidpo_objective(cfg, **b)
    c = b["chosen"]
    anchor = Side(c.policy_token_logps + 0.1, c.mask, ref_token_logps=c.ref_token_logps)
    with_trip = tidpo_objective(cfg, **b, anchor=anchor)
    without = tidpo_objective(LossConfig(gamma=0.0, margin=1.0), **b)
    assert_close(with_trip.losses, without.losses + 0.5 * with_trip.metrics["loss/triplet"])
    # anchor = chosen + 0.1 per token: d(a, w) = 0.01 * n_chosen
    assert_close(with_trip.metrics["triplet/positive_distance"], 0.01 * c.mask.sum(-1).float())


def test_sequence_span_requires_span_masks_and_counts_degenerate_rows():
    b = _batch()
    with pytest.raises(ValueError, match="span=sequence"):
        tidpo_objective(LossConfig(span="sequence", gamma=0.0), **b)
    span = torch.ones(3, 6, dtype=torch.bool)
    chosen = b["chosen"]._replace(scores=torch.zeros_like(b["chosen"].scores), span_mask=span)
    out = tidpo_objective(LossConfig(span="sequence", gamma=0.0), chosen, b["rejected"]._replace(span_mask=span))
    assert int(out.counts["weights/zero_attribution"]) == 3
    # sequence span: weights have mean 1 over 6 positions, so the response share is not mean 1 in general
    assert not torch.allclose(out.metrics["weights/chosen_response_mean"], torch.ones(3))


def test_loop_equals_vectorised_and_sums_are_split_invariant():
    b = _batch(seed=4)
    cfg = LossConfig(gamma=0.0)
    full = tidpo_objective(cfg, **b)
    rows = lambda side, i: Side(*(None if v is None else v[i : i + 1] for v in side))  # noqa: E731
    parts = [tidpo_objective(cfg, rows(b["chosen"], i), rows(b["rejected"], i)) for i in range(3)]
    assert_close(torch.cat([p.losses for p in parts]), full.losses)
    summed = {
        k: sum(metric_sums(p.metrics, p.counts)[k] for p in parts) for k in metric_sums(full.metrics, full.counts)
    }
    split = reduce_sums(summed)
    whole = reduce_sums(metric_sums(full.metrics, full.counts))
    for k in whole:
        assert_close(split[k], whole[k])
    assert_close(whole["loss"], full.loss)


def test_gradient_flows_to_policy_only():
    b = _batch()
    c, r = b["chosen"], b["rejected"]
    c = c._replace(
        policy_token_logps=c.policy_token_logps.clone().requires_grad_(True),
        ref_token_logps=c.ref_token_logps.clone().requires_grad_(True),
    )
    r = r._replace(policy_token_logps=r.policy_token_logps.clone().requires_grad_(True))
    tidpo_objective(LossConfig(gamma=0.0), c, r).loss.backward()
    assert c.policy_token_logps.grad.abs().sum() > 0
    assert c.ref_token_logps.grad is None
    # masked-out positions get no gradient
    assert torch.all(c.policy_token_logps.grad[~c.mask] == 0)


def test_rpo_alpha_adds_the_chosen_mean_nll():
    """rpo_alpha 0.5: each loss grows by 0.5 * (-sum of chosen log-probs / number of chosen tokens)."""
    b = _batch()
    base = tidpo_objective(LossConfig(gamma=0.0), **b)
    rpo = tidpo_objective(LossConfig(gamma=0.0, rpo_alpha=0.5), **b)
    nll = -(b["chosen"].policy_token_logps * b["chosen"].mask).sum(-1) / b["chosen"].mask.sum(-1)
    assert_close(rpo.losses, base.losses + 0.5 * nll)
    assert_close(rpo.metrics["loss/nll"], nll)
