"""The generation measures of ``tidpo evaluate``: synthetic judge, diversity and KL of the policy's own samples,
and the benchmarks (IFEval, HumanEval, TruthfulQA, GSM8K, MMLU) through ``evaluation.benchmarks``."""

from __future__ import annotations

from typing import Any

from evaluation.diversity import diversity_metrics
from evaluation.nested import flatten
from pipeline.config import RunConfig
from pipeline.evaluate import batch_starts, id_lists, is_number, kl_section, score_responses


def generate(cfg: RunConfig, model, tok, prompts: list[list[int]], *, temperature: float, n: int, seed: int, desc: str):
    """``n`` responses per prompt with the transformers engine (greedy when ``temperature`` is 0), seeded."""
    from pipeline.generation.engine import SamplingParams
    from pipeline.generation.hf_engine import sample_responses

    params = SamplingParams(
        temperature=temperature,
        top_k=cfg.eval.top_k,
        top_p=cfg.eval.top_p,
        max_new_tokens=cfg.eval.max_new_tokens,
        seed=seed,
        n=n,
    )
    out = []
    for s in batch_starts(len(prompts), cfg.eval.batch_size, desc):
        out += sample_responses(model, tok, prompts[s : s + cfg.eval.batch_size], params)
    return out


def _strip_stops(ids: list[int], tok) -> list[int]:
    """A generation without the stop token that ended it (diversity counts words, not EOS)."""
    from pipeline.generation.engine import stop_ids

    return ids[:-1] if ids and ids[-1] in stop_ids(tok) else ids


def generation_section(cfg: RunConfig, policy, ref, tok, df, measures: set[str]) -> dict[str, Any]:
    """Judge scores (synthetic data only), diversity and KL of the policy's sampled responses."""
    sub = df.head(cfg.eval.num_prompts)
    prompts = id_lists(sub["prompt_ids"])
    sampled = generate(cfg, policy, tok, prompts, temperature=cfg.eval.temperature, n=cfg.eval.num_samples,
                       seed=cfg.seed, desc="eval: sample")  # fmt: skip
    metrics: dict[str, Any] = {}
    if "synthetic" in measures:
        from evaluation.synthetic import judge

        texts = list(sub["prompt_text"])  # the last user message: the task prompt the judge parses
        greedy = generate(cfg, policy, tok, prompts, temperature=0.0, n=1, seed=cfg.seed, desc="eval: greedy")
        g_scores = [judge(t, g.text) for t, g in zip(texts, greedy, strict=True)]
        s_scores = [judge(texts[i // cfg.eval.num_samples], g.text) for i, g in enumerate(sampled)]
        metrics |= {
            "eval/synthetic/judge_greedy": sum(g_scores) / len(g_scores),
            "eval/synthetic/judge_sampled": sum(s_scores) / len(s_scores),
            "eval/synthetic/exact_greedy": sum(s == 1.0 for s in g_scores) / len(g_scores),
            "eval/synthetic/exact_sampled": sum(s == 1.0 for s in s_scores) / len(s_scores),
            "eval/synthetic/num_prompts": len(texts),
        }
    if "diversity" in measures:
        metrics |= diversity_metrics([_strip_stops(g.token_ids, tok) for g in sampled])
    kept = [(prompts[i // cfg.eval.num_samples], g.token_ids) for i, g in enumerate(sampled) if g.token_ids]
    scored = score_responses(
        policy, ref, [p for p, _ in kept], [r for _, r in kept], tok.pad_token_id, cfg.eval.batch_size,
        desc="eval: KL on samples",
    )  # fmt: skip
    metrics |= kl_section(scored, "eval/kl_sampled")
    return metrics


def benchmark_section(cfg: RunConfig, model, tok, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each named benchmark via ``evaluation.benchmarks.run_benchmark``: (numeric results as ``eval/<name>/...``,
    the full result of each, per-item records included).

    generate: prompt texts templated with ``encode_prompt``, greedy decoding (``eval.max_new_tokens``), text out.
    loglik: context tokenized as plain text (special tokens as the tokenizer adds them; BOS alone when empty) and
    the continuation without special tokens, separately; the sum of the continuation's token log-probs given the
    context (0 for an empty continuation).
    """
    from evaluation.benchmarks import run_benchmark
    from pipeline.data.template import encode_prompt

    def generate_texts(texts: list[str], desc: str) -> list[str]:
        prompts = [encode_prompt(tok, t) for t in texts]
        return [g.text for g in generate(cfg, model, tok, prompts, temperature=0.0, n=1, seed=cfg.seed, desc=desc)]

    def loglik(pairs: list[tuple[str, str]], desc: str) -> list[float]:
        ctx = [tok(c)["input_ids"] or [tok.bos_token_id] for c, _ in pairs]
        cont = [tok(c, add_special_tokens=False)["input_ids"] for _, c in pairs]
        todo = [i for i, c in enumerate(cont) if c]
        out = [0.0] * len(pairs)
        if todo:
            s = score_responses(
                model, None, [ctx[i] for i in todo], [cont[i] for i in todo], tok.pad_token_id, cfg.eval.batch_size,
                desc=desc,
            )  # fmt: skip
            sums = (s["policy_token_logps"].double() * s["response_mask"]).sum(-1).tolist()
            for i, v in zip(todo, sums, strict=True):
                out[i] = v
        return out

    metrics: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for name in names:
        path, limit = getattr(cfg.eval, f"{name}_path"), cfg.eval.benchmark_limit
        options = _benchmark_options(cfg, name)
        desc = f"eval: {name}"
        results[name] = run_benchmark(
            name,
            path,
            generate=lambda texts, d=desc: generate_texts(texts, d),
            loglik=lambda pairs, d=desc: loglik(pairs, d),
            limit=limit,
            **options,
        )
        metrics |= {
            f"eval/{name}/{k}": v for k, v in flatten(results[name], sep="/", keep_empty=False).items() if is_number(v)
        }
    return metrics, results


def _benchmark_options(cfg: RunConfig, name: str) -> dict[str, Any]:
    """Evaluator options from ``eval.*``: HumanEval's sandbox mode and per-program time limit."""
    if name != "humaneval":
        return {}
    from evaluation.benchmarks.sandbox import SandboxLimits

    return {"limits": SandboxLimits(timeout_s=cfg.eval.code_timeout_s), "sandbox": cfg.eval.sandbox}
