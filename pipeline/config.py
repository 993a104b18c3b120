"""Run configuration: one frozen dataclass per concern, nested in :class:`RunConfig`.

Defaults live here. YAML files only override them; unknown keys raise with their dotted path; command-line
``a.b.c=value`` overrides are applied last (values parsed as YAML scalars, so ``train.max_steps=20`` is an int).
``loss.preset`` picks a preset from :data:`tidpo.config.PRESETS`; explicit ``loss.*`` keys override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pipeline.configlib import (  # noqa: F401  (re-exported: the config API lives in pipeline.config)
    ConfigError,
    build_dataclass,
    check_resources,
    check_storage_path,
    dataclass_fields_doc,
    flatten,
    merge_overrides,
    parse_override,
    read_yaml,
    to_dict,
    to_yaml,
)
from tidpo.config import PRESETS, LossConfig, check_preset

# The loss preset when a config names none: the embedded tiny run's (see tidpo.config.PRESETS).
DEFAULT_PRESET = "paper_rpo"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Preference data: where it comes from, how it is parsed, tokenized, validated and split.

    ``path`` is a local file, folder or glob, ``hf:NAME`` for a Hugging Face dataset, or ``synthetic`` for the
    built-in task. ``fields`` remaps column names, e.g. ``{"prompt": "question", "chosen": "good"}``.
    """

    path: str = "synthetic"
    format: str = "auto"
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)
    max_length: int = 256
    max_prompt_length: int = 128
    eval_fraction: float = 0.1
    eval_size: int | None = None
    max_bad_fraction: float = 0.05
    # A row (a JSONL line, a record) over this many bytes is quarantined as row_too_large without being held.
    max_row_bytes: int = 1 << 20
    deduplicate: bool = True
    synthetic_task: str = "sort"
    synthetic_num_pairs: int = 2048
    synthetic_seed: int = 0
    num_shards: int = 1
    read_blocks: int = 0  # blocks the raw rows are split into before tokenizing; 0: the Ray cluster's CPU count

    def __post_init__(self) -> None:
        if self.eval_size is not None and self.eval_size < 0:
            raise ConfigError(f"data.eval_size must be >= 0, got {self.eval_size}")
        if self.num_shards < 1:
            raise ConfigError(f"data.num_shards must be >= 1, got {self.num_shards}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be < data.max_length ({self.max_length})"
            )
        if self.max_row_bytes < 1024:
            raise ConfigError(f"data.max_row_bytes must be >= 1024, got {self.max_row_bytes}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Policy (and reference) model. ``name`` is an HF hub name, a local folder, or ``tiny`` (built in-process).

    ``tokenizer`` defaults to ``name``; with ``name=tiny`` it defaults to the built-in byte-level tokenizer.
    ``reference``: ``precompute`` (reference token log-probs computed once and cached), ``copy`` (a frozen copy
    in each worker) or ``lora`` (adapters switched off); ``auto`` picks precompute unless the loss needs full
    reference logits (TDPO2's KL), then copy.
    """

    name: str = "tiny"
    tokenizer: str | None = None
    torch_dtype: str = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    reference: Literal["auto", "precompute", "copy", "lora"] = "auto"
    reference_name: str | None = None
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 2
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    merge_lora: bool = True

    def __post_init__(self) -> None:
        if self.reference == "lora" and self.lora_r <= 0:
            raise ConfigError("model.reference=lora needs model.lora_r > 0")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Anchor generation and evaluation sampling. ``engine``: auto (vLLM when it and a GPU exist), hf, vllm."""

    engine: Literal["auto", "hf", "vllm"] = "auto"
    num_engines: int = 1
    batch_size: int = 32
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    stop: tuple[str, ...] = ()
    sync: Literal["round", "steps"] = "round"  # steps: actors make the next step's anchors (generation/sync_pool.py)
    sync_every: int = 1
    tensor_parallel_size: int = 1
    gpus_per_engine: float = 1.0
    cpus_per_engine: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_retries: int = 2
    # sync=steps: the most steps an anchor's weights may lag (the trainer waits rather than use older ones)
    max_staleness: int = 1
    # sync=steps with LoRA: publish the adapters or the merged layers (vLLM: merged); anchor_sync.json times both
    lora_sync: Literal["adapters", "merged"] = "adapters"
    enforce_eager: bool = False  # vLLM: skip CUDA-graph capture (required by the CPU build; faster start-up)
    resources: dict[str, float] = field(default_factory=dict)  # per actor, e.g. {"gen_node": 0.01}: pinned

    def __post_init__(self) -> None:
        default = {f.name: f.default for f in fields(self)}  # the steps-only keys must keep theirs under round
        unused = [n for n in ("sync_every", "max_staleness", "lora_sync") if getattr(self, n) != default[n]]
        if self.sync == "round" and unused:
            raise ConfigError(f"generation.{unused[0]} only applies to generation.sync=steps")
        if not 1 <= self.sync_every <= self.max_staleness + 1:  # else a step waits for weights never published
            raise ConfigError(f"generation: need 1 <= sync_every <= max_staleness + 1, got {self.sync_every}, "
                              f"{self.max_staleness}")  # fmt: skip
        if self.temperature < 0:
            raise ConfigError(f"generation.temperature must be >= 0, got {self.temperature}")
        check_resources("generation.resources", self.resources)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Ray Train + DeepSpeed training. Batch sizes are per worker; the global batch is
    ``micro_batch_size * grad_accum * num_workers``."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # ScalingConfig.placement_strategy: PACK, SPREAD, STRICT_PACK (one node), STRICT_SPREAD (a worker per node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Extra Ray resources per worker merged into CPU/GPU, e.g. {"train_node": 0.01} or {"accelerator_type:H100":
    # 0.001}: workers only start on nodes that advertise them.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # A node holding workers dies: the group restarts from the last checkpoint (one of max_failures). wait: all
    # num_workers again once the cluster can place them (retried every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S);
    # continue (a smaller group) is refused: it would change the global batch and the checkpoint's ZeRO partitions.
    on_node_loss: Literal["wait", "continue"] = "wait"
    # Ray Train checkpoints: "" = <stage_dir>/ray (output_dir on a filesystem every node mounts), else a shared
    # absolute path or URI (s3://bucket/runs, file:///nfs/ckpt) + the stage's path; metrics and model stay put.
    storage_path: str = ""
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    bf16: bool = False
    # bf16: training forwards (and the reference precompute) under torch.autocast, float32 weights and optimizer
    # (benchmarks/bench_autocast.py); evaluation stays float32. train.bf16 (DeepSpeed bf16 weights) excludes it.
    autocast: Literal["none", "bf16"] = "none"
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_steps: int = 60
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # shared: one forward, attribution by autograd.grad(retain_graph), then the loss backward on that graph;
    # separate: an attribution-only pass first (needed under ZeRO-3, which re-partitions after a backward); auto.
    attribution_pass: Literal["auto", "shared", "separate"] = "auto"
    anchors: Literal["column", "online", "none"] = "column"
    log_every: int = 1
    # Logged steps always reach metrics.jsonl and MLflow; ray.train.report at most once per report_interval_s (eval
    # and checkpoint steps always): the controller polls one report per worker every 2 s into a queue of one, so
    # reporting faster stalls training (measured: 0.1 s steps became 2.0 s). 0 reports every logged step.
    report_interval_s: float = 2.0
    eval_every: int = 0
    save_every: int = 20
    keep_last: int = 2
    max_failures: int = 1
    max_nonfinite_steps: int = 5
    sft_steps: int = 100
    sft_lr: float = 2e-3
    seed: int = 0

    @property
    def shared_attribution(self) -> bool:
        return self.attribution_pass == "shared" or (self.attribution_pass == "auto" and self.zero_stage != 3)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {self.num_workers}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.attribution_pass == "shared" and self.zero_stage == 3:
            raise ConfigError("train.attribution_pass=shared does not work under ZeRO-3; use separate or auto")
        if self.bf16 and not self.use_gpu:
            raise ConfigError("train.bf16 needs train.use_gpu=true")
        if self.bf16 and self.autocast != "none":
            raise ConfigError("train.bf16 (bf16 weights) and train.autocast=bf16 are exclusive: choose one")
        if self.report_interval_s < 0:
            raise ConfigError(f"train.report_interval_s must be >= 0, got {self.report_interval_s}")
        check_resources("train.resources_per_worker", self.resources_per_worker)
        check_storage_path("train.storage_path", self.storage_path)
        if self.on_node_loss == "continue":
            raise ConfigError("train.on_node_loss=continue is not supported: fewer workers would change the global "
                              "batch (micro_batch_size x grad_accum x num_workers); use wait")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """Ray Tune search. ``space`` maps dotted config keys to distributions, e.g.
    ``{"loss.lam": {"uniform": [0, 1]}, "loss.sigma_div": {"choice": [2, 4, 8]}}``."""

    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 6
    search_alg: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: str = "eval/rewards/accuracies"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = 1
    grace_period: int = 10
    seed: int = 0
    # ASHA keeps the top 1/reduction_factor of trials at each rung (rungs at grace_period * rf^k steps).
    reduction_factor: float = 2.0
    # train.eval_every for the trials when train.eval_every is 0 (ASHA needs the metric at intermediate steps).
    eval_every: int = 5
    # CPUs held by each trial's driver (the Train controller); the training workers ask for train.* resources.
    trial_cpus: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_concurrent", "grace_period"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"tune.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.eval_every < 0:
            raise ConfigError(f"tune.eval_every must be >= 0, got {self.eval_every}")
        if self.trial_cpus <= 0:
            raise ConfigError(f"tune.trial_cpus must be > 0 (Ray refuses 0-CPU trials), got {self.trial_cpus}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation: which measures run, their files, and the sampling budget."""

    benchmarks: tuple[str, ...] = ("preference", "synthetic", "diversity")
    num_prompts: int = 64
    num_samples: int = 4
    max_new_tokens: int = 64
    ifeval_path: str | None = None
    humaneval_path: str | None = None
    truthfulqa_path: str | None = None
    gsm8k_path: str | None = None
    mmlu_path: str | None = None
    heatmap_pairs: int = 4
    code_timeout_s: float = 5.0
    # HumanEval's model-written code runs under bubblewrap ("bwrap"; without it evaluation refuses). "unsafe-local"
    # runs it as the host user with rlimits and an in-process guard only: an explicit opt-in, recorded in results.
    sandbox: Literal["bwrap", "unsafe-local"] = "bwrap"
    # Sampling of the evaluation generations (diversity, judge, KL on samples): the eval protocol's own, so
    # tuning the anchors' sampling (generation.*) does not change what is measured.
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    # Pairs per forward in the preference pass; pairs (from the start of the eval split) whose TI-DPO weights are
    # computed for the weight diagnostics (attribution costs a backward, so only a few); rows per benchmark.
    batch_size: int = 16
    weight_diag_pairs: int = 32
    benchmark_limit: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"eval.temperature must be > 0 (sampled evaluation generations), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow. ``tracking_uri`` None means ``MLFLOW_TRACKING_URI`` if set, else sqlite under the output folder."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "tidpo"
    run_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Where Ray runs. ``address`` None: ``RAY_ADDRESS`` if set, else a local Ray started by the command."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int = 512 * 1024**2


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """``tidpo run``: SFT warm start, then ``rounds`` of generate -> train -> evaluate."""

    rounds: int = 2
    compare: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one command needs; ``output_dir`` holds every artifact of the run."""

    output_dir: str = "outputs/tiny"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig.from_preset(DEFAULT_PRESET))
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


def _apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """The loss section resolved: its preset's values, then the explicit keys on top.

    From a YAML file or overrides every ``loss.*`` key given is explicit. A section that lists ``explicit``
    (a resolved config written back by ``to_dict``) keeps only those keys' values, so a changed preset means
    on this path exactly what it means everywhere else.
    """
    loss = dict(raw.get("loss") or {})
    preset = loss.pop("preset", DEFAULT_PRESET)
    try:
        check_preset(preset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    explicit = loss.pop("explicit", None)
    if explicit is None:
        explicit = sorted(loss)
    elif not isinstance(explicit, (list, tuple)) or not all(isinstance(k, str) for k in explicit):
        raise ConfigError(f"loss.explicit: expected a list of loss keys, got {explicit!r}")
    chosen = {k: loss[k] for k in explicit if k in loss}
    return {**raw, "loss": {**PRESETS[preset], **chosen, "preset": preset, "explicit": sorted(chosen)}}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts (unknown keys raise with their dotted path)."""
    return build_dataclass(RunConfig, _apply_preset(raw or {}), "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file (if any) <- ``dotted.key=value`` overrides; unknown keys raise."""
    raw = read_yaml(path) if path else {}
    return from_dict(merge_overrides(raw, list(overrides)))


def replace(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A new config with dotted-key overrides ``{"loss.lam": 0.3}`` applied and validated.

    ``loss.preset`` resets the loss keys to the new preset's values, except those set explicitly (in the
    config, or in ``overrides``); the result equals loading the config with these overrides on the command line.
    """
    raw = to_dict(cfg)
    for dotted, value in overrides.items():
        node = raw
        keys = dotted.split(".")
        for key in keys[:-1]:
            if key not in node or not isinstance(node[key], dict):
                raise ConfigError(f"unknown config key: {dotted}")
            node = node[key]
        if keys[-1] not in node or dotted == "loss.explicit":
            raise ConfigError(f"unknown config key: {dotted}")
        node[keys[-1]] = value
        if keys[0] == "loss" and len(keys) == 2 and keys[1] != "preset":
            raw["loss"]["explicit"] = sorted({*raw["loss"]["explicit"], keys[1]})
    return from_dict(raw)


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted key, type, default) of every leaf of :class:`RunConfig`: the README's config reference."""
    return dataclass_fields_doc(RunConfig)
