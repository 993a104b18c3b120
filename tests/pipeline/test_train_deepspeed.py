"""Real DeepSpeed engines in this process (world size 1 over gloo): the attribution pass leaves training
unchanged, and gradient accumulation matches the full batch. The 2-worker case runs on Ray (test_train_ray)."""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
from torch.testing import assert_close

from pipeline.batching import collate_pairs
from pipeline.config import TrainConfig
from pipeline.train.engine import step as optimizer_step
from pipeline.train.step import StepModels, preference_step
from tidpo import LossConfig

pytestmark = pytest.mark.deepspeed
deepspeed = pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_world_one():
    import torch.distributed as dist

    from pipeline.train.engine import _skip_cpu_shm_build

    _skip_cpu_shm_build()
    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        deepspeed.init_distributed(dist_backend="gloo")
    yield


def make_rows(n: int, seed: int = 0, with_ref: bool = True) -> list[dict]:
    """Variable-length pairs over a 260-token vocabulary with fake precomputed reference log-probs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randint(3, 9))]
        chosen = [rng.randrange(4, 260) for _ in range(rng.randint(2, 7))] + [2]
        rejected = [rng.randrange(4, 260) for _ in range(rng.randint(2, 7))] + [2]
        row = {"row_id": str(i), "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        if with_ref:
            row["ref_chosen_logps"] = [-rng.uniform(4, 7) for _ in chosen]
            row["ref_rejected_logps"] = [-rng.uniform(4, 7) for _ in rejected]
        rows.append(row)
    return rows


def tiny_model(seed: int = 0):
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    return build_model(ModelConfig(), 260, seed=seed)


def make_engine(stage: int, micro: int, accum: int = 1):
    from pipeline.train.engine import init_engine

    cfg = TrainConfig(
        zero_stage=stage,
        micro_batch_size=micro,
        grad_accum=accum,
        warmup_steps=0,
        lr_schedule="constant",
        num_workers=1,
        max_grad_norm=1e9,
    )
    return cfg, init_engine(cfg, tiny_model(), total_steps=10, lr=1e-2)


def run_steps(engine, cfg: TrainConfig, loss_cfg: LossConfig, batches, *, shared: bool):
    """Losses per micro-batch, parameters after the last step, and the gradient norm of each optimizer step."""
    models = StepModels(engine.module, shared_attribution=shared)
    losses, grad_norms = [], []
    for batch in batches:
        obj = preference_step(loss_cfg, models, batch)
        losses.append(float(obj.loss.detach()))
        engine.backward(obj.loss)
        norm = optimizer_step(engine)
        if norm is not None:
            grad_norms.append(norm)
    return losses, [p.detach().clone() for p in engine.module.parameters()], grad_norms


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_attribution_pass_with_uniform_weights_leaves_training_unchanged(stage, dist_world_one, monkeypatch):
    """Same losses and parameters after 3 DeepSpeed steps: plain forward + uniform weights vs the attribution
    pass (shared forward on stages 0-2, separate pass on ZeRO-3) whose weights are replaced by uniform ones."""
    import tidpo.objective

    batches = [collate_pairs(make_rows(4, seed=s), 0, with_reference=True) for s in range(3)]
    plain_cfg = LossConfig.from_preset("dpo")
    cfg, engine = make_engine(stage, micro=4)
    plain, plain_params, plain_norms = run_steps(engine, cfg, plain_cfg, batches, shared=True)

    calls = []

    def uniform_instead(scores, mask, **_):
        calls.append(scores.shape)
        return mask.float()

    monkeypatch.setattr(tidpo.objective, "hybrid_weights", uniform_instead)
    attr_cfg = LossConfig.from_preset("paper", gamma=0.0, beta=plain_cfg.beta)
    cfg, engine = make_engine(stage, micro=4)
    attributed, attr_params, attr_norms = run_steps(engine, cfg, attr_cfg, batches, shared=stage != 3)
    assert len(calls) == 6  # chosen + rejected weights in each of 3 steps: the attribution really ran
    assert_close(torch.tensor(attributed), torch.tensor(plain), rtol=0, atol=1e-6)
    assert_close(torch.tensor(attr_norms), torch.tensor(plain_norms), rtol=1e-5, atol=1e-6)
    for a, b in zip(attr_params, plain_params):
        assert_close(a, b, rtol=0, atol=1e-6)
    assert plain[2] != plain[0]  # the optimizer really moved the policy between steps


def test_accumulation_equals_full_batch(dist_world_one):
    """(micro 4 x accumulation 2) == (micro 8) for the first steps' losses, gradient norms and parameters
    (ZeRO-2)."""
    rows = [make_rows(8, seed=10 + s) for s in range(2)]
    loss_cfg = LossConfig.from_preset("paper", gamma=0.0)
    cfg, engine = make_engine(2, micro=8)
    full, full_params, full_norms = run_steps(
        engine, cfg, loss_cfg, [collate_pairs(r, 0, with_reference=True) for r in rows], shared=True
    )
    cfg, engine = make_engine(2, micro=4, accum=2)
    halves = [collate_pairs(r[i : i + 4], 0, with_reference=True) for r in rows for i in (0, 4)]
    acc, acc_params, acc_norms = run_steps(engine, cfg, loss_cfg, halves, shared=True)
    assert len(acc_norms) == len(full_norms) == 2 and min(full_norms) > 0
    assert_close(torch.tensor(acc_norms), torch.tensor(full_norms), atol=1e-5, rtol=1e-4)
    assert_close(torch.tensor([(acc[0] + acc[1]) / 2, (acc[2] + acc[3]) / 2]), torch.tensor(full), atol=1e-5, rtol=0)
    for a, b in zip(acc_params, full_params):
        assert_close(a, b, atol=1e-4, rtol=1e-3)  # Adam amplifies float-rounding gradient differences


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_export_merges_adapters(stage, dist_world_one, tmp_path):
    """A trained LoRA policy exports as one plain HF model whose logits equal the adapted model's, under
    ZeRO-2 and under ZeRO-3 (where the live parameters are partitioned and the merge is rebuilt)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.config import ModelConfig
    from pipeline.models import build_tokenizer
    from pipeline.train.engine import export_model, init_engine

    lora = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cfg = TrainConfig(zero_stage=stage, micro_batch_size=4, warmup_steps=0, num_workers=1, max_grad_norm=1e9)
    engine = init_engine(cfg, lora, total_steps=10, lr=5e-2)
    batches = [collate_pairs(make_rows(4, seed=s), 0, with_reference=True) for s in range(2)]
    run_steps(engine, cfg, LossConfig.from_preset("dpo"), batches, shared=stage != 3)
    probe = batches[0]["pair"]["input_ids"]
    with torch.no_grad():
        adapted = engine.module(input_ids=probe).logits
        with engine.module.disable_adapter():
            base = engine.module(input_ids=probe).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapters really moved the policy

    export_model(engine, build_tokenizer(ModelConfig()), tmp_path, rank=0, zero_stage=stage, merge_lora=True)
    assert not (tmp_path / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert_close(merged(input_ids=probe).logits, adapted, atol=1e-4, rtol=1e-4)


def test_grad_norm_is_reported_on_every_zero_stage(dist_world_one):
    """The first step's gradient norm is the same on ZeRO 0 (computed by us: DeepSpeed keeps none there), 2 and
    3, and equals the norm of plain PyTorch gradients of the same loss."""
    batch = collate_pairs(make_rows(4, seed=3), 0, with_reference=True)
    loss_cfg = LossConfig.from_preset("dpo")
    model = tiny_model()
    preference_step(loss_cfg, StepModels(model), batch).loss.backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    assert expected > 0
    for stage in (0, 2, 3):
        cfg, engine = make_engine(stage, micro=4)
        _, _, norms = run_steps(engine, cfg, loss_cfg, [batch], shared=stage != 3)
        assert norms == [pytest.approx(expected, rel=1e-5)], stage
