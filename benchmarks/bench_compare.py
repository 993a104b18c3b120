"""DPO, both TI-DPO presets and the ablations on the same data, steps and seed: one command, one JSON.

    python benchmarks/bench_compare.py CONFIG [--seeds 0 1 2] [--variants dpo paper ...] [--out FILE]
        [--plot PNG] [--work DIR] [dotted.key=value ...]

Each seed runs ``tidpo run CONFIG loop.compare=[variants] seed=S`` (``pipeline.loop.run_loop``: prepare once, the
start model evaluated once, then every variant trained from it under ``<work>/seed-S/compare/<variant>/`` with
the SAME data, steps, learning rate and seed; a variant differs only by its named switches,
``pipeline.loop.VARIANTS``). No variant is tuned on its own.

Recorded per variant and seed: every ``pipeline.loop.TABLE_KEYS`` metric the config measures (held-out reward
accuracy and margin, KL, the synthetic judge, IFEval, TruthfulQA, diversity) and the median training step time
(``train_step_time_s``, steps after the first) with its ratio to ``dpo`` of the same seed (measured in the same
process tree, one variant after the other). Over the seeds: mean, sample standard deviation and the values.
Writes ``--out`` (JSON), a Markdown table beside it (``.md``) and, with ``--plot``, a bar chart with one panel
per metric (error bars: the standard deviation over seeds).

The two recorded runs (README, "Comparison"):

    python benchmarks/bench_compare.py configs/smollm2-hh-compare.yaml --seeds 0 \\
        --out benchmarks/results/real_model.json --plot docs/images/compare_real.png
    python benchmarks/bench_compare.py configs/compare.yaml --seeds 0 1 2 \\
        --out benchmarks/results/compare_synthetic.json --plot docs/images/compare_synthetic.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.loop import TABLE_KEYS, VARIANTS  # noqa: E402

DEFAULT_VARIANTS = ("dpo", "paper", "official", "uniform", "no_triplet", "no_prior", "logp_target")
STEP_KEYS = ("train_step_time_s", "step_time_ratio_to_dpo")


def run_seed(config: str, overrides: list[str], variants: list[str], seed: int, work: Path) -> list[dict[str, Any]]:
    """The comparison table of one seed: the start row, then one row per variant."""
    from pipeline.cli import resolve
    from pipeline.loop import run_loop

    args = [config, *overrides, f"seed={seed}", f"output_dir={work / f'seed-{seed}'}"]
    args.append("loop.compare=[" + ",".join(variants) + "]")
    table = run_loop(resolve(args))["compare"]
    dpo = next((r for r in table if r["variant"] == "dpo"), None)
    for row in table:
        t, base = row.get("train_step_time_s"), (dpo or {}).get("train_step_time_s")
        row["step_time_ratio_to_dpo"] = t / base if t is not None and base else None
    return table


def aggregate(tables: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> metric -> {mean, std, values} over the seeds (std: sample standard deviation, 0 for one seed)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for seed, table in sorted(tables.items()):
        for row in table:
            for key in (*TABLE_KEYS, *STEP_KEYS):
                if row.get(key) is not None:
                    entry = out.setdefault(row["variant"], {}).setdefault(key, {"values": {}})
                    entry["values"][str(seed)] = row[key]
    for metrics in out.values():
        for entry in metrics.values():
            values = list(entry["values"].values())
            entry["mean"] = statistics.fmean(values)
            entry["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def markdown(result: dict[str, Any]) -> str:
    """One row per variant, one column per metric: ``mean ± std`` (``mean`` alone for one seed)."""
    variants = result["variants"]
    keys = [k for k in (*TABLE_KEYS, *STEP_KEYS) if any(k in m for m in variants.values())]
    several = len(result["seeds"]) > 1

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return ""
        return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if several else f"{entry['mean']:.3f}"

    head = "| variant | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |"
    rule = "|---" * (len(keys) + 1) + "|"
    rows = [f"| {name} | " + " | ".join(cell(m.get(k)) for k in keys) + " |" for name, m in variants.items()]
    return "\n".join([head, rule, *rows]) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """One bar panel per metric, a bar per variant (the start model's value as a dashed line where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = {k: v for k, v in result["variants"].items() if k != "start"}
    start = result["variants"].get("start", {})
    keys = [k for k in (*TABLE_KEYS, "step_time_ratio_to_dpo") if any(k in m for m in variants.values())]
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    names = list(variants)
    for ax, key in zip(axes.flat, keys):
        means = [variants[n].get(key, {}).get("mean", float("nan")) for n in names]
        stds = [variants[n].get(key, {}).get("std", 0.0) for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color="#4c72b0", capsize=3)
        if key in start:
            ax.axhline(start[key]["mean"], color="#c44e52", linestyle="--", linewidth=1, label="start")
            ax.legend(fontsize=7, loc="best")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    seeds = result["seeds"]
    fig.suptitle(f"{Path(result['config']).name}: {len(seeds)} seed(s) {seeds}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every variant")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare.json")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_compare")
    ns = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if "dpo" not in ns.variants:
        ap.error("--variants must include dpo (step times are reported as ratios to it)")

    began = time.time()
    tables = {s: run_seed(ns.config, ns.overrides, ns.variants, s, ns.work.resolve()) for s in ns.seeds}
    result = {
        "config": ns.config,
        "overrides": ns.overrides,
        "seeds": ns.seeds,
        "variants": aggregate(tables),
        "tables": {str(s): t for s, t in tables.items()},
        "wall_time_s": time.time() - began,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    ns.out.with_suffix(".md").write_text(table)
    if ns.plot:
        plot(result, ns.plot)
    print(table)
    return result


if __name__ == "__main__":
    main()
