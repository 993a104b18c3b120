"""The transformers engine: ``model.generate`` over left-padded batches, with per-row seeded sampling.

``generate`` runs greedy decoding over scores that :class:`RowSampler` (a logits processor) has already
reduced to one allowed token per row: the sampler applies temperature, top-k and top-p itself and draws each
row's token with that row's own ``torch.Generator``. So transformers keeps doing what it is good at (KV cache,
left padding, stopping rows at EOS) while a row's sample depends only on its seed and its context, not on the
rows batched beside it. The sampler also records ``log softmax(raw logits)`` of each drawn token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig
from pipeline.generation.engine import Generation, SamplingParams, default_row_keys, sample_seed, stop_ids

log = logging.getLogger(__name__)


def filter_logits(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k then top-p (nucleus) filtering of (B, V) scores; removed entries become -inf."""
    scores = scores / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= params.top_p  # mass BEFORE a token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


class RowSampler:
    """A logits processor that draws one token per row with the row's own generator and records log-probs.

    Returns scores that are 0 at the drawn token and -inf elsewhere, so ``generate(do_sample=False)`` picks it.
    """

    def __init__(self, params: SamplingParams, seeds: Sequence[int]):
        self.params = params
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.tokens: list[torch.Tensor] = []  # per step, (B,) drawn tokens
        self.logps: list[torch.Tensor] = []  # per step, (B,) raw log-probs of the drawn tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logps = torch.log_softmax(scores.float(), dim=-1)  # (B, V) log pi(. | context)
        if self.params.greedy:
            chosen = scores.argmax(dim=-1)
        else:
            probs = filter_logits(scores.float(), self.params).softmax(-1).cpu()
            chosen = torch.stack(
                [torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(self.generators)]
            ).to(scores.device)
        self.tokens.append(chosen.detach().cpu())
        self.logps.append(logps.gather(1, chosen[:, None])[:, 0].detach().cpu())
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: str | torch.device):
    """(input_ids, attention_mask), both (B, T), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _trim(tokens: list[int], logps: list[float], stops: set[int]) -> tuple[list[int], list[float], str]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1], logps[: i + 1], "stop"
    return tokens, logps, "length"


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams, *, row_keys: Sequence[str] | None = None
) -> list[Generation]:
    """Sample ``params.n`` responses per prompt with an in-memory model (prompt-major order: p0s0, p0s1, ...).

    Usable inside a training step: switches the model to eval for the call and restores its mode.
    """
    from transformers import GenerationConfig

    keys = list(row_keys) if row_keys is not None else default_row_keys(prompt_ids)
    if len(keys) != len(prompt_ids):
        raise ValueError(f"{len(keys)} row keys for {len(prompt_ids)} prompts")
    contexts = [p for p in prompt_ids for _ in range(params.n)]
    seeds = [sample_seed(params.seed, k, j) for k in keys for j in range(params.n)]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask = left_pad(contexts, pad_id, device)
    stops = stop_ids(tokenizer, params.stop_token_ids)
    sampler = RowSampler(params, seeds)
    gen_cfg = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=params.max_new_tokens, eos_token_id=stops,
        pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg, logits_processor=[sampler])
    finally:
        model.train(was_training)
    tokens = torch.stack(sampler.tokens, dim=1).tolist()  # (B*n, steps)
    logps = torch.stack(sampler.logps, dim=1).tolist()
    out = []
    for row_tokens, row_logps in zip(tokens, logps):
        ids, lps, reason = _trim(row_tokens, row_logps, set(stops))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Generation(token_ids=ids, text=text, logprobs=lps, finish_reason=reason))
    return out


class HFEngine:
    """The transformers engine: batched, left-padded, per-row seeded generation on CPU or GPU.

    Args:
        model_path_or_model: an HF folder, ``tiny`` (the base model of ``model_cfg``), or a loaded model.
        tokenizer: required with a loaded model; loaded from the folder otherwise.
        device: ``cpu`` or ``cuda``.
        model_cfg: settings used to load folders (dtype, trust_remote_code); defaults to ``ModelConfig()``.
        seed: the run seed (``tiny`` is built with it, as in the train workers).
        version: a label for the current weights (reported in each anchor's ``anchor_version``).
        batch_size: rows per ``generate`` call (a larger request is split).
    """

    def __init__(self, model_path_or_model: Any, tokenizer=None, device: str = "cpu", *,
                 model_cfg: ModelConfig | None = None, version: str | None = None, batch_size: int = 64,
                 seed: int = 0):  # fmt: skip
        self.model_cfg = model_cfg or ModelConfig()
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        if isinstance(model_path_or_model, (str, Path)):
            self.model, loaded_tok = self._load(str(model_path_or_model))
            self.tokenizer = tokenizer or loaded_tok
            self.version = version or str(model_path_or_model)
        else:
            if tokenizer is None:
                raise ValueError("HFEngine: pass the tokenizer together with an in-memory model")
            self.model, self.tokenizer = model_path_or_model.to(device).eval(), tokenizer
            self.version = version or "in-memory"
        self.tokens_generated = 0

    def _load(self, path: str):
        from pipeline.models import load_pretrained

        model, tok = load_pretrained(self.model_cfg, path, seed=self.seed)
        return model.to(self.device), tok

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, row_keys: Sequence[str] | None = None
    ) -> list[list[Generation]]:
        """``params.n`` generations per prompt, in prompt order."""
        keys = list(row_keys) if row_keys is not None else default_row_keys(prompts)
        flat: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            flat += sample_responses(self.model, self.tokenizer, prompts[start:stop], params, row_keys=keys[start:stop])
        self.tokens_generated += sum(len(g.token_ids) for g in flat)
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def load_weights(self, path: str, *, version: str | None = None) -> None:
        """Reload the policy from an HF checkpoint folder (the tokenizer stays)."""
        self.model, _ = self._load(str(path))
        self.version = version or str(path)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str | None = None):
        """Copy tensors into the parameters/buffers of the same names, in place; unknown names raise.

        Returns the number of tensors copied. Names may carry a ``module.`` prefix (DDP/DeepSpeed wrappers).
        """
        state = self.model.state_dict(keep_vars=True)
        count = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                key = name.removeprefix("module.")
                if key not in state:
                    raise KeyError(f"update_weights: {name!r} is not a parameter of the engine's model")
                target = state[key]
                if target.shape != tensor.shape:
                    raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model's is {tuple(target.shape)}")  # fmt: skip
                target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
                count += 1
        if version is not None:
            self.version = version
        return count
