"""The composed objective (reductions to DPO, presets, anchors, counts, reduction invariance) and its parts."""

import math
import re
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from tidpo import (
    PRESETS,
    LossConfig,
    Side,
    check_inputs,
    dpo_loss,
    metric_sums,
    preference_term,
    reduce_sums,
    required_inputs,
    rpo_nll,
    side_kl,
    side_weights,
    tidpo_objective,
    token_logratios,
    triplet_term,
    weighting_span,
)


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


# The parts of the objective, each on its own.


def _full_sides(B=2, T=4, seed=0):
    """Sides with every optional field set (and an anchor), so a test can remove one input at a time."""
    g = torch.Generator().manual_seed(seed)
    logps = lambda: -torch.rand(B, T, generator=g)  # noqa: E731
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)[:B]
    full = dict(scores=torch.rand(B, T, generator=g), span_mask=torch.ones(B, T, dtype=torch.bool))
    chosen = Side(logps(), mask, logps(), kl=torch.rand(B, generator=g), **full)
    rejected = Side(logps(), mask, logps(), kl=torch.rand(B, generator=g), **full)
    return chosen, rejected, Side(logps(), mask, logps())


def test_required_inputs_of_each_preset():
    ref = {"chosen.ref_token_logps", "rejected.ref_token_logps"}
    scores = {"chosen.scores", "rejected.scores"}
    anchor = {"anchor", "anchor.ref_token_logps"}
    official = ref | scores | anchor | {"chosen.span_mask", "rejected.span_mask", "chosen.kl", "rejected.kl"}
    assert set(required_inputs(LossConfig.from_preset("dpo"))) == ref
    assert set(required_inputs(LossConfig.from_preset("paper"))) == ref | scores | anchor
    assert set(required_inputs(LossConfig.from_preset("official"))) == official
    assert set(required_inputs(LossConfig.from_preset("official", alpha_kl=0.0, gamma=0.0))) == (
        official - anchor - {"chosen.kl", "rejected.kl"}
    )
    assert required_inputs(LossConfig(base_loss="simpo", weighting="uniform", gamma=0.0)) == {}
    assert required_inputs(LossConfig(base_loss="simpo", weighting="uniform", gamma=0.1)).keys() == {"anchor"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_required_inputs_are_exactly_what_the_objective_needs(preset):
    """Every listed input, removed alone, raises naming it; with only the listed inputs the objective runs."""
    cfg = LossConfig.from_preset(preset)
    chosen, rejected, anchor = _full_sides()
    need = required_inputs(cfg)
    for name in need:
        side, _, field = name.partition(".")
        sides = {"chosen": chosen, "rejected": rejected, "anchor": anchor}
        sides[side] = sides[side]._replace(**{field: None}) if field else None
        with pytest.raises(ValueError, match=re.escape(f"{name} (")) as err:
            tidpo_objective(cfg, **sides)
        assert repr(preset) in str(err.value)
    keep = lambda s, n: s._replace(**{f: None for f in s._fields[2:] if f"{n}.{f}" not in need})  # noqa: E731
    only = tidpo_objective(cfg, keep(chosen, "chosen"), keep(rejected, "rejected"), keep(anchor, "anchor"))
    assert torch.isfinite(only.loss)


def test_check_inputs_names_every_missing_input():
    chosen, rejected, _ = _full_sides()
    cfg = LossConfig.from_preset("official")
    check_inputs(cfg, chosen, rejected, Side(chosen.policy_token_logps, chosen.mask, chosen.ref_token_logps))
    with pytest.raises(ValueError) as err:
        check_inputs(cfg, chosen._replace(kl=None), rejected._replace(kl=None, span_mask=None))
    message = str(err.value)
    for name in ("chosen.kl", "rejected.kl", "rejected.span_mask", "anchor (gamma=0.001 > 0"):
        assert name in message
    assert "anchor.ref_token_logps" not in message  # the missing anchor itself is reported once
    assert "'official'" in message and "alpha_kl=0.5" in message


def test_weighting_span_is_the_response_or_the_span_mask():
    response = torch.tensor([[False, True, True]])
    span = torch.tensor([[True, True, True]])
    side = Side(torch.zeros(1, 3), response, span_mask=span.long())
    assert torch.equal(weighting_span(LossConfig(span="response"), side), response)
    assert torch.equal(weighting_span(LossConfig(span="sequence"), side), span)
    with pytest.raises(ValueError, match="span=sequence"):
        weighting_span(LossConfig(span="sequence"), side._replace(span_mask=None))


def test_side_weights_hand_worked():
    """lam 0.5, sigma_div 4, spans of 2 tokens, so the prior is [0.5, 0.5] (mu 0.5, sigma max(1, 0.5) = 1).
    Row 0, scores [3, 1]: I_norm [0.75, 0.25]; W = 0.5 I_norm + 0.5 P = [0.625, 0.375], times n / sum = 2 / 1
    -> [1.25, 0.75]. Row 1, scores [0, 0]: flagged zero_attribution, I_norm replaced by the prior -> [1, 1].
    Row 2, an empty response: flagged empty_span, weights 0."""
    mask = torch.tensor([[True, True, False], [True, True, False], [False, False, False]])
    scores = torch.tensor([[3.0, 1.0, 5.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
    side = Side(torch.zeros(3, 3), mask, scores=scores)
    out = side_weights(LossConfig(lam=0.5, sigma_div=4.0), side)
    assert_close(out.weights, torch.tensor([[1.25, 0.75, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert out.zero_attribution.tolist() == [False, True, False]
    assert out.empty_span.tolist() == [False, False, True]
    uniform = side_weights(LossConfig(weighting="uniform"), side._replace(scores=None))
    assert torch.equal(uniform.weights, mask.float()) and not uniform.zero_attribution.any()
    random = side_weights(LossConfig(weighting="random"), side, generator=torch.Generator().manual_seed(0))
    assert_close(random.weights.sum(-1), torch.tensor([2.0, 2.0, 0.0]))  # mean 1 over each span
    with pytest.raises(ValueError, match="attribution scores"):
        side_weights(LossConfig(), side._replace(scores=None))


def test_token_logratios_hand_worked():
    """policy [-1, -2], reference [-1.5, -1]: l = [0.5, -1]; SimPO is reference-free: l = policy = [-1, -2]."""
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    side = Side(policy, torch.ones(1, 2, dtype=torch.bool), ref_token_logps=ref)
    lr = token_logratios(LossConfig(), side)
    assert_close(lr, torch.tensor([[0.5, -1.0]]))
    lr.sum().backward()
    assert ref.grad is None  # the reference is a constant
    assert_close(token_logratios(LossConfig(base_loss="simpo", alpha_kl=0.0), side), policy.detach())
    with pytest.raises(ValueError, match="reference"):
        token_logratios(LossConfig(), side._replace(ref_token_logps=None))


def _pair(lengths_c, lengths_r, kl_c=None, kl_r=None):
    mask = lambda n: (torch.arange(3) < n)[None]  # noqa: E731
    return Side(torch.zeros(1, 3), mask(lengths_c), kl=kl_c), Side(torch.zeros(1, 3), mask(lengths_r), kl=kl_r)


def test_preference_term_dpo_and_ipo_hand_worked():
    """dpo, beta 0.1: m = 2 and -1, z = 3, loss softplus(-0.3) = 0.554355, rewards 0.2 and -0.1.
    ipo, beta 0.5, both lengths 2: m / |y| = 2 and 0, z = 2, loss (2 - 1 / (2 * 0.5))^2 = 1."""
    chosen, rejected = _pair(2, 2)
    m_c, m_r = torch.tensor([2.0]), torch.tensor([-1.0])
    dpo = preference_term(LossConfig(beta=0.1), m_c, m_r, chosen, rejected)
    assert_close(dpo.losses, torch.tensor([math.log1p(math.exp(-0.3))]))
    assert_close((dpo.chosen_rewards, dpo.rejected_rewards), (torch.tensor([0.2]), torch.tensor([-0.1])))
    ipo = preference_term(LossConfig(beta=0.5, loss_type="ipo"), torch.tensor([4.0]), torch.zeros(1), chosen, rejected)
    assert_close(ipo.losses, torch.tensor([1.0]))


def test_preference_term_tdpo_hand_worked():
    """tdpo, beta 0.2, alpha 0.5: m = 1 and 0, K = 0.4 and 1.0: z = 1 - 0 - 0.5 (1.0 - 0.4) = 0.7,
    loss softplus(-0.14) = 0.625595; rewards 0.2 (1 + 0.4) = 0.28 and 0.2 (0 + 1) = 0.2. K(y_w) is stop-grad."""
    kl_c, kl_r = torch.tensor([0.4], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    chosen, rejected = _pair(2, 2, kl_c, kl_r)
    cfg = LossConfig.from_preset("official")
    out = preference_term(cfg, torch.tensor([1.0]), torch.zeros(1), chosen, rejected)
    assert_close(out.losses, torch.tensor([math.log1p(math.exp(-0.14))]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([0.28]), torch.tensor([0.2])))
    out.losses.sum().backward()
    assert kl_c.grad is None and kl_r.grad.abs().sum() > 0
    no_kl = preference_term(replace(cfg, alpha_kl=0.0), torch.tensor([1.0]), torch.zeros(1), *_pair(2, 2))
    assert_close(no_kl.losses, torch.tensor([math.log1p(math.exp(-0.2))]))  # K = 0: z = 1


def test_preference_term_simpo_hand_worked():
    """simpo, beta 2, gamma 0.5: m / |y| = -2 / 2 = -1 and -6 / 3 = -2; z = -1 + 2 - 0.5 / 2 = 0.75,
    loss softplus(-2 * 0.75) = 0.201413; rewards 2 * -1 = -2 and 2 * -2 = -4."""
    cfg = LossConfig(base_loss="simpo", alpha_kl=0.0, beta=2.0, simpo_gamma=0.5)
    out = preference_term(cfg, torch.tensor([-2.0]), torch.tensor([-6.0]), *_pair(2, 3))
    assert_close(out.losses, torch.tensor([math.log1p(math.exp(-1.5))]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([-2.0]), torch.tensor([-4.0])))


def test_side_kl_defaults_to_zeros():
    like = torch.ones(2)
    assert torch.equal(side_kl(Side(like, like.bool()), like), torch.zeros(2))
    assert torch.equal(side_kl(Side(like, like.bool(), kl=torch.tensor([0.5, 1.0])), like), torch.tensor([0.5, 1.0]))


def test_rpo_nll_hand_worked():
    """Row 0: log-probs -1 and -3 on the response (-9 is padding): NLL (1 + 3) / 2 = 2. Row 1, empty: 0."""
    logps = torch.tensor([[-1.0, -3.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert_close(rpo_nll(logps, mask), torch.tensor([2.0, 0.0]))


def test_triplet_term_left_aligns_before_the_distances():
    """Responses start at different label positions. Left-aligned: a = [1, 1], y_w = [1, 2], y_l = [3, 3].
    d(a, y_w) = 0 + 1 = 1, d(a, y_l) = 4 + 4 = 8; margin 10: loss relu(1 - 8 + 10) = 3."""
    chosen, c_mask = torch.tensor([[0.0, 0.0, 1.0, 2.0]]), torch.tensor([[0, 0, 1, 1]])
    rejected, r_mask = torch.tensor([[0.0, 3.0, 3.0, 0.0]]), torch.tensor([[0, 1, 1, 0]])
    anchor, a_mask = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1, 1, 0]])
    out = triplet_term(chosen, c_mask, rejected, r_mask, anchor, a_mask, margin=10.0)
    assert_close(out.positive_distance, torch.tensor([1.0]))
    assert_close(out.negative_distance, torch.tensor([8.0]))
    assert_close(out.losses, torch.tensor([3.0]))
