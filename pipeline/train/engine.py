"""DeepSpeed engine set-up (ZeRO 0-3, offload, bf16, accumulation, clipping, warmup + decay) and export.

On CPU the optimizer is torch's AdamW handed to DeepSpeed (no JIT-compiled FusedAdam/CPUAdam), and the
shared-memory allreduce op DeepSpeed would JIT-build for CPU is not built: collectives go through gloo, which
is correct and avoids a 45-100 s compile on every fresh machine (docs/DEPENDENCIES.md section 3, "DeepSpeed on CPU").
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainConfig

log = logging.getLogger(__name__)


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``train.*`` (batch sizes are per worker)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_param:
        if cfg.zero_stage != 3:
            raise ValueError("train.offload_param needs train.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup over ``warmup_steps``, then cosine / linear decay to 0 at ``total_steps`` (or constant)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _skip_cpu_shm_build() -> None:
    import deepspeed.comm.torch  # noqa: F401  (the attribute lives on the module, not on torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_engine(cfg: TrainConfig, model: torch.nn.Module, *, total_steps: int, lr: float):
    """``deepspeed.initialize`` with a torch AdamW and a LambdaLR schedule; returns the engine."""
    import deepspeed

    if not cfg.use_gpu:
        _skip_cpu_shm_build()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    return engine


def step(engine) -> float | None:
    """``engine.step()``; returns the step's global gradient norm (pre-clipping) at an accumulation boundary,
    else None.

    DeepSpeed keeps that norm for ZeRO 1-3 and mixed precision; plain ZeRO-0 fp32 clips without keeping it, so
    there it is computed here from the all-reduced gradients before the step.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    own = None
    plain = not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())
    if boundary and plain:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        own = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    if not boundary:
        return None
    norm = engine.get_global_grad_norm()
    return own if norm is None else float(norm)


def wrap_reference(cfg: TrainConfig, reference: torch.nn.Module):
    """A frozen reference: under ZeRO-3 it is partitioned by an inference-only engine (as TRL does), else it is
    a plain module in eval mode on each worker."""
    reference.eval().requires_grad_(False)
    if cfg.zero_stage != 3:
        return reference
    import deepspeed

    ds = deepspeed_config(cfg)
    ds["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds.pop("gradient_clipping", None)
    engine, *_ = deepspeed.initialize(model=reference, config=ds)
    engine.eval()
    return engine.module


def export_model(engine, tokenizer, out_dir: str | Path, *, rank: int, zero_stage: int, merge_lora: bool) -> None:
    """Write ``out_dir`` in HF format (safetensors + config + tokenizer). Collective under ZeRO-3.

    A LoRA policy is written merged into its base weights when ``merge_lora`` (a plain HF model any loader
    reads), else as a peft adapter folder.
    """
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank != 0:
        return
    model = engine.module
    if merge_lora and hasattr(model, "merge_and_unload"):
        model, state_dict = merged_lora_copy(model, state_dict), None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("exported model to %s", out)


def merged_lora_copy(peft_model, state_dict: dict[str, torch.Tensor] | None = None):
    """A copy of a peft LoRA model with the adapters merged into the base weights (the live model is untouched).

    Under ZeRO-3 the live parameters are partitioned placeholders, so the copy is rebuilt from the base model's
    config and ``state_dict`` (the engine's consolidated one, with the peft key names) is loaded into it.
    """
    import copy

    if state_dict is None:
        return copy.deepcopy(peft_model).merge_and_unload()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = peft_model.active_adapter
    base = AutoModelForCausalLM.from_config(copy.deepcopy(peft_model.get_base_model().config))
    fresh = get_peft_model(base, copy.deepcopy(peft_model.peft_config[adapter]), adapter_name=adapter)
    result = fresh.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in _tied_keys(fresh)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the ZeRO-3 state dict does not fit the rebuilt LoRA model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    dtype = next(iter(state_dict.values())).dtype
    return fresh.merge_and_unload().to(dtype)


def _tied_keys(model) -> set[str]:
    """Parameter names that share storage with an earlier one (a consolidated state dict may list them once)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied
