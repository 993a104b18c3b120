"""The report's training curves: every training stage of an output folder on one step axis, held-out points on top.

Stages are the folders :class:`pipeline.plan.Layout` gives training runs (``tidpo train``: ``train/``; the loop's
rounds: ``rounds/round-<k>/``), each with the ``metrics.jsonl`` rank 0 writes (one JSON object per logged step;
rows with ``eval/...`` keys are the worker's held-out evaluations). Stage k's steps are shifted by the steps of
the stages before it, so round 2 continues where round 1 ended. Held-out points: those worker rows, and the
evaluate stage's ``eval/round-<k>/summary.json`` at the end of round k (round 0, the start model, at step 0).
The SFT warm start (``sft/``) is left out: its loss is a likelihood, not a preference loss.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from evaluation.benchmarks.common import iter_jsonl
from evaluation.nested import flatten

SKIP_CURVE = {"step", "epoch", "time", "timestamp", "round"}
# (panel title, training metric or None, held-out metric or None), TRL's names
PANELS = (
    ("loss", "loss", "eval/loss"),
    ("reward accuracy", "rewards/accuracies", "eval/rewards/accuracies"),
    ("reward margin", "rewards/margins", "eval/rewards/margins"),
    ("log-prob of chosen", "logps/chosen", "eval/logps/chosen"),
    ("log-prob of rejected", "logps/rejected", "eval/logps/rejected"),
    ("KL to the reference, per token", None, "eval/kl/full_per_token"),
    ("reward of chosen", "rewards/chosen", "eval/rewards/chosen"),
    ("reward of rejected", "rewards/rejected", "eval/rewards/rejected"),
    ("gradient norm", "grad_norm", None),
)
HELD_OUT = "held-out (eval split)"

Curves = dict[str, list[tuple[float, float]]]


def load_curves(path: str | Path) -> Curves:
    """``metrics.jsonl`` -> {metric: [(step, value), ...]} for every numeric key, sorted by step (``step`` = the
    row's ``step``, else its line number; a step logged twice, as after a worker restart, keeps its last value).
    A malformed line (not JSON, not an object) raises with its line number (``iter_jsonl``)."""
    by_key: dict[str, dict[float, float]] = {}
    for lineno, row in iter_jsonl(path):
        step = float(row.get("step", lineno))
        for key, value in row.items():
            if key not in SKIP_CURVE and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in by_key.items()}


def training_stages(output_dir: str | Path) -> dict[str, Path]:
    """{label: metrics.jsonl} of the training stages of an output folder, in training order: ``train``, then
    ``round 1``, ``round 2``, ... (only those whose file exists)."""
    out = Path(output_dir)
    stages = {"train": out / "train" / "metrics.jsonl"} if (out / "train" / "metrics.jsonl").is_file() else {}
    rounds = [p for p in out.glob("rounds/round-*/metrics.jsonl") if re.fullmatch(r"round-\d+", p.parent.name)]
    for p in sorted(rounds, key=lambda p: int(p.parent.name[6:])):
        stages[f"round {int(p.parent.name[6:])}"] = p
    return stages


@dataclass(frozen=True)
class Stage:
    label: str
    offset: float  # steps of the stages before this one
    curves: Curves

    @property
    def end(self) -> float:
        return self.offset + max((s for c in self.curves.values() for s, _ in c), default=0.0)


def timeline(stages: Mapping[str, Path]) -> list[Stage]:
    """The stages' curves placed one after another on one step axis."""
    placed, offset = [], 0.0
    for label, path in stages.items():
        placed.append(Stage(label, offset, load_curves(path)))
        offset = placed[-1].end
    return placed


def held_out_points(stages: Sequence[Stage], rounds: Mapping[int, Mapping[str, Any]]) -> tuple[Curves, list[int]]:
    """({eval metric: [(x, value)]}, rounds that could not be placed): the workers' ``eval/...`` rows at their
    step, and each round summary at the end of its round (replacing the worker's value at the same step: the
    same policy on the same split). A round without training metrics has no place on the axis."""
    points: dict[str, dict[float, float]] = {}
    for st in stages:
        for key, series in st.curves.items():
            if key.startswith("eval/"):
                points.setdefault(key, {}).update({st.offset + s: v for s, v in series})
    ends = {int(st.label[6:]): st.end for st in stages if st.label.startswith("round ")}
    ends[0] = 0.0
    unplaced = []
    for k, summary in rounds.items():
        if k not in ends:
            unplaced.append(k)
            continue
        for key, v in flatten(summary, keep_empty=False).items():
            if key.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool):
                points.setdefault(key, {})[ends[k]] = float(v)
    return {k: sorted(v.items()) for k, v in points.items()}, unplaced


def plot_training(stages: Sequence[Stage], held: Curves, path: Path) -> Path | None:
    """One panel per metric of :data:`PANELS` that has data: a line per stage (its colour, labelled in the
    figure's legend), the held-out points in black, dotted lines where a stage ends. None when nothing to plot."""
    panels = [p for p in PANELS if any(p[1] in st.curves for st in stages) or len(held.get(p[2], ())) > 0]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.3 * cols, 2.7 * rows + 0.5), layout="constrained")
    handles: dict[str, Any] = {}
    for i, (title, train_key, eval_key) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, st in enumerate(stages):
            if train_key in st.curves:
                xs, ys = zip(*st.curves[train_key])
                (line,) = ax.plot([st.offset + x for x in xs], ys, color=f"C{j % 10}", lw=1.3,
                                  marker="." if len(xs) < 40 else None)  # fmt: skip
                handles.setdefault(st.label, line)
            if st.end > 0 and j < len(stages) - 1:
                ax.axvline(st.end, color="0.6", lw=0.8, ls=":")
        if eval_key in held:
            xs, ys = zip(*held[eval_key])
            (line,) = ax.plot(xs, ys, color="black", lw=1, ls="--", marker="D", ms=4)
            handles.setdefault(HELD_OUT, line)
        ax.set_title(f"{title}\n{' / '.join(k for k in (train_key, eval_key) if k)}", fontsize=9)
        ax.set_xlabel("optimizer step (stages in order)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(6, len(handles)),
               fontsize=9, frameon=False)  # fmt: skip
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path
