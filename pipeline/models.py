"""Tokenizers and causal-LM models: any HF name or local folder, or the built-in ``tiny`` ones.

``model.name=tiny`` builds a small Llama from a config in-process (seeded, so every worker and stage gets the
same weights) with the built-in byte-level tokenizer: nothing is downloaded. Any other name goes through
``transformers``' ``from_pretrained`` (hub name or local folder); offline runs set ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig

log = logging.getLogger(__name__)

TINY = "tiny"
# Built-in byte-level tokenizer: 4 specials, then the 256 byte symbols of the GPT-2 byte-level alphabet.
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


@functools.lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def byte_tokenizer():
    """The built-in tokenizer: one token per UTF-8 byte, round-trips any text, pads on the left."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tok.padding_side = "left"
    tok.model_max_length = 4096
    return tok


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``model.tokenizer`` (else ``model.name``), with a pad token and left padding."""
    from pipeline.model_store import resolve_model_source

    source = resolve_model_source(cfg.tokenizer or cfg.name)  # registry names and .gguf files -> HF folders
    if source == TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {source!r} has neither a pad nor an EOS token; set one in its config")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # reloaded tokenizers forget it
    return tok


def tiny_config(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_hidden_size * 2,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )


def zero_dropout(config: Any) -> list[str]:
    """Set every dropout probability of an HF config to 0 (DPO's log-ratios must be deterministic).

    Returns the names it changed so callers can report them.
    """
    changed = []
    for key, value in list(vars(config).items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value != 0.0:
            setattr(config, key, 0.0)
            changed.append(key)
    return changed


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.torch_dtype: {name!r} is not float32, bfloat16 or float16") from None


def build_model(cfg: ModelConfig, vocab_size: int, *, name: str | None = None, seed: int = 0):
    """A causal LM with dropout off: ``tiny`` from a config (seeded), else ``from_pretrained``.

    ``name`` overrides ``cfg.name`` (e.g. to load a checkpoint folder with the same settings).
    """
    from pipeline.model_store import resolve_model_source

    source = resolve_model_source(name or cfg.name)  # registry names and .gguf files -> HF folders
    if source == TINY:
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_config(cfg, vocab_size))
        return model.to(_dtype(cfg.torch_dtype))
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    changed = zero_dropout(hf_config)
    if changed:
        log.info("model %s: dropout set to 0 for %s", source, ", ".join(changed))
    kwargs: dict[str, Any] = {"config": hf_config, "dtype": _dtype(cfg.torch_dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if model.config.vocab_size < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def save_pretrained(model, tokenizer, out_dir: str | Path) -> Path:
    """Write an HF folder (safetensors, config, generation config, tokenizer) loadable by transformers/vLLM."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def apply_lora(cfg: ModelConfig, model):
    """``model`` wrapped with peft LoRA adapters as ``model.lora_*`` configures (the policy, and the generation
    actors' copy of it under ``generation.sync=steps`` with ``lora_sync=adapters``)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules))  # fmt: skip
    return get_peft_model(model, lora)


def load_pretrained(cfg: ModelConfig, name: str, *, seed: int):
    """(model, tokenizer) in eval mode: the one loader of a policy or reference for inference and generation.

    ``name``: a folder, a hub name or ``tiny`` (built from ``cfg`` with ``seed``, like the train workers). The
    tokenizer is the folder's own when ``name`` is a folder other than ``model.name`` that holds one (an export
    of this run), else the run's (``model.tokenizer`` or ``model.name``).
    """
    tok_cfg = cfg
    if name != cfg.name and (Path(name) / "tokenizer_config.json").is_file():
        tok_cfg = dataclasses.replace(cfg, tokenizer=str(name))
    tok = build_tokenizer(tok_cfg)
    model = build_model(cfg, len(tok), name=name, seed=seed)
    return model.eval(), tok
