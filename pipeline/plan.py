"""The run plan: every decision a stage takes, made once, from the config and the output folder's layout.

``plan(cfg, stage)`` resolves what a stage will do: its folders, the policy it starts from, the reference
(kind, which weights, whether the worker loads them), the anchors (source, folder, whether batches carry them),
steps, learning rate and seeds. The drivers build it; the Ray Train worker receives it as it is; train,
generate, tune, evaluate and the loop read it and decide nothing themselves. It is a pure function of its
arguments, except that the standalone stages (``train``, ``generate``, ``evaluate``, ``tune``) look at which
exported models exist in the output folder (:func:`latest_policy`, :func:`start_model`).

Stages: ``sft`` (warm start), ``train`` (``tidpo train``), ``round`` (round k of ``tidpo run``), ``trial`` (one
Ray Tune trial), ``generate`` (``tidpo generate``) and ``evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, RunConfig

Stage = Literal["sft", "train", "round", "trial", "generate", "evaluate"]
STAGES: tuple[str, ...] = ("sft", "train", "round", "trial", "generate", "evaluate")
ReferenceKind = Literal["none", "precompute", "copy", "lora"]
AnchorSource = Literal["none", "column", "online", "steps"]


@dataclass(frozen=True)
class Layout:
    """Every path of an output folder (``output_dir``)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / name

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def train(self) -> Path:
        return self.root / "train"

    def round(self, k: int) -> Path:
        return self.root / "rounds" / f"round-{k}"

    @property
    def model_link(self) -> Path:
        """The loop's newest round's model (a symlink ``tidpo run`` moves forward each round)."""
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    def trial(self, trial_id: str) -> Path:
        return self.tune / "trials" / trial_id

    def anchors(self, k: int, split: str = "train") -> Path:
        return self.root / "anchors" / (f"round-{k}" if split == "train" else f"round-{k}-{split}")


def model_dir(stage_dir: Path) -> Path:
    """Where a training stage exports its policy."""
    return stage_dir / "model"


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def latest_policy(cfg: RunConfig) -> str:
    """THE rule for "the current policy" of an output folder (generation and evaluation use it).

    First existing of: the loop's newest round (``<out>/model``), ``tidpo train``'s export (``<out>/train/model``),
    the SFT warm start (``<out>/sft/model``); else ``model.name``. An order, not file times: copying a folder
    (which resets mtimes) cannot change the answer.
    """
    lay = Layout(Path(cfg.output_dir))
    for candidate in (lay.model_link, model_dir(lay.train), model_dir(lay.sft)):
        if is_model_folder(candidate):
            return str(candidate)
    return cfg.model.name


def start_model(cfg: RunConfig) -> str:
    """The policy preference training starts from (and the default reference): the SFT export, else the base."""
    sft = model_dir(Layout(Path(cfg.output_dir)).sft)
    return str(sft) if is_model_folder(sft) else cfg.model.name


def reference_kind(cfg: RunConfig) -> ReferenceKind:
    """How the reference is served (the one definition): ``model.reference``, with ``auto`` resolved.

    auto: none for a reference-free loss (SimPO); a frozen copy when the loss needs reference LOGITS (TDPO2's
    KL), since those cannot be precomputed per token; the adapters switched off for a LoRA policy (free); else
    log-probs precomputed once.
    """
    if not cfg.loss.needs_reference:
        return "none"
    kind = cfg.model.reference
    if kind == "auto":
        if cfg.model.lora_r > 0:
            return "lora"
        return "copy" if cfg.loss.needs_ref_logits else "precompute"
    if kind == "precompute" and cfg.loss.needs_ref_logits:
        raise ConfigError("model.reference=precompute cannot serve base_loss=tdpo with alpha_kl > 0 (needs logits)")
    return kind


