"""``tidpo evaluate`` and ``tidpo report``: load the models and the eval split, call ``evaluation/``, write results.

Glue only: every measure is defined in ``evaluation/`` (preference, diversity, synthetic judge, benchmarks) or
``tidpo/`` (log-probs, attribution, weights, KL). Evaluation is cheap and deterministic: no anchor sampling,
attribution only for the first ``eval.weight_diag_pairs`` pairs, sampling seeded from ``cfg.seed``.

Writes ``<output_dir>/eval/summary.json`` (every number; NaN as null), ``eval/heatmaps.json``, ``eval/report.html``
with its PNGs, ``eval/round-<k>/summary.json`` when a round is given, and logs metrics and the eval folder to
MLflow when ``tracking.enabled``. The generation measures and the benchmarks are in ``pipeline/eval_generation.py``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from evaluation.importance import heatmap_side, top_weight_tokens
from evaluation.preference import implicit_reward_metrics, kl_metrics, weight_diagnostics
from evaluation.report import TOP_TOKENS, render_from_saved, write_report
from pipeline.config import ConfigError, RunConfig, to_dict
from pipeline.models import load_pretrained

log = logging.getLogger(__name__)

MEASURES = ("preference", "synthetic", "diversity")
BENCHMARKS = ("ifeval", "humaneval", "truthfulqa", "gsm8k", "mmlu")


# ----------------------------------------------------------------------------------------------------------
# Models and data.


def resolve_paths(cfg: RunConfig, model_path: str | None = None) -> tuple[str, str]:
    """(policy, reference) from the evaluate stage's plan: ``model_path``, else the current policy
    (:func:`pipeline.plan.latest_policy`); the reference is ``model.reference_name``, else the start model."""
    from pipeline.plan import plan

    p = plan(cfg, "evaluate", model=model_path)  # raises naming a --model folder that does not exist
    return p.init_model, p.reference.model


def load_model(cfg: RunConfig, path: str):
    """(model, tokenizer) in eval mode (:func:`pipeline.models.load_pretrained`, seeded like the workers)."""
    return load_pretrained(cfg.model, path, seed=cfg.seed)


def read_eval_split(output_dir: str | Path):
    """The prepared eval split (``<out>/data/eval/*.parquet``) as a DataFrame ordered by ``row_id``."""
    import pandas as pd

    from pipeline.plan import Layout

    files = sorted(Layout(Path(output_dir)).split("eval").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no eval split in {Path(output_dir) / 'data' / 'eval'}: run `tidpo prepare` first")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if df.empty:
        raise ValueError(f"the eval split in {files[0].parent} has no rows")
    return df.sort_values("row_id", kind="stable").reset_index(drop=True)


def batch_starts(total: int, batch_size: int, desc: str):
    """The start index of each batch of ``range(total)``, with a progress bar named ``desc`` (stderr)."""
    from tqdm import tqdm

    starts = range(0, total, batch_size)
    return tqdm(starts, total=len(starts), desc=desc, unit="batch", dynamic_ncols=True, leave=False)


def id_lists(column) -> list[list[int]]:
    return [[int(t) for t in row] for row in column]


# ----------------------------------------------------------------------------------------------------------
# Forwards.


@torch.no_grad()
def score_responses(
    policy, ref, prompts, responses, pad_id: int, batch_size: int, *, desc: str = "score"
) -> dict[str, torch.Tensor]:
    """Label-aligned token log-probs of prompt + response rows under the policy and (unless ``ref`` is None) the
    reference, the response masks, and the full-vocabulary KL per row (``tidpo.tdpo_kl``)."""
    from pipeline.batching import pack_sequences
    from tidpo import tdpo_kl, token_logps

    packed = pack_sequences(prompts, responses, pad_id)
    input_ids, attention_mask, response_mask = packed["input_ids"], packed["attention_mask"], packed["response_mask"]
    labels = input_ids[:, 1:]
    out: dict[str, list[torch.Tensor]] = {"policy_token_logps": [], "ref_token_logps": [], "full_kl": []}
    for s in batch_starts(len(prompts), batch_size, desc):
        ids, attn, lab, mask = (t[s : s + batch_size] for t in (input_ids, attention_mask, labels, response_mask))
        policy_logits = policy(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # predicts labels
        out["policy_token_logps"].append(token_logps(policy_logits, lab))
        if ref is not None:
            ref_logits = ref(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            out["ref_token_logps"].append(token_logps(ref_logits, lab))
            out["full_kl"].append(tdpo_kl(policy_logits, ref_logits, mask))
    tensors = {k: torch.cat(v) for k, v in out.items() if v}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask, **tensors}


def kl_section(scored: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    return kl_metrics(policy_token_logps=scored["policy_token_logps"], ref_token_logps=scored["ref_token_logps"],
                      mask=scored["response_mask"], full_kl=scored["full_kl"], prefix=prefix)  # fmt: skip


def token_weights(cfg: RunConfig, policy, scored: dict[str, torch.Tensor], rows: list[int]):
    """TI-DPO weights (label-aligned, (len(rows), T-1)) of some scored rows and the count of all-zero
    attribution rows. Attribution + prior with ``loss.lam``/``loss.sigma_div`` over ``loss.span``, whatever
    ``loss.weighting`` is, so DPO and TI-DPO runs show comparable diagnostics."""
    from tidpo import attribution_scores, hybrid_weights, normalize_scores

    weights, zero = [], 0
    for s in range(0, len(rows), cfg.eval.batch_size):
        idx = torch.tensor(rows[s : s + cfg.eval.batch_size])
        ids, attn = scored["input_ids"][idx], scored["attention_mask"][idx]
        response = scored["response_mask"][idx]
        scores = attribution_scores(policy, ids, attn, target=cfg.loss.attribution_target, target_mask=response)
        scores = scores[:, 1:]  # label t's weight = score of its own input t+1
        span = response if cfg.loss.span == "response" else attn[:, 1:].bool()
        weights.append(hybrid_weights(scores, span, lam=cfg.loss.lam, sigma_div=cfg.loss.sigma_div))
        zero += int(normalize_scores(scores, span)[1].sum())
    return torch.cat(weights), zero


def preference_section(cfg: RunConfig, policy, ref, tok, df) -> tuple[dict[str, Any], list[dict]]:
    """Implicit-reward metrics, KL on the eval split, weight diagnostics, and the heatmap entries."""
    n = len(df)
    prompts = id_lists(df["prompt_ids"])
    responses = id_lists(df["chosen_ids"]) + id_lists(df["rejected_ids"])  # rows 0..n-1 chosen, n..2n-1 rejected
    scored = score_responses(policy, ref, prompts + prompts, responses, tok.pad_token_id, cfg.eval.batch_size,
                             desc="eval: preference pairs")  # fmt: skip
    mask = scored["response_mask"]
    pol = (scored["policy_token_logps"].double() * mask).sum(-1)
    rf = (scored["ref_token_logps"].double() * mask).sum(-1)
    metrics: dict[str, Any] = implicit_reward_metrics(
        policy_chosen_logps=pol[:n],
        policy_rejected_logps=pol[n:],
        ref_chosen_logps=rf[:n],
        ref_rejected_logps=rf[n:],
        beta=cfg.loss.beta,
    )
    metrics |= kl_section(scored, "eval/kl")
    k = min(n, max(cfg.eval.weight_diag_pairs, cfg.eval.heatmap_pairs))
    rows = list(range(k)) + list(range(n, n + k))
    weights, zero = token_weights(cfg, policy, scored, rows)
    logratio = scored["policy_token_logps"][rows] - scored["ref_token_logps"][rows]
    metrics |= weight_diagnostics(weights=weights, token_logratio=logratio, mask=mask[rows])
    metrics["eval/weights/attribution_zero_rows"] = zero
    metrics["eval/num_pairs"] = n
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    resp_weights = [weights[j][mask[r]].tolist() for j, r in enumerate(rows)]  # per response token, as its ids
    metrics[TOP_TOKENS] = {
        side: top_weight_tokens([responses[r] for r in rows[a:b]], resp_weights[a:b], decode)
        for side, a, b in (("chosen", 0, k), ("rejected", k, 2 * k))
    }
    special, heatmaps = set(tok.all_special_ids), []
    for i in range(min(n, cfg.eval.heatmap_pairs)):
        entry: dict[str, Any] = {"row_id": str(df["row_id"][i]), "prompt": str(df["prompt_text"][i])}
        for side, row, j in (("chosen", i, i), ("rejected", n + i, k + i)):
            reward = cfg.loss.beta * float(pol[row] - rf[row])
            entry[side] = heatmap_side(decode, responses[row], resp_weights[j], special) | {"reward": reward}
        heatmaps.append(entry)
    return metrics, heatmaps


# ----------------------------------------------------------------------------------------------------------
# Entry points.


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_measures(cfg: RunConfig) -> tuple[set[str], list[str]]:
    """(measures, benchmarks) requested in ``eval.benchmarks``; unknown names and missing paths raise."""
    names = list(cfg.eval.benchmarks)
    unknown = sorted(set(names) - set(MEASURES) - set(BENCHMARKS))
    if unknown:
        raise ConfigError(f"eval.benchmarks: unknown {unknown}; choose from {list(MEASURES + BENCHMARKS)}")
    benches = [b for b in names if b in BENCHMARKS]
    missing = [b for b in benches if not getattr(cfg.eval, f"{b}_path")]
    if missing:
        raise ConfigError(f"eval.benchmarks lists {missing} but eval.{missing[0]}_path is not set")
    return {m for m in names if m in MEASURES}, benches


def fingerprint(cfg: RunConfig, policy: str, reference: str) -> str:
    """What an evaluation depends on: the eval/loss/model/data config, the seed, and the CONTENT of the policy,
    the reference and the eval split (:mod:`pipeline.fingerprint`)."""
    from pipeline.fingerprint import digest, folder_fingerprint, model_fingerprint

    state = {k: to_dict(getattr(cfg, k)) for k in ("eval", "loss", "model", "data")}
    from pipeline.plan import Layout

    eval_split = Layout(Path(cfg.output_dir)).split("eval")
    state |= {
        "seed": cfg.seed,
        "policy": model_fingerprint(policy, cfg.model, cfg.seed),
        "reference": model_fingerprint(reference, cfg.model, cfg.seed),
        "eval_split": folder_fingerprint(eval_split, (".parquet",)) if eval_split.is_dir() else None,
    }
    return digest(state)


def evaluate(cfg: RunConfig, *, model_path: str | None = None, round_idx: int | None = None) -> dict[str, Any]:
    """Run every requested measure on the policy and write the eval folder; returns the summary dict."""
    measures, benches = check_measures(cfg)
    policy_path, ref_path = resolve_paths(cfg, model_path)
    torch.manual_seed(cfg.seed)
    policy, tok = load_model(cfg, policy_path)
    ref = load_model(cfg, ref_path)[0]
    df = read_eval_split(cfg.output_dir)
    from pipeline.eval_generation import benchmark_section, generation_section

    metrics: dict[str, Any] = {}
    heatmaps: list[dict] = []
    if "preference" in measures:
        pref, heatmaps = preference_section(cfg, policy, ref, tok, df)
        metrics |= pref
    gen_measures = measures & {"synthetic", "diversity"}
    if "synthetic" in gen_measures and cfg.data.path != "synthetic":
        log.info("eval: 'synthetic' judge skipped: data.path is %r, not synthetic", cfg.data.path)
        gen_measures.discard("synthetic")
    if gen_measures:
        metrics |= generation_section(cfg, policy, ref, tok, df, gen_measures)
    bench_results: dict[str, Any] = {}
    if benches:
        bench, bench_results = benchmark_section(cfg, policy, tok, benches)
        metrics |= bench
    meta = {"policy": policy_path, "reference": ref_path, "round": round_idx, "seed": cfg.seed,
            "measures": sorted(measures | set(benches)), "judged": "synthetic" in gen_measures,
            "fingerprint": fingerprint(cfg, policy_path, ref_path)}  # fmt: skip
    summary = _jsonable({**metrics, "meta": meta})
    write_outputs(cfg, summary, heatmaps, round_idx, bench_results)
    if cfg.tracking.enabled:
        summary["meta"]["mlflow_run_id"] = log_to_mlflow(cfg, summary, round_idx)
    return summary


def write_outputs(cfg: RunConfig, summary: dict, heatmaps: list[dict], round_idx: int | None, benches: dict) -> Path:
    """summary.json (and round-<k>/summary.json), heatmaps.json, benchmarks/<name>.json (per-item records)."""
    eval_dir = Path(cfg.output_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, allow_nan=False)
    (eval_dir / "summary.json").write_text(text, encoding="utf-8")
    if round_idx is not None:
        (eval_dir / f"round-{round_idx}").mkdir(exist_ok=True)
        (eval_dir / f"round-{round_idx}" / "summary.json").write_text(text, encoding="utf-8")
    (eval_dir / "heatmaps.json").write_text(json.dumps(heatmaps, allow_nan=False), encoding="utf-8")
    for name, result in benches.items():
        (eval_dir / "benchmarks").mkdir(exist_ok=True)
        (eval_dir / "benchmarks" / f"{name}.json").write_text(json.dumps(_jsonable(result), indent=1, default=str))
    return write_report(cfg.output_dir, summary, heatmaps=heatmaps)


def log_to_mlflow(cfg: RunConfig, summary: dict, round_idx: int | None) -> str:
    """Log every finite number as a metric (step = round, or 0) and the eval folder as artifacts."""
    import mlflow

    from pipeline.tracking import mlflow_setup

    _, experiment_id = mlflow_setup(cfg)
    name = cfg.tracking.run_name or ("evaluate" if round_idx is None else f"evaluate-round-{round_idx}")
    numbers = {k: float(v) for k, v in summary.items() if is_number(v)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=mlflow.active_run() is not None) as run:
        mlflow.log_metrics(numbers, step=round_idx or 0)
        mlflow.set_tags({f"eval.{k}": str(v) for k, v in summary["meta"].items()})
        mlflow.log_artifacts(str(Path(cfg.output_dir) / "eval"), artifact_path="eval")
        return run.info.run_id


def main(cfg: RunConfig, args: Any) -> dict[str, Any]:
    """``tidpo evaluate``: reuse ``eval/summary.json`` when nothing it depends on changed, unless ``--force``."""
    model_path = getattr(args, "model", None)
    summary_path = Path(cfg.output_dir) / "eval" / "summary.json"
    if not getattr(args, "force", False) and summary_path.is_file():
        saved = json.loads(summary_path.read_text(encoding="utf-8"))
        if saved.get("meta", {}).get("fingerprint") == fingerprint(cfg, *resolve_paths(cfg, model_path)):
            log.info("eval: %s is up to date (use --force to redo it)", summary_path)
            return saved
    return evaluate(cfg, model_path=model_path)


def report_main(output_dir: str) -> dict[str, str]:
    """``tidpo report <output_dir>``: re-render ``eval/report.html`` from the saved summary and heatmaps."""
    return {"report": str(render_from_saved(output_dir))}
