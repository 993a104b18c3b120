"""Gaussian prior, hybrid weights and gradient attribution (docs/ALGORITHM.md sections 3-5)."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tidpo import (
    attribution_scores,
    call_model,
    forward_with_attribution,
    gaussian_prior,
    hybrid_weights,
    normalize_scores,
    random_weights,
    token_logps,
)


class PerTokenModel(nn.Module):
    """logits_t = W e_t: no mixing across positions, so only the last valid position gets attribution."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.eye(4, 3))  # token k -> unit vector e_k (token 3 -> 0)
            self.head.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.0, 3.0, 0.5], [0.0, 0.0, 1.0], [0, 0, 0]]))

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds, attention_mask):
        return self.head(inputs_embeds)


class MeanPoolModel(nn.Module):
    """Causal masked mean of embeddings, then a head: mixes positions, ignores padding, has no positions."""

    def __init__(self, vocab=11, hidden=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.drop = nn.Dropout(0.5)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds, attention_mask):
        m = attention_mask[..., None].to(inputs_embeds.dtype)
        pooled = (inputs_embeds * m).cumsum(1) / m.cumsum(1).clamp(min=1)
        return self.head(torch.tanh(self.drop(pooled)))


def test_gaussian_prior_hand_worked():
    """n = 3, sigma_div 4: sigma = max(1, 0.75) = 1, mu = 1: P ~ [e^-0.5, 1, e^-0.5] / (1 + 2 e^-0.5)
    = [0.274069, 0.451862, 0.274069]. Outside the span exactly 0; an empty span is all 0."""
    mask = torch.tensor([[False, True, True, True, False], [False] * 5])
    p = gaussian_prior(mask, sigma_div=4)
    z = 1 + 2 * math.exp(-0.5)
    assert_close(p[0], torch.tensor([0.0, math.exp(-0.5) / z, 1 / z, math.exp(-0.5) / z, 0.0]))
    assert torch.all(p[1] == 0)


def test_gaussian_prior_width_follows_sigma_div():
    """n = 8: sigma_div 4 -> sigma 2; sigma_div 8 -> sigma 1 (narrower: more mass in the middle)."""
    mask = torch.ones(1, 8, dtype=torch.bool)
    wide, narrow = gaussian_prior(mask, sigma_div=4), gaussian_prior(mask, sigma_div=8)
    t = torch.arange(8.0)
    expected = torch.exp(-0.5 * ((t - 3.5) / 2) ** 2)
    assert_close(wide[0], expected / expected.sum())
    assert narrow[0, 3] > wide[0, 3] and narrow[0, 0] < wide[0, 0]


def test_hybrid_weights_hand_worked():
    """scores [1, 3] on a 2-token span: I_norm = [0.25, 0.75]; prior (n=2, mu=0.5, sigma=1) = [0.5, 0.5];
    lam 0.5 -> [0.375, 0.625]; mean 1 -> x2 = [0.75, 1.25]. The masked-out 9 is ignored and gets 0."""
    w = hybrid_weights(torch.tensor([[9.0, 1.0, 3.0]]), torch.tensor([[False, True, True]]), lam=0.5, sigma_div=4)
    assert_close(w, torch.tensor([[0.0, 0.75, 1.25]]))


def test_lambda_zero_gives_the_normalised_prior_not_uniform():
    mask = torch.tensor([[True, True, True, True, True, False]])
    w = hybrid_weights(torch.rand(1, 6), mask, lam=0.0, sigma_div=4)
    assert_close(w, gaussian_prior(mask, sigma_div=4) * 5)
    assert not torch.allclose(w[0, :5], torch.ones(5))


def test_lambda_one_gives_normalised_attribution():
    w = hybrid_weights(torch.tensor([[1.0, 2.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), lam=1.0, sigma_div=4)
    assert_close(w, torch.tensor([[0.75, 1.5, 0.75]]))


def test_zero_scores_fall_back_to_prior_and_are_flagged():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 5.0]])
    _, zero_rows = normalize_scores(scores, mask)
    assert zero_rows.tolist() == [True, False]
    w = hybrid_weights(scores, mask, lam=0.7, sigma_div=4)
    assert_close(w[0], gaussian_prior(mask, sigma_div=4)[0] * 3)
    assert_close(w.sum(-1), torch.tensor([3.0, 2.0]))


def test_weights_are_constants():
    scores = torch.rand(2, 4, requires_grad=True)
    w = hybrid_weights(scores, torch.ones(2, 4, dtype=torch.bool), lam=0.7, sigma_div=4)
    assert not w.requires_grad


