"""Engines, sampling and anchor row logic without Ray (tiny model, CPU, a few seconds)."""

from __future__ import annotations

import math
import os
import time

import pyarrow as pa
import pytest
import torch

from pipeline.config import GenerationConfig, ModelConfig, load_config
from pipeline.generation.anchor_udf import anchor_columns, anchor_context
from pipeline.generation.engine import Generation, SamplingParams, sample_seed, select_engine, vllm_available
from pipeline.generation.hf_engine import HFEngine, filter_logits, sample_responses
from pipeline.generation.stage import check_rows, resolve_model_path
from pipeline.models import build_model, byte_tokenizer, save_pretrained

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=12, seed=3)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return HFEngine(build_model(ModelConfig(), len(tok), seed=0), tok)


def changed_model(tok):
    """A model whose greedy outputs differ from the seed-0 base: random tiny Llamas with tied embeddings all
    greedily repeat the last token, so flip the sign of the final norm (logits -> -logits)."""
    model = build_model(ModelConfig(), len(tok), seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(-1.0)
    return model


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(f"Q: {i} plus {i * 3} is" + " really" * (i % 4)) for i in range(8)]


def test_sampling_params_validate_and_read_config():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    p = SamplingParams.from_config(GenerationConfig(), [2])
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.stop_token_ids) == (0.8, 50, 0.95, 64, (2,))
    assert SamplingParams(temperature=0.0).greedy and not p.greedy
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b") != sample_seed(1, "a")


def test_engine_choice_is_explicit():
    assert select_engine(GenerationConfig(engine="hf")) == ("hf", "generation.engine=hf")
    kind, reason = select_engine(GenerationConfig(engine="auto"))
    if not (vllm_available() and torch.cuda.is_available()):
        assert kind == "hf" and reason.startswith("auto: no ")
    if not vllm_available():
        with pytest.raises(RuntimeError, match="vLLM is not installed"):
            select_engine(GenerationConfig(engine="vllm"))


def test_filter_logits_top_k_and_top_p_by_hand():
    """probs 0.5, 0.3, 0.15, 0.05: top_p=0.8 keeps the first two (mass before the third is 0.8 >= 0.8);
    top_k=3 drops only the last."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept_p = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8)))
    kept_k = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0)))
    assert kept_p.tolist() == [[True, True, False, False]]
    assert kept_k.tolist() == [[True, True, True, False]]


def test_samples_do_not_depend_on_the_batch(engine, prompts):
    keys = [f"row{i}" for i in range(len(prompts))]
    full = engine.generate(prompts, SAMPLED, row_keys=keys)
    part = engine.generate(prompts[2:5][::-1], SAMPLED, row_keys=keys[2:5][::-1])
    assert [g[0].token_ids for g in part] == [full[i][0].token_ids for i in (4, 3, 2)]
    other_seed = engine.generate(prompts, SamplingParams(**{**SAMPLED.__dict__, "seed": 4}), row_keys=keys)
    assert sum(a[0].token_ids != b[0].token_ids for a, b in zip(full, other_seed)) >= 6
    assert all(len(g[0].token_ids) == SAMPLED.max_new_tokens for g in full)  # the byte model never emits EOS


def test_logprobs_are_the_models_log_softmax(engine, prompts):
    gen = engine.generate(prompts[:2], SAMPLED, row_keys=["a", "b"])
    for prompt, (g,) in zip(prompts[:2], gen):
        ids = torch.tensor([prompt + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(ids).logits[0].float(), -1)
        start = len(prompt) - 1
        expected = logp[start : start + len(g.token_ids)].gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


def test_greedy_is_argmax_and_stop_tokens_end_rows(engine, prompts):
    (g,) = engine.generate(prompts[:1], GREEDY)[0]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        first = engine.model(ids).logits[0, -1].argmax().item()
    assert g.token_ids[0] == first and g.finish_reason == "length"
    (s,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(first,)))[0]
    assert s.token_ids == [first] and s.finish_reason == "stop" and len(s.logprobs) == 1


def test_n_samples_per_prompt_differ(engine, prompts):
    out = engine.generate(prompts[:2], SamplingParams(**{**SAMPLED.__dict__, "n": 3}))
    assert [len(x) for x in out] == [3, 3]
    assert len({tuple(g.token_ids) for g in out[0]}) == 3


def test_weight_sync_changes_then_restores_greedy_outputs(tok, prompts, tmp_path):
    """load_weights (round sync) and update_weights (step sync) both switch to the other model's outputs."""
    model_a, model_b = build_model(ModelConfig(), len(tok), seed=0), changed_model(tok)
    path_a, path_b = save_pretrained(model_a, tok, tmp_path / "a"), save_pretrained(model_b, tok, tmp_path / "b")
    ref_a = [g.token_ids for g in sample_responses(model_a, tok, prompts, GREEDY)]
    ref_b = [g.token_ids for g in sample_responses(model_b, tok, prompts, GREEDY)]
    assert sum(a != b for a, b in zip(ref_a, ref_b)) == len(prompts)
    eng = HFEngine(str(path_a), model_cfg=ModelConfig())
    greedy = lambda: [g[0].token_ids for g in eng.generate(prompts, GREEDY)]  # noqa: E731
    assert greedy() == ref_a
    eng.load_weights(str(path_b), version="b")
    assert greedy() == ref_b and eng.version == "b"
    eng.load_weights(str(path_a), version="a")
    assert greedy() == ref_a
    assert eng.update_weights(model_b.state_dict().items(), version="b-step") == len(model_b.state_dict())
    assert greedy() == ref_b and eng.version == "b-step"
    eng.update_weights((f"module.{n}", t) for n, t in model_a.named_parameters())
    assert greedy() == ref_a
    with pytest.raises(KeyError, match="not a parameter"):
        eng.update_weights([("nope.weight", torch.zeros(1))])


