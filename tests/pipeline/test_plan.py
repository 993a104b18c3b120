"""The run plan over the config space, without Ray: every preset x reference mode x LoRA x anchor mode x stage.

Expected values are worked out from the definitions in pipeline/plan.py's docstrings, not read back from it:
auto = none (reference-free loss), lora (a LoRA policy), copy (TDPO2 needs reference logits), else precompute.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config, replace, to_dict
from pipeline.plan import STAGES, Layout, anchor_source, latest_policy, plan, reference_kind, start_model
from pipeline.train.worker import epoch_order, micro_batch_rows, micro_batches_per_epoch
from tidpo.config import PRESETS, LossConfig

PRESET_NAMES = sorted(PRESETS)
REFERENCES = ("auto", "precompute", "copy", "lora")
ANCHORS = ("column", "online", "none")


def _expected_kind(preset: str, reference: str, lora: bool) -> str | None:
    """The reference kind from the definitions; None where the config must be refused."""
    p = PRESETS[preset]
    needs_logits = p["base_loss"] == "tdpo" and p["alpha_kl"] > 0
    if p["base_loss"] == "simpo":
        return "none"
    if reference == "auto":
        return "lora" if lora else ("copy" if needs_logits else "precompute")
    if reference == "lora" and not lora:
        return None  # ModelConfig refuses lora without adapters
    if reference == "precompute" and needs_logits:
        return None
    return reference


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", *overrides])


CASES = list(itertools.product(PRESET_NAMES, REFERENCES, (False, True), ANCHORS))


@pytest.mark.parametrize(("preset", "reference", "lora", "anchors"), CASES)
def test_plan_over_the_config_space(tmp_path, preset, reference, lora, anchors):
    overrides = [f"loss.preset={preset}", f"model.reference={reference}", f"train.anchors={anchors}"]
    overrides += ["model.lora_r=4"] if lora else []
    kind = _expected_kind(preset, reference, lora)
    triplet = PRESETS[preset]["gamma"] > 0
    if kind is None:
        with pytest.raises(ConfigError):
            reference_kind(_config(tmp_path, *overrides))
        return
    cfg = _config(tmp_path, *overrides)
    if triplet and anchors == "none":
        with pytest.raises(ConfigError, match="needs anchors"):
            plan(cfg, "train")
        return
    source = anchors if triplet else "none"
    lay = Layout(tmp_path)
    for stage in STAGES:
        p = plan(cfg, stage, round_idx=1 if stage == "round" else 0, trial_id="t1")
        assert p.layout == lay
        if stage == "sft":
            assert (p.mode, p.reference.kind, p.anchors.source) == ("sft", "none", "none")
            assert (p.max_steps, p.lr, p.stage_dir) == (cfg.train.sft_steps, cfg.train.sft_lr, lay.sft)
            continue
        if stage in ("generate", "evaluate"):
            assert p.init_model == "tiny" and p.max_steps == 0
            continue
        ref = p.reference
        assert ref.kind == kind
        assert ref.adapters_off == (kind == "lora")
        assert ref.precompute == (kind == "precompute")
        live = kind == "copy" or (kind == "precompute" and source == "online")
        assert ref.worker_model == (ref.model if live else None)
        assert p.anchors.source == source
        assert p.anchors.in_batches == (source == "column")
        assert p.anchors.folder == (lay.anchors(p.round_idx) if source == "column" else None)
        assert (p.max_steps, p.lr, p.seed, p.train_seed) == (cfg.train.max_steps, cfg.train.lr, 0, 0)


def test_stage_models_follow_the_layout(tmp_path):
    """Round k starts from round k-1's export (round 1: SFT); the reference is the start model; standalone
    stages use the first existing of <out>/model, train/model, sft/model, else the base (an order, not mtimes)."""
    cfg = _config(tmp_path, "model.lora_r=4")
    lay = Layout(tmp_path)
    assert plan(cfg, "round", round_idx=1).init_model == str(lay.sft / "model")
    assert plan(cfg, "round", round_idx=3).init_model == str(lay.round(2) / "model")
    assert plan(cfg, "round", round_idx=3).reference.model == str(lay.sft / "model")
    assert plan(replace(cfg, {"train.sft_steps": 0}), "round", round_idx=1).init_model == "tiny"
    assert plan(replace(cfg, {"model.reference_name": "/ref"}), "round", round_idx=2).reference.model == "/ref"
    assert latest_policy(cfg) == start_model(cfg) == "tiny"
    for folder in (lay.sft / "model", lay.train / "model", lay.model_link):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        assert latest_policy(cfg) == str(folder)
    assert start_model(cfg) == str(lay.sft / "model")
    assert plan(cfg, "train").init_model == str(lay.sft / "model")
    assert plan(cfg, "evaluate").init_model == str(lay.model_link)
    assert plan(cfg, "evaluate").reference.model == str(lay.sft / "model")
    assert plan(cfg, "train", model="/m").init_model == "/m"
    with pytest.raises(ValueError, match="round_idx >= 1"):
        plan(cfg, "round")


def test_anchor_source_definition(tmp_path):
    assert anchor_source(_config(tmp_path, "loss.preset=dpo", "train.anchors=none")) == "none"
    assert anchor_source(_config(tmp_path, "loss.preset=paper", "train.anchors=online")) == "online"
    with pytest.raises(ConfigError, match="needs anchors"):
        anchor_source(_config(tmp_path, "loss.preset=paper", "train.anchors=none"))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_a_preset_means_the_same_on_every_path(tmp_path, preset):
    """YAML/overrides, replace() on a resolved config (the Tune trial path) and LossConfig.from_preset agree."""
    loaded = _config(tmp_path, f"loss.preset={preset}").loss
    for start in PRESET_NAMES:
        replaced = replace(_config(tmp_path, f"loss.preset={start}"), {"loss.preset": preset}).loss
        assert replaced == loaded, (start, preset)
    assert loaded == LossConfig.from_preset(preset)


def test_explicit_loss_keys_survive_a_preset_change(tmp_path):
    cfg = _config(tmp_path, "loss.preset=paper", "loss.lam=0.3")
    dpo = replace(cfg, {"loss.preset": "dpo"}).loss
    assert (dpo.lam, dpo.weighting, dpo.gamma, dpo.explicit) == (0.3, "uniform", 0.0, ("lam",))
    both = replace(cfg, {"loss.preset": "official", "loss.gamma": 0.0}).loss
    assert (both.base_loss, both.alpha_kl, both.gamma, both.lam) == ("tdpo", 0.5, 0.0, 0.3)
    assert (
        load_config(None, [f"output_dir={tmp_path}", "loss.preset=official", "loss.gamma=0", "loss.lam=0.3"]).loss
        == both
    )
    from pipeline.config import from_dict

    assert from_dict(to_dict(replace(cfg, {"loss.preset": "dpo"}))).loss == dpo  # the roundtrip keeps it


def test_tune_trials_over_presets_resolve_as_the_presets(tmp_path):
    from pipeline.tune.trial import trial_config

    base = _config(tmp_path, "loss.preset=paper_rpo")
    for preset in PRESET_NAMES:
        loss = trial_config(base, {"loss.preset": preset}).loss
        assert loss == LossConfig.from_preset(preset)
    kinds = {p: plan(trial_config(base, {"loss.preset": p}), "trial", trial_id="x").reference.kind for p in PRESETS}
    assert kinds == {"paper": "precompute", "paper_rpo": "precompute", "dpo": "precompute", "official": "copy"}


@pytest.mark.parametrize(
    "override",
    ["generation.sync_every=3", "generation.max_staleness=2", "generation.lora_sync=merged", "generation.n=4",
     "train.backend=ddp"],
)  # fmt: skip
def test_knobs_that_do_nothing_are_refused(tmp_path, override):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, override)
    assert "\n" not in str(info.value)


def test_evaluation_sampling_is_its_own(tmp_path):
    cfg = _config(tmp_path, "generation.temperature=0.2", "generation.top_p=0.5")
    assert (cfg.eval.temperature, cfg.eval.top_p) == (0.8, 0.95)
    with pytest.raises(ConfigError, match="eval.temperature"):
        _config(tmp_path, "eval.temperature=0")


def test_epoch_orders_are_seeded_permutations_that_differ_per_epoch():
    a, b = epoch_order(40, 0, 0), epoch_order(40, 0, 1)
    assert sorted(a) == list(range(40)) and sorted(b) == list(range(40))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(40, 0, 0))
    assert not np.array_equal(a, epoch_order(40, 1, 0))


@pytest.mark.parametrize(("micro", "accum", "world"), [(8, 1, 1), (4, 1, 2), (4, 2, 1), (2, 2, 2), (1, 4, 2)])
def test_a_global_batch_is_the_same_rows_for_any_split(micro, accum, world):
    """Step s of an epoch uses rows order[8s : 8s + 8] whatever (micro, accum, world) makes up the 8."""
    order = epoch_order(35, 7, 2)
    assert micro_batches_per_epoch(35, micro=micro, accum=accum, world=world) == 4 * accum  # 35 // 8 = 4 steps
    for step in range(4):
        rows = [
            micro_batch_rows(order, step * accum + a, micro=micro, accum=accum, world=world, rank=r)
            for a in range(accum)
            for r in range(world)
        ]
        assert sorted(np.concatenate(rows)) == sorted(order[8 * step : 8 * step + 8])
