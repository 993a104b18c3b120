"""Step time of the three anchor sources, one process tree; writes benchmarks/results/anchor_sync.json.

    python benchmarks/bench_anchor_sync.py                      # tiny model, then SmolLM2-135M + LoRA
    python benchmarks/bench_anchor_sync.py --models tiny --steps 4

For each model the same data, steps and settings run as ``tidpo train`` three times on one local Ray:
``column`` (anchors generated before training by the Ray Data stage: its time is ``pregenerate_s``, not in the
steps), ``online`` (sampled inside every step by the trainer) and ``steps`` (``generation.sync=steps``,
sync_every=1, max_staleness=1: one hf generation actor makes the next step's anchors while the trainer
trains). The step time is the median of ``step_time_s`` over the steps after the first (warm-up); ``wait_s``
is the median of ``anchors/wait_s``. Also measured in-process: how long the hf engine takes to load a LoRA
policy published as adapters or as merged layers (``generation.lora_sync``). One train worker and one
generation actor: on a 2-core machine they compete for the same cores, so ``steps`` cannot overlap for free
here; the load average is recorded.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
HH = Path(os.environ.get("TIDPO_SHARED_DATA", REPO.parent / "shared" / "data")) / "hh-rlhf"
LORA_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
MODES = {
    "column": ["train.anchors=column"],
    "online": ["train.anchors=online"],
    "steps": ["generation.sync=steps", "generation.sync_every=1", "generation.max_staleness=1"],
}


def model_args(name: str, out: Path, steps: int) -> list[str]:
    common = [f"output_dir={out}", f"train.max_steps={steps}", "train.num_workers=1", "train.sft_steps=0",
              "train.save_every=0", "train.warmup_steps=0", "train.report_interval_s=0", "loss.preset=paper",
              "generation.engine=hf", "tracking.enabled=false"]  # fmt: skip
    if name == "tiny":
        return [*common, "data.synthetic_num_pairs=400", "train.micro_batch_size=8", "model.reference=copy",
                "generation.max_new_tokens=16"]  # fmt: skip
    source = HH / "harmless-base_test.jsonl.gz"
    if not source.exists():
        raise FileNotFoundError(f"{source} is absent: the SmolLM2 run needs the HH-RLHF file")
    rows = out / "hh48.jsonl"
    with gzip.open(source, "rt") as f:
        rows.write_text("".join(itertools.islice(f, 48)))
    return [*common, "model.name=smollm2-135m-instruct", "model.lora_r=8", f"model.lora_target_modules={LORA_TARGETS}",
            "model.reference=lora", f"data.path={rows}", "data.format=hh", "data.max_length=128",
            "data.max_prompt_length=64", "data.eval_size=4", "data.max_bad_fraction=0.2", "train.micro_batch_size=2",
            "loss.anchor_prefix_tokens=4", "generation.max_new_tokens=12", "generation.batch_size=16",
            "train.lr=5e-4"]  # fmt: skip


def run_mode(name: str, mode: str, root: Path, steps: int) -> dict:
    from pipeline.config import load_config
    from pipeline.plan import plan
    from pipeline.train.inputs import build_job
    from pipeline.train.trainer import run_training

    out = root / f"{name}-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [*model_args(name, out, steps), *MODES[mode]])
    start = time.perf_counter()
    job = build_job(cfg, plan(cfg, "train"), force=True)
    pregenerate = time.perf_counter() - start
    summary = run_training(cfg, job, force=True, progress=False)
    records = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time_s" in r and "final" not in r]
    later = records[1:] or records
    result = {"steps": summary["steps"], "inputs_s": round(pregenerate, 2),
              "train_wall_s": round(summary["wall_time_s"], 2),
              "step_time_s": statistics.median(r["step_time_s"] for r in later),
              "step_times_s": [round(r["step_time_s"], 3) for r in records]}  # fmt: skip
    if mode == "steps":
        result["wait_s"] = statistics.median(r["anchors/wait_s"] for r in later)
        result["staleness_max"] = max(r["anchors/staleness_max"] for r in records)
        result["engine_tokens_per_s"] = statistics.median(r["anchors/engine_tokens_per_s"] for r in later)
        result["load_s"] = statistics.median(r["anchors/load_s"] for r in later)
    print(name, mode, result, flush=True)
    return result


def lora_load_times(repeats: int = 3) -> dict:
    """Seconds for the hf engine to load a SmolLM2 LoRA policy's adapters (into its peft copy) or its merged
    target layers (into the base model), median of ``repeats``, with the bytes each publish carries."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.generation.hf_engine import HFEngine
    from pipeline.generation.sync_pool import policy_weights
    from pipeline.models import apply_lora, load_pretrained

    torch.set_num_threads(1)
    targets = tuple(LORA_TARGETS.strip("[]").split(","))
    cfg = ModelConfig(name="smollm2-135m-instruct", lora_r=8, lora_target_modules=targets)
    base, tok = load_pretrained(cfg, cfg.name, seed=0)
    policy = apply_lora(cfg, load_pretrained(cfg, cfg.name, seed=0)[0])
    out = {}
    for kind, model in (("adapters", apply_lora(cfg, base)), ("merged", None)):
        engine = HFEngine(model if model is not None else load_pretrained(cfg, cfg.name, seed=0)[0], tok)
        times, named = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            named = policy_weights(policy, kind)  # rank 0's side: make the payload
            t1 = time.perf_counter()
            engine.update_weights(named)
            times.append((t1 - t0, time.perf_counter() - t1))
        size = sum(t.numel() * t.element_size() for _, t in named)
        out[kind] = {"tensors": len(named), "bytes": size, "payload_s": statistics.median(a for a, _ in times),
                     "load_s": statistics.median(b for _, b in times)}  # fmt: skip
    out["faster_load"] = min(("adapters", "merged"), key=lambda k: out[k]["load_s"])
    print("lora load", out, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: tiny 10, smollm2 4)")
    parser.add_argument("--out", default=str(RESULTS / "anchor_sync.json"))
    args = parser.parse_args(argv)
    import ray
    import torch

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=512 * 1024**2, log_to_driver=False, configure_logging=False)
    data = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "load_avg_start": os.getloadavg()}, "goal": "steps <= 1.15 x column; online >= 2 x column",
            "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-anchor-sync-") as tmp:
        for name in args.models.split(","):
            steps = args.steps or (10 if name == "tiny" else 4)
            res = {mode: run_mode(name, mode, Path(tmp), steps) for mode in MODES}
            col = res["column"]["step_time_s"]
            res["ratio_vs_column"] = {m: round(res[m]["step_time_s"] / col, 3) for m in ("online", "steps")}
            res["goal_met"] = {"steps": res["ratio_vs_column"]["steps"] <= 1.15,
                               "online": res["ratio_vs_column"]["online"] >= 2.0}  # fmt: skip
            data["models"][name] = res
    if "smollm2" in args.models.split(","):
        data["lora_load"] = lora_load_times()
    data["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=2))
    return data


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