def anchor_source(cfg: RunConfig) -> AnchorSource:
    """Where the triplet's anchors come from (the one definition): none without the triplet term, else
    ``train.anchors`` (``column``: generated before training, ``online``: sampled inside each step), or ``steps``
    (``generation.sync=steps``: generation actors make them from the policy during training)."""
    if not cfg.loss.uses_triplet:
        return "none"
    if cfg.train.anchors == "none":
        raise ConfigError("loss.gamma > 0 needs anchors: set train.anchors=column (or online), or loss.gamma=0")
    if cfg.generation.sync == "steps":
        if cfg.train.anchors != "column":
            raise ConfigError("generation.sync=steps makes the engines' anchors during training: use it with "
                              f"train.anchors=column, not {cfg.train.anchors}")  # fmt: skip
        if cfg.train.zero_stage == 3:
            raise ConfigError("generation.sync=steps publishes whole parameters: not with train.zero_stage=3")
        return "steps"
    return cfg.train.anchors


def anchor_settings(cfg: RunConfig) -> dict[str, object]:
    """Everything in the config that changes a generated anchor (part of the anchors' cache key)."""
    g = cfg.generation
    return {
        "temperature": g.temperature,
        "top_k": g.top_k,
        "top_p": g.top_p,
        "max_new_tokens": g.max_new_tokens,
        "seed": g.seed,
        "stop": list(g.stop),
        "anchor_context": cfg.loss.anchor_context,
        "anchor_prefix_tokens": cfg.loss.anchor_prefix_tokens,
        "model_seed": cfg.seed,
    }


@dataclass(frozen=True, kw_only=True)
class ReferencePlan:
    """The reference of a stage.

    ``model``: the reference weights (folder, hub name or ``tiny``), None for ``kind=none``.
    ``worker_model``: what each train worker loads as a frozen copy (None: nothing loaded).
    ``adapters_off``: the reference is the LoRA policy with its adapters disabled.
    ``precompute``: reference log-prob columns are computed once into the cache before training.
    """

    kind: ReferenceKind
    model: str | None
    worker_model: str | None
    adapters_off: bool
    precompute: bool


