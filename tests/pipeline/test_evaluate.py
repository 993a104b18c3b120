"""``tidpo evaluate`` end to end on the tiny model and a hand-written eval split, plus ``tidpo report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, from_dict

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_eval_split(out: Path, n: int = 6) -> None:
    """A prepared eval split in the issue-3 schema: synthetic ``sort`` pairs, the built-in byte tokenizer,
    prompt = BOS + the prompt's bytes + "\\n", responses end with EOS (2)."""
    from evaluation.synthetic import generate_pairs
    from pipeline.data.rows import PAIR_SCHEMA
    from pipeline.models import byte_tokenizer

    tok = byte_tokenizer()

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    rows = []
    for i, pair in enumerate(generate_pairs("sort", n, seed=1)):
        prompt_ids = [1, *encode(pair["prompt"] + "\n")]
        chosen = [*encode(pair["chosen"]), 2]
        rejected = [*encode(pair["rejected"]), 2]
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "synthetic:sort",
                "index": i,
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "prompt_len": len(prompt_ids),
                "chosen_len": len(chosen),
                "rejected_len": len(rejected),
                "prompt_text": pair["prompt"],
                "chosen_text": pair["chosen"],
                "rejected_text": pair["rejected"],
                "messages_json": json.dumps([{"role": "user", "content": pair["prompt"]}]),
            }
        )
    (out / "data" / "eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), out / "data" / "eval" / "part-0.parquet")


def tiny_cfg(out: Path, **sections):
    raw = {
        "output_dir": str(out),
        "eval": {
            "num_prompts": 3,
            "num_samples": 2,
            "max_new_tokens": 6,
            "heatmap_pairs": 2,
            "weight_diag_pairs": 4,
            "batch_size": 4,
        },
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return from_dict(raw)


def test_evaluate_tiny_end_to_end(tmp_path, monkeypatch):
    """Base tiny model as both policy and reference: every implicit reward and KL is exactly 0, so accuracy is
    0 (ties are wrong) and margins 0; the judge, distinct-n and self-BLEU lie in [0, 1]; files and MLflow run exist."""
    from pipeline.evaluate import main, report_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_eval_split(tmp_path)
    cfg = tiny_cfg(tmp_path, tracking={"enabled": True})
    summary = main(cfg, argparse.Namespace(model=None, force=False))
    assert summary["eval/num_pairs"] == 6
    assert summary["eval/rewards/accuracies"] == 0.0 and summary["eval/rewards/margins"] == 0.0
    assert summary["eval/kl/logratio_per_token"] == 0.0
    assert summary["eval/kl/full_per_token"] == pytest.approx(0.0, abs=1e-6)
    for key in (
        "eval/synthetic/judge_greedy",
        "eval/synthetic/judge_sampled",
        "eval/diversity/self_bleu",
        "eval/diversity/distinct_2",
        "eval/weights/middle_share",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["eval/diversity/num_generations"] == 6  # 3 prompts x 2 samples
    assert summary["eval/weights/rows"] == 8  # 4 pairs x (chosen, rejected)
    assert summary["eval/weights/entropy"] > 0
    assert summary["meta"]["policy"] == "tiny" and summary["meta"]["mlflow_run_id"]

    eval_dir = tmp_path / "eval"
    saved = json.loads((eval_dir / "summary.json").read_text())
    assert saved["eval/rewards/accuracies"] == 0.0
    heatmaps = json.loads((eval_dir / "heatmaps.json").read_text())
    assert len(heatmaps) == 2
    first = heatmaps[0]["chosen"]
    from evaluation.synthetic import generate_pairs

    assert "".join(first["tokens"]) == generate_pairs("sort", 6, seed=1)[0]["chosen"] + "<eos>"
    assert sum(first["weights"]) == pytest.approx(len(first["weights"]), rel=1e-5)  # mean 1 over the response
    assert first["special"] == [len(first["tokens"]) - 1]  # <eos>: a word of its own in the heatmap
    top = saved["top_tokens"]["chosen"]  # over the 4 weighted pairs' chosen responses
    assert top["responses"] == 4 and all(r["count"] >= top["min_count"] for r in top["tokens"])
    for name in ("report.html", "heatmap-0.png", "heatmap-1.png"):
        assert (eval_dir / name).is_file(), name
    assert (tmp_path / "mlflow.db").is_file() and any((tmp_path / "mlartifacts").rglob("report.html"))
    from pipeline.tracking import mlflow_setup

    assert mlflow_setup(cfg)[1] == mlflow_setup(cfg)[1]  # the experiment is created once, then reused

    again = main(cfg, argparse.Namespace(model=None, force=False))  # cached: nothing changed
    assert again["meta"]["fingerprint"] == summary["meta"]["fingerprint"] and "mlflow_run_id" not in again["meta"]
    (eval_dir / "report.html").unlink()
    assert report_main(str(tmp_path)) == {"report": str(eval_dir / "report.html")}
    assert "eval/rewards/accuracies" in (eval_dir / "report.html").read_text()


def test_evaluate_trained_policy_and_round(tmp_path):
    """A policy that differs from the reference (another seed) gives non-zero rewards; round 1 is saved apart."""
    from pipeline.evaluate import evaluate
    from pipeline.models import build_model, build_tokenizer, save_pretrained

    write_eval_split(tmp_path, n=4)
    cfg = tiny_cfg(tmp_path, eval={"benchmarks": ["preference"]})
    tok = build_tokenizer(cfg.model)
    save_pretrained(build_model(cfg.model, len(tok), seed=7), tok, tmp_path / "model")
    summary = evaluate(cfg, round_idx=1)
    assert summary["meta"]["policy"] == str(tmp_path / "model") and summary["meta"]["reference"] == "tiny"
    assert 0.0 <= summary["eval/rewards/accuracies"] <= 1.0
    assert summary["eval/kl/full_per_token"] > 0
    assert not any(k.startswith("eval/synthetic") for k in summary)
    assert json.loads((tmp_path / "eval" / "round-1" / "summary.json").read_text())["meta"]["round"] == 1


def test_evaluate_benchmarks_generate_and_loglik(tmp_path):
    """GSM8K (generate) and TruthfulQA (loglik) from the small fixtures: accuracies in [0, 1], records saved."""
    from pipeline.evaluate import evaluate

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
    write_eval_split(tmp_path, n=2)
    cfg = tiny_cfg(tmp_path, eval={"benchmarks": ["gsm8k", "truthfulqa"], "benchmark_limit": 2,
                                   "gsm8k_path": str(fixtures / "gsm8k_sample.jsonl"),
                                   "truthfulqa_path": str(fixtures / "truthfulqa_sample.csv")})  # fmt: skip
    summary = evaluate(cfg)
    bench = {k: v for k, v in summary.items() if k.startswith(("eval/gsm8k/", "eval/truthfulqa/"))}
    assert bench and not any(k.startswith("eval/rewards") for k in summary)
    for key in ("eval/truthfulqa/mc1", "eval/truthfulqa/mc2"):
        assert 0.0 <= summary[key] <= 1.0, (key, bench)
    assert (tmp_path / "eval" / "benchmarks" / "gsm8k.json").is_file()


def test_evaluate_rejects_bad_benchmarks(tmp_path):
    from pipeline.evaluate import check_measures

    with pytest.raises(ConfigError, match="unknown"):
        check_measures(tiny_cfg(tmp_path, eval={"benchmarks": ["nope"]}))
    with pytest.raises(ConfigError, match="ifeval_path"):
        check_measures(tiny_cfg(tmp_path, eval={"benchmarks": ["ifeval"]}))


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    """Config URI first, then $MLFLOW_TRACKING_URI, then sqlite under the output folder."""
    import pipeline.tracking
    from pipeline.tracking import resolve_tracking_uri

    monkeypatch.setattr(pipeline.tracking, "_USER_TRACKING_URI", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////set/by/an/earlier/mlflow.set_tracking_uri.db")
    assert resolve_tracking_uri(tiny_cfg(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setattr(pipeline.tracking, "_USER_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert resolve_tracking_uri(tiny_cfg(tmp_path)) == "sqlite:////elsewhere/m.db"
    assert resolve_tracking_uri(tiny_cfg(tmp_path, tracking={"tracking_uri": "sqlite:////x.db"})) == "sqlite:////x.db"
