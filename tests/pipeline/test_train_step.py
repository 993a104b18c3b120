"""The training step without Ray or DeepSpeed: reference sources agree, LoRA-off is the base model, TDPO2 runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from pipeline.batching import collate_pairs
from pipeline.config import ModelConfig
from pipeline.models import build_model
from pipeline.train.step import StepModels, eval_step, preference_step, reference_outputs, sft_step
from tests.pipeline.test_train_deepspeed import make_rows
from tidpo import LossConfig


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(), 260, seed=0).eval()


def _with_ref_columns(rows, ref_model):
    """Fill ref_*_logps columns from a live reference forward, as the precompute stage does."""
    batch = collate_pairs([{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows], 0)
    logps, _ = reference_outputs(StepModels(ref_model, ref_model), batch["pair"], need_logits=False)
    mask = batch["pair"]["response_mask"]
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        r["ref_chosen_logps"] = logps[i][mask[i]].tolist()
        r["ref_rejected_logps"] = logps[len(rows) + i][mask[len(rows) + i]].tolist()
        out.append(r)
    return out


def test_precomputed_reference_equals_live_reference(model):
    rows = make_rows(5, seed=3, with_ref=False)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = LossConfig.from_preset("paper", gamma=0.0)
    live = preference_step(cfg, StepModels(policy, reference=model), collate_pairs(rows, 0))
    pre = preference_step(
        cfg, StepModels(policy), collate_pairs(_with_ref_columns(rows, model), 0, with_reference=True)
    )
    assert_close(pre.losses, live.losses, atol=1e-5, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "weights/chosen_entropy"):
        assert_close(pre.metrics[key], live.metrics[key], atol=1e-5, rtol=0)


def test_lora_with_adapters_off_is_the_base_reference(model):
    peft = pytest.importorskip("peft")
    rows = make_rows(4, seed=5, with_ref=False)
    lora = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch = collate_pairs(rows, 0)
    off, _ = reference_outputs(StepModels(lora, lora_reference=True), batch["pair"], need_logits=False)
    base, _ = reference_outputs(StepModels(model, model), batch["pair"], need_logits=False)
    assert_close(off, base, atol=1e-5, rtol=0)
    obj = preference_step(LossConfig.from_preset("dpo"), StepModels(lora, lora_reference=True), batch)
    assert obj.metrics["rewards/chosen"].abs().sum() > 0  # adapters on != reference
    obj.loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_official_preset_with_frozen_copy_runs_tdpo_kl(model):
    policy = copy.deepcopy(model).train()
    rows = make_rows(3, seed=7, with_ref=False)
    batch = collate_pairs(rows, 0)
    obj = preference_step(LossConfig.from_preset("official", gamma=0.0), StepModels(policy, reference=model), batch)
    # policy == reference: every KL is 0 and the loss is ln 2 (uniform or not, the log-ratios are 0)
    assert_close(obj.metrics["kl/chosen"], torch.zeros(3), atol=1e-5, rtol=0)
    assert_close(obj.losses, torch.full((3,), 0.693147), atol=1e-5, rtol=0)
    obj.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_sft_and_eval_steps(model):
    batch = collate_pairs(make_rows(4, seed=9, with_ref=False), 0)
    loss, per_example = sft_step(StepModels(model), batch)
    assert loss > 0 and per_example["loss"].shape == (4,)
    metrics = eval_step(LossConfig.from_preset("paper"), StepModels(model, reference=model), batch)
    assert_close(metrics["eval/rewards/margins"], torch.zeros(4), atol=1e-6, rtol=0)
    assert set(metrics) >= {"eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"}


def test_triplet_needs_anchors_in_the_batch(model):
    batch = collate_pairs(make_rows(2, with_ref=False), 0)
    with pytest.raises(ValueError, match="no anchors"):
        preference_step(LossConfig.from_preset("paper"), StepModels(model, reference=model), batch)
    rows = [dict(r, anchor_ids=r["chosen_ids"]) for r in make_rows(2, with_ref=False)]
    obj = preference_step(
        LossConfig.from_preset("paper"), StepModels(model, reference=model), collate_pairs(rows, 0, with_anchor=True)
    )
    # anchor == chosen and policy == reference: all log-ratios 0, both distances 0, triplet = margin
    assert_close(obj.metrics["loss/triplet"], torch.full((2,), 1.0))


def test_online_anchors_continue_the_chosen_prefix(model):
    from pipeline.config import load_config
    from pipeline.train.anchors import online_anchor_pack

    class Tok:
        pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

        def decode(self, ids, **_):
            return " ".join(map(str, ids))

        def convert_tokens_to_ids(self, _):
            return None

    rows = make_rows(3, seed=11, with_ref=False)
    cfg = load_config(
        None, ["loss.anchor_context=chosen_prefix", "loss.anchor_prefix_tokens=2", "generation.max_new_tokens=3"]
    )
    pack, anchors = online_anchor_pack(cfg, model, Tok(), rows, seed=0)
    for i, r in enumerate(rows):
        start = len(r["prompt_ids"])
        anchor = pack["input_ids"][i, start:][pack["attention_mask"][i, start:].bool()].tolist()
        assert anchor[:2] == r["chosen_ids"][:2]  # the copied chosen prefix, then 1..3 sampled tokens
        assert 3 <= len(anchor) <= 5
        assert int(pack["response_mask"][i].sum()) == len(anchor) and anchor == anchors[i]
    again, _ = online_anchor_pack(cfg, model, Tok(), rows, seed=0)
    assert torch.equal(again["input_ids"], pack["input_ids"])  # seeded per row: reproducible


def test_bf16_autocast_step_matches_its_reference_and_differs_from_float32(model):
    """train.autocast=bf16: policy and reference forwards both under autocast, so a policy equal to its
    reference (LoRA with B = 0, adapters off as reference) gives log-ratios of exactly 0 and the loss ln 2;
    the log-probs are float32 values of bfloat16 matmuls (not the float32 ones, within bf16 rounding of them)."""
    peft = pytest.importorskip("peft")
    from pipeline.config import TrainConfig
    from pipeline.train.step import step_autocast

    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    models = StepModels(lora, lora_reference=True)
    batch = collate_pairs(make_rows(4, seed=11, with_ref=False), 0)
    with step_autocast(TrainConfig(autocast="bf16"), "cpu"):
        obj = preference_step(LossConfig.from_preset("dpo"), models, batch)
        bf16, _ = reference_outputs(models, batch["pair"], need_logits=False)
    assert bf16.dtype == torch.float32
    assert torch.equal(obj.metrics["rewards/chosen"], torch.zeros(4))  # exactly: same ops on both sides
    assert_close(obj.losses, torch.full((4,), 0.693147), atol=1e-6, rtol=0)
    with step_autocast(TrainConfig(), "cpu"):  # autocast=none: the float32 forward
        fp32, _ = reference_outputs(models, batch["pair"], need_logits=False)
    mask = batch["pair"]["response_mask"]
    gap = (bf16 - fp32)[mask].abs()
    assert gap.max() > 0  # autocast engaged
    # bf16 has 8 mantissa bits (relative step 2^-8 = 0.0039); a log-prob of a 260-token vocabulary (~5.6 nats)
    # computed from bf16 logits stays within a few of those steps of its float32 value
    assert gap.mean() < 0.1, gap.mean()
    obj.loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
