"""Step time and log-prob error of ``train.autocast=bf16`` vs float32, side by side in one process.

    python benchmarks/bench_autocast.py                       # SmolLM2-135M-Instruct + LoRA r16, HH pairs
    python benchmarks/bench_autocast.py --model tiny --repeats 3

One step = ``pipeline.train.step.preference_step`` (paper preset: attribution from the shared forward, the
reference = the LoRA adapters off, the triplet on anchors) + ``backward`` + ``AdamW.step``, the same batch for
both modes, each mode on its own copy of the same LoRA model. Repeats alternate the order (fp32 bf16, bf16 fp32)
after one untimed warm-up step each; the ratio is taken per repeat. Also measured, on the untrained model: the
per-token gap between the bf16-autocast and float32 log-probs of the batch's responses (mean, max) and how
often the two modes' attribution weights pick the same highest-weight token. Wall time on all the machine's
cores (the training worker's setting); the CPU's bf16 support (AMX / AVX512-BF16 flags) is recorded, since
without it autocast is slower, not faster. Writes ``benchmarks/results/autocast.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.batching import collate_pairs  # noqa: E402
from pipeline.config import ModelConfig, TrainConfig  # noqa: E402
from pipeline.train.step import StepModels, preference_step, reference_outputs, step_autocast  # noqa: E402
from tidpo import LossConfig, attribution_scores  # noqa: E402

HH = (
    Path(os.environ.get("TIDPO_SHARED_DATA", REPO.parent / "shared" / "data"))
    / "hh-rlhf"
    / "harmless-base_test.jsonl.gz"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"fp32": TrainConfig(), "bf16": TrainConfig(autocast="bf16")}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def hh_rows(tok, pairs: int, max_length: int) -> list[dict]:
    """The first ``pairs`` HH-RLHF pairs through the pipeline's own row processing (chat template, truncation),
    each with an anchor = the chosen response's first half (as anchors continue a chosen prefix)."""
    from pipeline.data.rows import process_rows

    if not HH.exists():
        raise FileNotFoundError(f"{HH} is absent: the SmolLM2 benchmark reads HH-RLHF pairs from it")
    with gzip.open(HH, "rt") as f:
        raw = [
            {"source": "hh", "index": i, "raw": line, "error": ""}
            for i, line in enumerate(itertools.islice(f, 2 * pairs))
        ]
    rows = process_rows(raw, formats={"hh": "hh"}, fields={}, tokenizer=tok, max_length=max_length,
                        max_prompt_length=max_length // 2)  # fmt: skip
    kept = [r for r in rows if not r["reason"]][:pairs]
    return [dict(r, anchor_ids=list(r["chosen_ids"])[: max(2, len(r["chosen_ids"]) // 2)]) for r in kept]


def load(model: str, pairs: int, max_length: int, seed: int):
    """(LoRA policy, collated batch with anchors, description): SmolLM2 on HH pairs, or the tiny model."""
    import peft

    from pipeline.models import build_model, build_tokenizer

    cfg = ModelConfig() if model == "tiny" else ModelConfig(name="smollm2-135m-instruct")
    tok = build_tokenizer(cfg)
    targets = ["q_proj", "v_proj"] if model == "tiny" else LORA_TARGETS
    lora = peft.get_peft_model(
        build_model(cfg, len(tok), seed=seed), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    )
    if model == "tiny":
        from tests.pipeline.test_train_deepspeed import make_rows

        rows = [dict(r, anchor_ids=list(r["chosen_ids"])[:4]) for r in make_rows(pairs, seed=seed, with_ref=False)]
    else:
        rows = hh_rows(tok, pairs, max_length)
    batch = collate_pairs(rows, tok.pad_token_id, with_anchor=True)
    return lora, batch, f"{cfg.name} + LoRA r16 on {', '.join(targets)}, float32 weights"


def step_seconds(mode: str, models: StepModels, opt, batch, cfg: LossConfig) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with step_autocast(MODES[mode], "cpu"):
        obj = preference_step(cfg, models, batch)
    obj.loss.backward()
    opt.step()
    return time.perf_counter() - start


def accuracy_of_modes(lora, batch) -> dict:
    """On the untrained policy: bf16 vs float32 log-probs of the responses, and the attribution's top token."""
    models = StepModels(lora, lora_reference=True)
    pair = batch["pair"]
    logps, top = {}, {}
    for mode in MODES:
        with step_autocast(MODES[mode], "cpu"):
            logps[mode] = reference_outputs(models, pair, need_logits=False)[0]
            scores = attribution_scores(
                lora, pair["input_ids"], pair["attention_mask"], target_mask=pair["response_mask"]
            )[:, 1:]
        top[mode] = torch.where(pair["response_mask"], scores.float(), torch.full_like(scores.float(), -1.0)).argmax(-1)
    mask = pair["response_mask"]
    gap = (logps["bf16"] - logps["fp32"])[mask].abs()
    seq = ((logps["bf16"] - logps["fp32"]) * mask).sum(-1).abs()
    return {
        "token_logp_abs_gap": {"mean": round(gap.mean().item(), 5), "max": round(gap.max().item(), 5)},
        "sequence_logp_abs_gap": {"mean": round(seq.mean().item(), 5), "max": round(seq.max().item(), 5)},
        "response_tokens": int(mask.sum()),
        "same_top_weight_token": round((top["bf16"] == top["fp32"]).float().mean().item(), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "autocast.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lora, batch, what = load(args.model, args.pairs, args.max_length, seed=0)
    cfg = LossConfig.from_preset("paper")
    accuracy = accuracy_of_modes(lora, batch)
    runs = {}
    for mode in MODES:
        model = copy.deepcopy(lora).train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[mode] = (StepModels(model, lora_reference=True), torch.optim.AdamW(params, lr=1e-4))
    for mode, (models, opt) in runs.items():
        step_seconds(mode, models, opt, batch, cfg)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in list(MODES) if r % 2 == 0 else list(MODES)[::-1]:
            times[mode].append(step_seconds(mode, *runs[mode], batch, cfg))
    ratios = [f / b for f, b in zip(times["fp32"], times["bf16"])]
    result = {
        "benchmark": "autocast",
        "what": "wall seconds of one paper-preset step (preference_step + backward + AdamW) in float32 and under "
        "train.autocast=bf16, same batch, alternating order; speedup = fp32 / bf16 per repeat",
        "model": what,
        "batch": {
            "pairs": args.pairs,
            "pair_shape": list(batch["pair"]["input_ids"].shape),
            "anchor_shape": list(batch["anchor"]["input_ids"].shape),
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_bf16_flags": cpu_flags(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
        "step_seconds": {m: [round(t, 3) for t in v] for m, v in times.items()},
        "step_seconds_median": {m: round(statistics.median(v), 3) for m, v in times.items()},
        "speedup_median": round(statistics.median(ratios), 3),
        "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "accuracy": accuracy,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("step_seconds_median", "speedup_median", "accuracy")}, indent=2))
    return result


if __name__ == "__main__":
    main()
