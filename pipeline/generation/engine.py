"""The generation interface every engine implements, its value types, and the engine choice.

An engine turns a batch of token-id contexts into sampled responses with per-token log-probabilities, and can
take new policy weights (reload from an exported HF folder between rounds, or an in-place tensor update for
step-level sync). Two engines implement it: :class:`~pipeline.generation.hf_engine.HFEngine` (transformers,
CPU or GPU, the engine of the tests) and :class:`~pipeline.generation.vllm_engine.VLLMEngine` (``vllm.LLM``,
GPU clusters; imported lazily).

Log-probabilities are the *raw* model log-probabilities of each sampled token, ``log softmax(logits)`` at
temperature 1 before top-k/top-p filtering (vLLM's default ``logprobs_mode="raw_logprobs"``): that is
``log pi_theta(y_t | context, y_<t)``, the quantity the TI-DPO losses use.

Sampling is seeded per row: the seed of a sample is derived from ``(params.seed, row key, sample index)``, so
the same row gets the same anchor whatever batch it lands in and whichever engine actor runs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipeline.config import GenerationConfig, RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding (top_k/top_p then ignored).

    Attributes:
        temperature: softmax temperature; 0 = greedy.
        top_k: keep the k most likely tokens; 0 disables.
        top_p: nucleus sampling mass in (0, 1]; 1 disables.
        max_new_tokens: at most this many sampled tokens per response (a stop token included).
        stop_token_ids: generation of a row ends after one of these (the tokenizer's EOS is added by engines).
        seed: base seed; each sample's own seed is derived from it and the row key (:func:`sample_seed`).
        n: samples per prompt.
    """

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, gen: GenerationConfig, stop_token_ids: Iterable[int] = (), **overrides: Any):
        """The sampling parameters of ``cfg.generation`` (``overrides`` replace single fields)."""
        values = {
            "temperature": gen.temperature,
            "top_k": gen.top_k,
            "top_p": gen.top_p,
            "max_new_tokens": gen.max_new_tokens,
            "stop_token_ids": tuple(stop_token_ids),
            "seed": gen.seed,
        }
        return cls(**{**values, **overrides})


@dataclass
class Generation:
    """One sampled response: its token ids (a stop token included when one ended it), text and log-probs.

    ``logprobs[i]`` is the raw model log-probability of ``token_ids[i]``; ``finish_reason`` is ``"stop"`` (a stop
    token ended it) or ``"length"`` (``max_new_tokens`` reached).
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str = "length"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """What the generation stage and the trainer need from an engine."""

    version: str

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, row_keys: Sequence[str] | None = None
    ) -> list[list[Generation]]:
        """``params.n`` generations per prompt, in prompt order; ``row_keys`` seed each row (default: its ids)."""
        ...

    def load_weights(self, path: str, *, version: str | None = None) -> None:
        """Reload the policy from an HF checkpoint folder."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str | None = None):
        """Copy new values into the running model's parameters, in place."""
        ...


def sample_seed(seed: int, row_key: str, sample_idx: int = 0) -> int:
    """A 63-bit seed for one sample from (base seed, row key, sample index): stable across processes."""
    digest = hashlib.sha256(f"{seed}\x1f{row_key}\x1f{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def default_row_keys(prompts: Sequence[Sequence[int]]) -> list[str]:
    """Row keys from the prompt ids themselves (identical prompts then get identical samples)."""
    return [hashlib.sha256(",".join(map(str, p)).encode()).hexdigest()[:16] for p in prompts]


def stop_ids(tokenizer, extra: Iterable[int] = ()) -> list[int]:
    """The token ids that end a response (the one rule): EOS, then ``extra`` (a sampling's stop ids)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return list(dict.fromkeys([*([eos] if eos is not None else []), *(int(t) for t in extra)]))


def stop_token_ids(tokenizer, stop: Iterable[str] = ()) -> list[int]:
    """EOS plus the token id of each ``generation.stop`` string; a string that is not one token raises."""
    ids = []
    for text in stop:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"generation.stop: {text!r} is {len(encoded)} tokens; only single-token stops work")
        ids.append(encoded[0])
    return stop_ids(tokenizer, ids)


def vllm_available() -> bool:
    """True when ``import vllm`` would find the package (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_engine(gen: GenerationConfig) -> tuple[str, str]:
    """(engine kind, the reason) for ``generation.engine``: auto picks vllm only when it and a GPU exist.

    ``engine=vllm`` without vLLM installed raises instead of quietly running the hf engine.
    """
    if gen.engine == "hf":
        return "hf", "generation.engine=hf"
    has_vllm = vllm_available()
    if gen.engine == "vllm":
        if not has_vllm:
            raise RuntimeError(
                "generation.engine=vllm but vLLM is not installed: pip install 'tidpo[vllm]' on a GPU machine, "
                "or set generation.engine=hf"
            )
        return "vllm", "generation.engine=vllm"
    has_gpu = gpu_available()
    if has_vllm and has_gpu:
        return "vllm", "auto: vLLM importable and a CUDA GPU present"
    missing = " and ".join(x for x, ok in (("vLLM", has_vllm), ("a CUDA GPU", has_gpu)) if not ok)
    return "hf", f"auto: no {missing}, using transformers"


def build_engine(cfg: RunConfig, model_path: str, *, kind: str | None = None, version: str | None = None):
    """The engine for ``cfg`` loaded from ``model_path`` (an HF folder, or ``tiny``); logs which and why."""
    if kind is None:
        kind, reason = select_engine(cfg.generation)
        log.info("generation engine: %s (%s)", kind, reason)
    if kind == "vllm":
        from pipeline.generation.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg.generation, cfg.model, version=version)
    if kind == "hf":
        from pipeline.generation.hf_engine import HFEngine

        device = "cuda" if gpu_available() and cfg.generation.gpus_per_engine > 0 else "cpu"
        return HFEngine(model_path, None, device=device, model_cfg=cfg.model, version=version, seed=cfg.seed)
    raise ValueError(f"unknown engine kind {kind!r}: expected hf or vllm")
