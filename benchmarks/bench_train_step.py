"""Step time of DPO vs TI-DPO (weights only, full) on the same model and batch, in one process, interleaved.

    python benchmarks/bench_train_step.py [--sizes tiny small] [--repeats 7] [--steps 5 1] [--threads 1]

One training step = ``pipeline.train.step.preference_step`` (the project's real step function) + ``loss.backward()``
+ ``AdamW.step()``, on a Llama built in-process by ``pipeline.models.build_model`` (float32, dropout off), with a
batch from ``pipeline.batching.collate_pairs`` carrying precomputed reference log-probs (the default reference
mode) and anchors. Plain torch AdamW stands in for the DeepSpeed engine: the step's maths and autograd graph are
the same, the engine only adds its own (variant-independent) bookkeeping.

Variants (each its own copy of the same initial model and its own optimizer; all see the SAME batch):

- ``dpo``: ``LossConfig.from_preset("dpo")``: uniform weights, no attribution, no triplet.
- ``weights``: ``from_preset("paper", gamma=0)``: attribution from the shared forward
  (``tidpo.forward_with_attribution``: one forward, ``autograd.grad`` then the loss backward on the same graph).
- ``full``: ``from_preset("paper")``: the weights plus the triplet loss, i.e. a policy forward of the anchor
  batch with grad (its reference log-probs precomputed). Anchor sampling is not timed: it is a separate stage.
- ``weights_separate``: as ``weights`` with ``shared_attribution=False``: ``tidpo.attribution_scores`` in its own
  forward/backward, then the training forward (the released code's way; what the shared forward saves).

Each repeat runs every variant for ``--steps`` steps, in an order rotated by one per repeat (A B C D, B C D A,
...), after ``--warmup`` untimed steps per variant. Ratios are taken per repeat (variant / dpo of the same repeat)
so that load drifting between repeats cancels; the JSON holds median and IQR of those ratios and of the times.
Time is PROCESS CPU time (``time.process_time``; torch runs ``--threads`` intra-op threads, default 1): on a shared,
oversubscribed machine wall time mostly measures waiting for a core. Wall times are recorded beside it.
Writes ``benchmarks/results/train_step.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.batching import collate_pairs  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.train.step import StepModels, preference_step  # noqa: E402
from tidpo import LossConfig  # noqa: E402

# name -> (vocab, hidden, layers, heads, pairs per batch, max prompt tokens, max response tokens)
SIZES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "tiny": (260, 64, 2, 2, 8, 48, 64),  # the project's tiny model and byte-tokenizer vocabulary
    "small": (8192, 256, 4, 4, 8, 64, 64),  # sequences up to 128 tokens: compute dominates Python overhead
    "micro": (64, 16, 1, 2, 2, 8, 8),  # for the smoke test only
}
VARIANTS: dict[str, tuple[LossConfig, bool]] = {
    "dpo": (LossConfig.from_preset("dpo"), True),
    "weights": (LossConfig.from_preset("paper", gamma=0.0), True),
    "full": (LossConfig.from_preset("paper"), True),
    "weights_separate": (LossConfig.from_preset("paper", gamma=0.0), False),
}
GOALS = {"weights": 1.35, "full": 1.7}


def machine_facts() -> dict:
    import transformers

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def make_rows(n: int, vocab: int, max_prompt: int, max_response: int, seed: int = 0) -> list[dict]:
    """Synthetic prepared rows: random ids (EOS = 2 last), lengths in [max/2, max], plausible reference log-probs."""
    rng = random.Random(seed)

    def ids(max_len: int, eos: bool) -> list[int]:
        body = [rng.randrange(3, vocab) for _ in range(rng.randint(max(1, max_len // 2), max_len) - int(eos))]
        return body + [2] if eos else body

    def ref(tokens: list[int]) -> list[float]:
        return [-rng.uniform(0.1, 6.0) for _ in tokens]

    rows = []
    for _ in range(n):
        row = {"prompt_ids": ids(max_prompt, False)}
        for side in ("chosen", "rejected", "anchor"):
            row[f"{side}_ids"] = ids(max_response, True)
            row[f"ref_{side}_logps"] = ref(row[f"{side}_ids"])
        rows.append(row)
    return rows


def quartiles(values: list[float]) -> dict:
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": round(med, 5), "q1": round(q1, 5), "q3": round(q3, 5), "iqr": round(q3 - q1, 5)}


def bench_size(name: str, *, repeats: int, steps: int, warmup: int, seed: int = 0) -> dict:
    vocab, hidden, layers, heads, pairs, max_prompt, max_response = SIZES[name]
    model_cfg = ModelConfig(name="tiny", tiny_hidden_size=hidden, tiny_layers=layers, tiny_heads=heads)
    base = build_model(model_cfg, vocab, seed=seed).train()
    batch = collate_pairs(
        make_rows(pairs, vocab, max_prompt, max_response, seed), pad_id=0, with_anchor=True, with_reference=True
    )
    runs = {}
    for key, (cfg, shared) in VARIANTS.items():
        model = copy.deepcopy(base)
        runs[key] = (cfg, StepModels(policy=model, shared_attribution=shared), torch.optim.AdamW(model.parameters()))

    def step(key: str) -> float:
        cfg, models, opt = runs[key]
        opt.zero_grad(set_to_none=True)
        obj = preference_step(cfg, models, batch)
        obj.loss.backward()
        opt.step()
        return float(obj.loss.detach())

    first_loss = {key: step(key) for key in runs}
    for key in runs:
        for _ in range(warmup):
            step(key)
    keys = list(runs)
    times: dict[str, list[float]] = {k: [] for k in keys}  # process CPU seconds per step
    wall: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotated interleaving
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(key)
            times[key].append((time.process_time() - start_cpu) / steps)
            wall[key].append((time.perf_counter() - start) / steps)
    ratios = {k: [t / d for t, d in zip(times[k], times["dpo"])] for k in keys if k != "dpo"}
    ratio_stats = {k: quartiles(v) for k, v in ratios.items()}
    pair_ids = batch["pair"]["input_ids"]
    return {
        "model": f"Llama (build_model tiny path): vocab {vocab}, hidden {hidden}, intermediate {2 * hidden}, "
        f"{layers} layers, {heads} heads, float32",
        "parameters": sum(p.numel() for p in base.parameters()),
        "batch": {
            "pairs": pairs,
            "pair_shape": list(pair_ids.shape),
            "anchor_shape": list(batch["anchor"]["input_ids"].shape),
            "response_tokens": int(batch["pair"]["response_mask"].sum()),
        },
        "repeats": repeats,
        "steps_per_repeat": steps,
        "warmup_steps": warmup,
        "first_loss": {k: round(v, 5) for k, v in first_loss.items()},
        "step_cpu_seconds": {k: quartiles(v) for k, v in times.items()},
        "step_cpu_seconds_samples": {k: [round(x, 5) for x in v] for k, v in times.items()},
        "step_wall_seconds": {k: quartiles(v) for k, v in wall.items()},
        "ratio_vs_dpo": ratio_stats,
        "goal_met": {k: ratio_stats[k]["median"] <= g for k, g in GOALS.items()},
        # > 1: how much slower the separate attribution pass is than the shared forward, per repeat
        "separate_over_shared": quartiles([s / w for s, w in zip(times["weights_separate"], times["weights"])]),
    }


def print_table(results: dict) -> None:
    print(f"{'size':<7}{'variant':<18}{'CPU ms/step (median [IQR])':>28}{'x DPO (median [IQR])':>24}{'goal':>8}")
    for size, res in results["sizes"].items():
        for key, st in res["step_cpu_seconds"].items():
            ms = f"{st['median'] * 1e3:.1f} [{st['iqr'] * 1e3:.1f}]"
            rt = res["ratio_vs_dpo"].get(key)
            ratio = f"{rt['median']:.2f} [{rt['iqr']:.2f}]" if rt else "1.00"
            goal = f"<={GOALS[key]}" if key in GOALS else ""
            print(f"{size:<7}{key:<18}{ms:>28}{ratio:>24}{goal:>8}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="steps per repeat, one per size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.steps or [5 if s in ("tiny", "micro") else 1 for s in args.sizes]
    machine = machine_facts()
    results = {
        "benchmark": "train_step",
        "what": "process CPU seconds per step (preference_step + backward + AdamW.step; wall seconds too), one "
        "process, rotated interleaving; ratios per repeat vs dpo, then median/IQR. CPU time, not wall time, because "
        "the 2 shared cores run at load averages far above 2: wall time mostly measures waiting for a core. "
        "Plain torch AdamW, no DeepSpeed (same maths).",
        "goals_vs_dpo": GOALS,
        "paper_reports": "about 2x DPO training time for the attribution alone",
        "machine": machine,
        "sizes": {},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for size, n_steps in zip(args.sizes, steps):
        results["sizes"][size] = bench_size(size, repeats=args.repeats, steps=n_steps, warmup=args.warmup)
        machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # after each size: partial results survive
        print(f"{size}: ratios vs dpo {json.dumps(results['sizes'][size]['ratio_vs_dpo'])}", flush=True)
    print_table(results)
    print(f"threads {args.threads}, load avg start {machine['load_avg_start']} end {machine['load_avg_end']}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