@dataclass(frozen=True, kw_only=True)
class AnchorPlan:
    """The anchors of a stage. ``folder`` holds column anchors (generated from ``generate_from``).

    ``steps`` (generation.sync=steps): ``sync_every`` / ``max_staleness`` fix which weights version each step's
    anchors come from (:func:`pipeline.generation.sync_pool.anchor_version`); ``weights`` is what rank 0
    publishes: all parameters (``full``), or a LoRA policy's ``adapters`` or ``merged`` target layers.
    """

    source: AnchorSource
    folder: Path | None
    generate_from: str | None
    in_batches: bool  # batches carry anchor columns (column anchors)
    context: str
    prefix_tokens: int
    sync_every: int = 0
    max_staleness: int = 0
    weights: Literal["none", "full", "adapters", "merged"] = "none"


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What one stage does; built by :func:`plan`, read by the stage and (training) its Ray Train workers."""

    stage: Stage
    mode: Literal["sft", "preference", "generate", "evaluate"]
    layout: Layout
    stage_dir: Path
    round_idx: int
    init_model: str
    reference: ReferencePlan
    anchors: AnchorPlan
    max_steps: int
    lr: float
    seed: int  # the run seed: tiny model weights, data order, evaluation sampling
    train_seed: int  # the workers' torch RNG (random weights, ...)
    train_split: Path
    eval_split: Path

    @property
    def model_dir(self) -> Path:
        return model_dir(self.stage_dir)

    @property
    def metrics_path(self) -> Path:
        return self.stage_dir / "metrics.jsonl"


_NO_REFERENCE = ReferencePlan(kind="none", model=None, worker_model=None, adapters_off=False, precompute=False)


def _reference(cfg: RunConfig, model: str) -> ReferencePlan:
    kind = reference_kind(cfg)
    if kind == "none":
        return _NO_REFERENCE
    ref = cfg.model.reference_name or model
    # precompute + online anchors: the anchors' reference log-ratios need a live reference in the step
    live = kind == "copy" or (kind == "precompute" and anchor_source(cfg) in ("online", "steps"))
    return ReferencePlan(
        kind=kind, model=ref, worker_model=ref if live else None, adapters_off=kind == "lora",
        precompute=kind == "precompute",
    )  # fmt: skip


def _anchors(cfg: RunConfig, layout: Layout, round_idx: int, policy: str, *, preference: bool) -> AnchorPlan:
    source = anchor_source(cfg) if preference else "none"
    column, g = source == "column", cfg.generation
    steps = {}
    if source == "steps":
        weights = g.lora_sync if cfg.model.lora_r > 0 else "full"
        steps = {"sync_every": g.sync_every, "max_staleness": g.max_staleness, "weights": weights}
    return AnchorPlan(
        source=source, folder=layout.anchors(round_idx) if column else None, generate_from=policy if column else None,
        in_batches=column, context=cfg.loss.anchor_context, prefix_tokens=cfg.loss.anchor_prefix_tokens, **steps,
    )  # fmt: skip


def plan(
    cfg: RunConfig,
    stage: Stage,
    *,
    round_idx: int = 0,
    model: str | None = None,
    trial_id: str | None = None,
) -> StagePlan:
    """Resolve ``stage`` of ``cfg`` (see the module docstring).

    ``round_idx``: the loop round (``round``: k >= 1; ``generate``/``evaluate``: the round they serve).
    ``model``: the policy to start from / generate with / evaluate, overriding the layout's rule (``--model``).
    ``trial_id``: the Tune trial (``trial``).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    layout = Layout(Path(cfg.output_dir))
    tc = cfg.train
    common = {"layout": layout, "seed": cfg.seed, "train_seed": tc.seed, "train_split": layout.split("train"),
              "eval_split": layout.split("eval")}  # fmt: skip
    if stage == "sft":
        return StagePlan(
            stage=stage, mode="sft", stage_dir=layout.sft, round_idx=0, init_model=model or cfg.model.name,
            reference=_NO_REFERENCE, anchors=_anchors(cfg, layout, 0, cfg.model.name, preference=False),
            max_steps=tc.sft_steps, lr=tc.sft_lr, **common,
        )  # fmt: skip
    if stage in ("generate", "evaluate"):
        if model and model != cfg.model.name and not Path(model).is_dir():
            raise FileNotFoundError(f"--model {model}: no such model folder")
        policy = model or latest_policy(cfg)
        reference = None
        if stage == "evaluate":  # rewards and KL are measured against the start model, whatever the loss
            ref = cfg.model.reference_name or start_model(cfg)
            reference = ReferencePlan(kind="copy", model=ref, worker_model=None, adapters_off=False, precompute=False)
        return StagePlan(
            stage=stage, mode=stage, stage_dir=layout.anchors(round_idx) if stage == "generate" else layout.eval,
            round_idx=round_idx, init_model=policy, reference=reference or _NO_REFERENCE,
            anchors=_anchors(cfg, layout, round_idx, policy, preference=stage == "generate"),
            max_steps=0, lr=0.0, **common,
        )  # fmt: skip
    if stage == "round":
        if round_idx < 1:
            raise ValueError(f"stage round needs round_idx >= 1, got {round_idx}")
        base = cfg.model.name if tc.sft_steps <= 0 else str(model_dir(layout.sft))
        init = model or (base if round_idx == 1 else str(model_dir(layout.round(round_idx - 1))))
        ref_default, stage_dir = base, layout.round(round_idx)
    elif stage == "trial":
        if not trial_id:
            raise ValueError("stage trial needs a trial_id")
        init = model or start_model(cfg)
        ref_default, stage_dir = init, layout.trial(trial_id)
    else:  # train
        init = model or start_model(cfg)
        ref_default, stage_dir = init, layout.train
    return StagePlan(
        stage=stage, mode="preference", stage_dir=stage_dir, round_idx=round_idx, init_model=init,
        reference=_reference(cfg, ref_default), anchors=_anchors(cfg, layout, round_idx, init, preference=True),
        max_steps=tc.max_steps, lr=tc.lr, **common,
    )  # fmt: skip


def describe(p: StagePlan) -> str:
    """One log line: what the stage will do."""
    ref = p.reference
    return (
        f"{p.stage}: policy {p.init_model}; reference {ref.kind}"
        + (f" ({ref.model})" if ref.model else "")
        + f"; anchors {p.anchors.source}"
        + (f" ({p.anchors.folder})" if p.anchors.folder else "")
        + (f"; {p.max_steps} steps at lr {p.lr:g}" if p.max_steps else "")
    )


def to_record(p: StagePlan) -> dict[str, object]:
    """The plan as plain JSON-able data (recorded in summaries)."""
    return json.loads(json.dumps(dataclasses.asdict(p), default=str))
