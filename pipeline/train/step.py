"""One micro-batch of TI-DPO / DPO / SFT: forwards, attribution, reference, anchors -> ``tidpo`` objective.

The policy is called as a plain module (``engine.module`` under DeepSpeed): the engine's own forward forbids
the attribution's ``autograd.grad`` on ZeRO 0-2 and perturbs ZeRO-3 (docs/DEPENDENCIES.md), while a forward through
the module works on every stage; the caller then runs ``engine.backward(loss)`` on the same graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from evaluation.preference import implicit_rewards
from pipeline.batching import split_pair
from tidpo import (
    LossConfig,
    Objective,
    Side,
    attribution_scores,
    call_model,
    forward_with_attribution,
    tdpo_kl,
    tidpo_objective,
)
from tidpo.logps import masked_sum, token_logps


@dataclass
class StepModels:
    """What a step needs. ``reference`` is a frozen module, or None with ``lora_reference`` (adapters off) or
    with precomputed reference log-probs in the batch."""

    policy: nn.Module
    reference: nn.Module | None = None
    lora_reference: bool = False
    shared_attribution: bool = True


def step_autocast(train, device_type: str):
    """``train.autocast=bf16``: forwards under torch.autocast (bfloat16 matmuls, float32 weights); every
    forward whose log-probs meet in one loss runs under it (the training step and the reference precompute), so
    a policy equal to its reference gives log-ratios of exactly 0."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=train.autocast == "bf16")


def _logits(model: nn.Module, pack: dict[str, torch.Tensor]) -> torch.Tensor:
    return call_model(model, model.get_input_embeddings()(pack["input_ids"]), pack["attention_mask"])


def _reference_context(models: StepModels):
    if models.lora_reference:
        return models.policy.disable_adapter()
    return contextlib.nullcontext()


@torch.no_grad()
def reference_outputs(
    models: StepModels, pack: dict[str, torch.Tensor], *, need_logits: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference token log-probs (N, T-1) and, if asked, label-aligned logits (N, T-1, V)."""
    if "ref_token_logps" in pack and not need_logits:
        return pack["ref_token_logps"], None
    model = models.policy if models.lora_reference else models.reference
    if model is None:
        raise ValueError("no reference: the batch has no precomputed reference log-probs and no model is loaded")
    with _reference_context(models):
        logits = _logits(model, pack)[:, :-1]
    return token_logps(logits, pack["input_ids"][:, 1:]), (logits if need_logits else None)


def _anchor_side(cfg: LossConfig, models: StepModels, anchor: dict[str, torch.Tensor]) -> Side:
    policy = token_logps(_logits(models.policy, anchor)[:, :-1], anchor["input_ids"][:, 1:])
    ref = reference_outputs(models, anchor, need_logits=False)[0] if cfg.needs_reference else None
    return Side(policy, anchor["response_mask"], ref_token_logps=ref)


def preference_step(
    cfg: LossConfig, models: StepModels, batch: dict[str, Any], *, generator: torch.Generator | None = None
) -> Objective:
    """Loss and per-example metrics of one micro-batch (``pipeline.batching.collate_pairs`` output, on device).

    Every per-token input is computed once over the 2B concatenated sequences, then split into the chosen
    (first B) and rejected (last B) :class:`tidpo.Side`.
    """
    pair, B = batch["pair"], batch["num_pairs"]
    ids, attention = pair["input_ids"], pair["attention_mask"]
    target = {"target": cfg.attribution_target, "target_mask": pair["response_mask"]}
    if cfg.weighting == "attribution" and models.shared_attribution:
        logits, scores = forward_with_attribution(models.policy, ids, attention, **target)  # one shared graph
        scores = scores[:, 1:]  # label j is token j + 1: its weight is its OWN input position's score
    elif cfg.weighting == "attribution":
        scores = attribution_scores(models.policy, ids, attention, **target)[:, 1:]  # its own pass (ZeRO-3)
        logits = _logits(models.policy, pair)
    else:
        logits, scores = _logits(models.policy, pair), None
    logits = logits[:, :-1]
    both: dict[str, torch.Tensor | None] = {
        "policy_token_logps": token_logps(logits, ids[:, 1:]),
        "mask": pair["response_mask"],
        "scores": scores,
        "span_mask": pair["span_mask"] if cfg.span == "sequence" else None,
    }
    if cfg.needs_reference:
        both["ref_token_logps"], ref_logits = reference_outputs(models, pair, need_logits=cfg.needs_ref_logits)
        if ref_logits is not None:
            both["kl"] = tdpo_kl(logits, ref_logits, pair["response_mask"])
    halves = {k: (None, None) if v is None else split_pair(v, B) for k, v in both.items()}
    chosen, rejected = (Side(**{k: v[i] for k, v in halves.items()}) for i in (0, 1))
    anchor = None
    if cfg.uses_triplet:
        if "anchor" not in batch:
            raise ValueError("loss.gamma > 0 but the batch has no anchors (train.anchors=none?)")
        anchor = _anchor_side(cfg, models, batch["anchor"])
    return tidpo_objective(cfg, chosen, rejected, anchor, generator=generator)


def sft_step(models: StepModels, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the CHOSEN responses (prompt tokens masked), mean over response tokens."""
    pair, B = batch["pair"], batch["num_pairs"]
    chosen = {k: v[:B] for k, v in pair.items()}
    logps = token_logps(_logits(models.policy, chosen)[:, :-1], chosen["input_ids"][:, 1:])
    mask = chosen["response_mask"]
    per_example = -masked_sum(logps, mask)
    loss = per_example.sum() / mask.sum().clamp(min=1)
    return loss, {"loss": (per_example / mask.sum(-1).clamp(min=1)).detach()}


@torch.no_grad()
def eval_step(cfg: LossConfig, models: StepModels, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Held-out metrics, cheap and deterministic: no attribution, no anchors; rewards as TRL defines them
    (beta * summed log-ratio), plus the loss of the configured objective with uniform weights."""
    pair, B = batch["pair"], batch["num_pairs"]
    policy = token_logps(_logits(models.policy, pair)[:, :-1], pair["input_ids"][:, 1:])
    ref = reference_outputs(models, pair, need_logits=False)[0] if cfg.needs_reference else torch.zeros_like(policy)
    seq_policy = masked_sum(policy, pair["response_mask"])
    seq_ref = masked_sum(ref, pair["response_mask"])
    rewards = implicit_rewards(
        policy_chosen_logps=seq_policy[:B], policy_rejected_logps=seq_policy[B:],
        ref_chosen_logps=seq_ref[:B], ref_rejected_logps=seq_ref[B:], beta=cfg.beta,
    )  # fmt: skip
    uniform = replace(
        cfg,
        weighting="uniform",
        span="response",
        gamma=0.0,
        base_loss="dpo" if cfg.base_loss == "tdpo" else cfg.base_loss,
    )
    obj = tidpo_objective(
        uniform,
        Side(policy[:B], pair["response_mask"][:B], ref_token_logps=ref[:B]),
        Side(policy[B:], pair["response_mask"][B:], ref_token_logps=ref[B:]),
    )
    return {
        "eval/loss": obj.losses,
        **{k: v.float() for k, v in rewards.items()},
    }
