"""generation.sync=steps without Ray: the weights-version rule, the published weights, the config and plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.generation.sync_pool import anchor_version, is_sync_point, policy_weights, weights_checksum
from pipeline.models import apply_lora, build_model, byte_tokenizer
from pipeline.plan import plan


def _versions(n: int, **rule) -> list[int]:
    return [anchor_version(s, **rule) for s in range(n)]


def test_anchor_version_follows_the_rule():
    """Sync points: 0, multiples of sync_every K and of save_every S. Step s uses the newest sync point <= s-1
    if s minus it <= max_staleness m, else (and at s = 0 or a multiple of S) the weights after s-1 steps (s)."""
    # K=1, m=0: every step waits for the weights of the step before (exactly on-policy)
    assert _versions(6, sync_every=1, max_staleness=0, save_every=0) == [0, 1, 2, 3, 4, 5]
    # K=1, m=1, S=4: one step behind, except right after a checkpoint (4) where it waits for fresh weights
    assert _versions(7, sync_every=1, max_staleness=1, save_every=4) == [0, 0, 1, 2, 4, 4, 5]
    # K=4, m=4, S=8: 1..4 use 0 (staleness 1..4), 5..7 use 4, 8 is a checkpoint, 9..12 use 8
    assert _versions(13, sync_every=4, max_staleness=4, save_every=8) == [0] + [0] * 4 + [4] * 3 + [8] * 5
    # K=2, m=1: odd steps lag 1 behind the even sync point; even steps wait for their own
    assert _versions(6, sync_every=2, max_staleness=1, save_every=0) == [0, 0, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="no published weights"):
        anchor_version(3, sync_every=4, max_staleness=1, save_every=0)


@pytest.mark.parametrize(("k", "m", "save"), [(1, 0, 4), (1, 1, 4), (3, 4, 6), (4, 4, 8), (2, 1, 6)])
def test_a_resumed_run_asks_versions_it_has(k, m, save):
    """Resuming at a checkpoint c (a multiple of S) has only the weights of c and later: every step from c on
    uses a version >= c that is a sync point, within max_staleness."""
    rule = {"sync_every": k, "max_staleness": m, "save_every": save}
    for s in range(40):
        v = anchor_version(s, **rule)
        assert 0 <= s - v <= m and is_sync_point(v, sync_every=k, save_every=save)
        assert v >= s // save * save  # never older than the checkpoint a resumed run starts from


def test_sync_knobs_validate(tmp_path):
    base = [f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="only applies to generation.sync=steps"):
        load_config(None, [*base, "generation.sync_every=3"])
    with pytest.raises(ConfigError, match="sync_every <= max_staleness"):
        load_config(None, [*base, "generation.sync=steps", "generation.sync_every=3", "generation.max_staleness=1"])
    cfg = load_config(None, [*base, "generation.sync=steps", "generation.sync_every=4", "generation.max_staleness=4"])
    anchors = plan(cfg, "train").anchors
    assert (anchors.source, anchors.in_batches, anchors.sync_every, anchors.max_staleness, anchors.weights) == (
        "steps",
        False,
        4,
        4,
        "full",
    )
    lora = load_config(None, [*base, "generation.sync=steps", "model.lora_r=4", "generation.lora_sync=merged"])
    assert plan(lora, "train").anchors.weights == "merged"
    with pytest.raises(ConfigError, match="train.anchors=column"):
        plan(load_config(None, [*base, "generation.sync=steps", "train.anchors=online"]), "train")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_weights_published_as_adapters_or_merged_give_the_policy():
    """The merged payload (W + B A alpha/r per target layer) loaded into the base model, and the adapters loaded
    into a fresh peft copy, both reproduce the LoRA policy's logits; the checksum sees any change."""
    from pipeline.generation.hf_engine import HFEngine

    tok, cfg = byte_tokenizer(), ModelConfig(lora_r=4)
    policy = apply_lora(cfg, build_model(cfg, len(tok), seed=0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; a trained adapter does not
    ids = torch.tensor([tok.encode("Q: 2 plus 2 is")])
    base = HFEngine(build_model(cfg, len(tok), seed=0), tok)
    before = _logits(base.model, ids)
    merged = policy_weights(policy, "merged")
    assert len(merged) == 4 * cfg.tiny_layers  # q, k, v, o of every layer
    assert base.update_weights(merged) == len(merged)
    torch.testing.assert_close(_logits(base.model, ids), _logits(policy, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, _logits(base.model, ids))
    copy = HFEngine(apply_lora(cfg, build_model(cfg, len(tok), seed=0)), tok)
    adapters = policy_weights(policy, "adapters")
    assert len(adapters) == 2 * len(merged) and all(".lora_" in n for n, _ in adapters)
    copy.update_weights(adapters)
    torch.testing.assert_close(_logits(copy.model, ids), _logits(policy, ids), rtol=1e-5, atol=1e-5)
    full = policy_weights(build_model(cfg, len(tok), seed=0), "full")
    changed = [(n, t + 1e-3 if i == 0 else t) for i, (n, t) in enumerate(full)]
    assert weights_checksum(full) == weights_checksum([(n, t.clone()) for n, t in full]) != weights_checksum(changed)


def test_the_plan_records_the_sync_rule(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "generation.sync=steps"])
    record = dataclasses.asdict(plan(cfg, "train").anchors)
    assert record["source"] == "steps" and (record["sync_every"], record["max_staleness"]) == (1, 1)
    assert plan(cfg, "train").reference.worker_model  # precompute reference + live anchors: a live reference