def test_random_weights_mean_one_over_span():
    mask = torch.tensor([[True, True, False, True]])
    w = random_weights(mask, generator=torch.Generator().manual_seed(0))
    assert w[0, 2] == 0 and abs(float(w.sum()) - 3.0) < 1e-5


def test_attribution_hand_worked_per_token_model():
    """Tokens [0, 1, 1, pad]: last valid position 2 holds token 1 -> e_1; logits W e_1 = [-2, 3, 0, 0], max
    at class 1, d/de = W[1] = [0, 3, 0.5], L1 = 3.5. Positions 0 and 1 do not reach the target: 0. Padding 0."""
    model = PerTokenModel()
    scores = attribution_scores(model, torch.tensor([[0, 1, 1, 3]]), torch.tensor([[1, 1, 1, 0]]))
    assert_close(scores, torch.tensor([[0.0, 0.0, 3.5, 0.0]]))


def test_response_logp_target_hand_worked_per_token_model():
    """Tokens [0, 1, 1, pad], the response = label 1 (token 1 at position 2, predicted from position 1).
    log p = log softmax(W e_1)[1] with W e_1 = [-2, 3, 0, 0]; d/de_1 = W^T (onehot(1) - p). Position 0 and the
    last token (position 2: it predicts nothing in the response) get 0: the EOS-heavy top-logit target's opposite."""
    model = PerTokenModel()
    z = [-2.0, 3.0, 0.0, 0.0]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    residual = [(1.0 if k == 1 else 0.0) - p[k] for k in range(4)]
    w = model.head.weight.detach().tolist()
    grad = [sum(w[k][d] * residual[k] for k in range(4)) for d in range(3)]
    ids, mask = torch.tensor([[0, 1, 1, 3]]), torch.tensor([[1, 1, 1, 0]])
    target_mask = torch.tensor([[0, 1, 0]])
    scores = attribution_scores(model, ids, mask, target="response_logp", target_mask=target_mask)
    assert_close(scores, torch.tensor([[0.0, sum(abs(g) for g in grad), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="target_mask"):
        attribution_scores(model, ids, mask, target="response_logp")
    with pytest.raises(ValueError, match="unknown attribution target"):
        attribution_scores(model, ids, mask, target="last")


def _pad(rows, side, pad=0):
    width = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def _real(scores, mask):
    return [s[m.bool()] for s, m in zip(scores, mask)]


@pytest.mark.parametrize("model_name", ["meanpool", "llama"])
def test_attribution_padding_and_batch_invariance(model_name):
    if model_name == "llama":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(
            vocab_size=11,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = MeanPoolModel()
    model.train()  # attribution must switch dropout off and restore the mode
    rows = [[1, 5, 7, 2], [3, 4], [9, 8, 7, 6, 5, 4]]
    alone = [attribution_scores(model, *_pad([r], "right"))[0] for r in rows]
    for side in ("left", "right"):
        ids, mask = _pad(rows, side)
        got = _real(attribution_scores(model, ids, mask), mask)
        for g, a in zip(got, alone):
            assert_close(g, a, atol=1e-5, rtol=1e-4)
        assert torch.all(attribution_scores(model, ids, mask)[mask == 0] == 0)
    # mixed padding: row 0 left-padded, row 1 right-padded, in one batch
    ids = torch.tensor([[0, 0, 3, 4], [3, 4, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    got = _real(attribution_scores(model, ids, mask), mask)
    assert_close(got[0], alone[1], atol=1e-5, rtol=1e-4)
    assert_close(got[1], alone[1], atol=1e-5, rtol=1e-4)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("target", ["top_logit", "response_logp"])
def test_shared_forward_equals_separate_passes(target):
    """One forward + autograd.grad(retain_graph) + loss backward == attribution pass + plain forward."""
    model = MeanPoolModel(seed=3)
    model.drop.p = 0.0
    ids, mask = _pad([[1, 2, 3, 4, 5], [6, 7, 8]], "right")
    labels = ids[:, 1:]
    chosen = {"target": target, "target_mask": mask[:, 1:] * torch.tensor([0, 0, 1, 1])}

    logits, scores = forward_with_attribution(model, ids, mask, **chosen)
    loss = -(token_logps(logits[:, :-1], labels) * mask[:, 1:]).sum()
    assert all(p.grad is None for p in model.parameters())  # attribution touched no .grad
    loss.backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    ref_scores = attribution_scores(model, ids, mask, **chosen)
    plain = call_model(model, model.get_input_embeddings()(ids), mask)
    (-(token_logps(plain[:, :-1], labels) * mask[:, 1:]).sum()).backward()
    assert_close(scores, ref_scores)
    assert_close(logits, plain)
    for a, b in zip(shared_grads, (p.grad for p in model.parameters())):
        assert_close(a, b)