def test_sample_responses_restores_training_mode(tok, prompts):
    model = build_model(ModelConfig(), len(tok)).train()
    out = sample_responses(model, tok, prompts[:3], SAMPLED, row_keys=["x", "y", "z"])
    assert model.training and len(out) == 3 and all(len(g.token_ids) == 12 for g in out)


def test_anchor_context_modes():
    prompt, chosen = [5, 6, 7], [10, 11, 12, 2]
    assert anchor_context(prompt, chosen, "prompt", 8) == ([5, 6, 7], [])
    assert anchor_context(prompt, chosen, "chosen_prefix", 2) == ([5, 6, 7, 10, 11], [10, 11])
    # the prefix never copies the chosen response's last token (EOS): at most chosen_len - 1
    assert anchor_context(prompt, chosen, "chosen_prefix", 8) == ([5, 6, 7, 10, 11, 12], [10, 11, 12])
    with pytest.raises(ValueError, match="anchor_context"):
        anchor_context(prompt, chosen, "nope", 1)


def test_anchor_columns_prefix_then_sample():
    gens = [Generation([40, 2], "x", [-1.5, -0.25]), Generation([41], "y", [-2.0])]
    cols = anchor_columns([[10, 11], []], gens, "v1", decode=lambda ids: ",".join(map(str, ids)))
    assert cols["anchor_ids"].to_pylist() == [[10, 11, 40, 2], [41]]
    assert cols["anchor_logps"].to_pylist() == [[0.0, 0.0, -1.5, -0.25], [-2.0]]
    assert cols["anchor_prefix_len"].to_pylist() == [2, 0] and cols["anchor_text"].to_pylist()[1] == "41"
    assert cols["anchor_ids"].type == pa.list_(pa.int32()) and cols["anchor_logps"].type == pa.list_(pa.float32())
    with pytest.raises(ValueError, match="non-finite"):
        anchor_columns([[]], [Generation([1], "", [math.nan])], "v", decode=str)


def test_check_rows_names_missing_rows():
    check_rows(["a", "b", "c"], ["c", "a", "b"])
    with pytest.raises(RuntimeError, match=r"3 rows in, 2 out; missing 1 \(e\.g\. \['b'\]\)"):
        check_rows(["a", "b", "c"], ["a", "c"])


def test_default_model_path_is_the_current_policy(tmp_path, tok):
    """The loop's newest round (<out>/model) wins over the SFT export, by the layout's order, not file times."""
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert resolve_model_path(cfg) == "tiny"
    model = build_model(ModelConfig(), len(tok))
    sft = save_pretrained(model, tok, tmp_path / "sft" / "model")
    assert resolve_model_path(cfg) == str(sft)
    trained = save_pretrained(model, tok, tmp_path / "model")
    os.utime(sft / "config.json", (time.time() + 60, time.time() + 60))  # a newer SFT file changes nothing
    assert resolve_model_path(cfg) == str(trained)
    assert resolve_model_path(cfg, str(sft)) == str(sft)
    with pytest.raises(FileNotFoundError):
        resolve_model_path(cfg, str(tmp_path / "missing"))


def test_stop_strings_become_token_ids(tok):
    from pipeline.generation.engine import stop_token_ids

    assert stop_token_ids(tok, ["\n"]) == [2, tok.encode("\n")[0]]
    with pytest.raises(ValueError, match="only single-token stops"):
        stop_token_ids(tok, ["STOP"])
