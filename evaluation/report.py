"""The evaluation report: ``<output_dir>/eval/report.html``, self-contained (PNGs inlined, and saved beside it).

Sections: the summary table (every number of ``summary.json``), training curves (``train/metrics.jsonl``, one JSON
object per logged step), per-round metrics (``eval/round-<k>/summary.json``), and token-importance heatmaps as in
the paper's case study: chosen and rejected responses of a few eval pairs, each token coloured by its TI-DPO
weight, as PNG (matplotlib ``Figure``s: no pyplot state) and as HTML spans. One colour scale for every pair and
both renderings: diverging, white at weight 1, red above, blue below, top = max(2, 98th percentile of weights).

A heatmap entry: ``{"row_id", "prompt", "chosen": {"tokens": [str], "weights": [float], "reward": float?},
"rejected": {...}}``; ``tokens`` are display pieces whose concatenation is the response.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import string
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from evaluation.nested import flatten

TEMPLATE = Path(__file__).with_name("templates") / "report.html"
CMAP = "RdBu_r"
WRAP = 88  # characters per line in the PNG heatmaps
FONT_PT = 10.0
CHAR_EM = 0.602  # advance width of DejaVu Sans Mono, in em
CURVE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm")
ROUND_KEYS = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/kl/logratio_per_token",
              "eval/synthetic/judge_greedy", "eval/synthetic/judge_sampled", "eval/diversity/self_bleu",
              "eval/diversity/distinct_2")  # fmt: skip
LEGEND = "mean 1 over the weighting span; white = 1, red = above, blue = below"
SKIP_CURVE = {"step", "epoch", "time", "timestamp", "round"}


# ----------------------------------------------------------------------------------------------------------
# Loading saved results.


def load_curves(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``metrics.jsonl`` -> {metric: [(step, value), ...]} for every numeric key (``step`` = the row's ``step``,
    else its line number). A malformed line raises with its line number."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON object: {exc}") from exc
        step = row.get("step", lineno)
        for key, value in row.items():
            if key not in SKIP_CURVE and isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(key, []).append((float(step), float(value)))
    return curves


def load_rounds(eval_dir: Path) -> dict[int, dict[str, Any]]:
    """{k: summary} of every ``eval/round-<k>/summary.json``, by round."""
    paths = [p for p in eval_dir.glob("round-*/summary.json") if re.fullmatch(r"round-\d+", p.parent.name)]
    rounds = {int(p.parent.name[6:]): json.loads(p.read_text(encoding="utf-8")) for p in paths}
    return dict(sorted(rounds.items()))


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """Display pieces of a token list whose concatenation is ``decode(ids)``: piece i is the text that token i
    adds, ``decode(ids[:i+1])`` minus ``decode(ids[:i])`` (so a multi-byte character split over byte tokens
    shows whole on its last byte and empty before). Where a prefix's decoding is not a prefix of the next
    (tokenizers that clean up spaces), the piece is ``decode([id])``."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        text = decode(list(ids[: i + 1]))
        if text.endswith("\ufffd") and i < len(ids) - 1:  # an incomplete multi-byte character: wait for it
            pieces.append("")
            continue
        pieces.append(text[len(prev) :] if text.startswith(prev) else decode([ids[i]]))
        prev = text
    return pieces


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "null" if value is None else str(value)


# ----------------------------------------------------------------------------------------------------------
# Tables and curves.


def summary_table(summary: Mapping[str, Any]) -> str:
    """An HTML table of every entry, grouped by the metric family (``eval/<family>/...``)."""
    rows, group = [], None
    for key, value in flatten(summary, keep_empty=False).items():
        parts = key.split("/")
        family = parts[1] if parts[0] == "eval" and len(parts) > 2 else parts[0].split(".")[0]
        if family != group:
            group = family
            rows.append(f'<tr class="group"><td colspan="2">{html.escape(family)}</td></tr>')
        cls = ' class="num"' if isinstance(value, (int, float)) else ""
        rows.append(f"<tr><td>{html.escape(key)}</td><td{cls}>{html.escape(_fmt(value))}</td></tr>")
    return "<table>\n<tr><th>measure</th><th>value</th></tr>\n" + "\n".join(rows) + "\n</table>"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _img(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined (data URI), so the HTML stays whole when viewed alone (e.g. in MLflow)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{path.name}">'


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, xlabel: str = "step", max_panels: int = 9
) -> Path:
    """A grid of line plots, one panel per metric (TRL names first), x = optimizer step (or round)."""
    keys = [k for k in CURVE_KEYS if k in curves] + sorted(k for k in curves if k not in CURVE_KEYS)
    keys = keys[:max_panels]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = zip(*curves[key])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, lw=1.4)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    _save(fig, path)
    return path


def rounds_section(rounds: Mapping[int, Mapping[str, Any]], eval_dir: Path) -> str:
    """Table (rounds x key metrics) and a PNG of the same metrics against the round index."""
    if not rounds:
        return '<p class="note">No per-round results (eval/round-&lt;k&gt;/summary.json) in this run.</p>'
    flat = {k: flatten(v, keep_empty=False) for k, v in rounds.items()}
    keys = [k for k in ROUND_KEYS if any(k in f for f in flat.values())]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        f"<tr><td>{k}</td>" + "".join(f'<td class="num">{_fmt(f.get(key))}</td>' for key in keys) + "</tr>"
        for k, f in flat.items()
    )
    table = f"<table>\n<tr><th>round</th>{head}</tr>\n{body}\n</table>"
    curves = {
        key: [(float(k), float(f[key])) for k, f in flat.items() if isinstance(f.get(key), (int, float))]
        for key in keys
    }
    curves = {k: v for k, v in curves.items() if len(v) > 1}
    if not curves:
        return table
    return table + "\n" + _img(plot_curves(curves, eval_dir / "rounds.png", xlabel="round"), "metrics by round")


# ----------------------------------------------------------------------------------------------------------
# Token-importance heatmaps.


def weight_norm(heatmaps: Sequence[Mapping[str, Any]]) -> TwoSlopeNorm:
    """The shared colour scale: 0 .. 1 (white) .. max(2, 98th percentile of every weight shown)."""
    weights = [w for h in heatmaps for side in ("chosen", "rejected") for w in h[side]["weights"]]
    top = max(2.0, float(np.percentile(weights, 98))) if weights else 2.0
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)


def _display(piece: str) -> tuple[str, bool]:
    """A token's visible text (newline -> a return arrow that then breaks the line, tab -> arrow)."""
    breaks = "\n" in piece
    return piece.replace("\r", "").replace("\n", "\u21b5").replace("\t", "\u2192"), breaks


def _words(tokens: Sequence[str]) -> list[list[tuple[int, str, bool]]]:
    """Tokens grouped into words (lists of (token index, display text, breaks the line)) for wrapping: a word
    starts at a token that starts with, or follows, whitespace."""
    words: list[list[tuple[int, str, bool]]] = []
    prev_space = True
    for i, tok in enumerate(tokens):
        text, breaks = _display(tok)
        if prev_space or not words or text[:1].isspace():
            words.append([])
        words[-1].append((i, text, breaks))
        prev_space = breaks or text[-1:].isspace()
    return words


def _layout(tokens: Sequence[str], width: int) -> list[tuple[int, int, str, int]]:
    """Wrap tokens into lines of ``width`` characters at word boundaries (a word longer than a line is split):
    (line, column, text, token index) per drawn piece."""
    out, line, col = [], 0, 0
    for word in _words(tokens):
        size = sum(len(text) for _, text, _ in word)
        if col > 0 and col + size > width and size <= width:
            line, col = line + 1, 0
        for i, text, breaks in word:
            while text:
                if col >= width:
                    line, col = line + 1, 0
                take = text[: width - col]
                out.append((line, col, take, i))
                col += len(take)
                text = text[len(take) :]
            if breaks:
                line, col = line + 1, 0
    return out


def _wrap_text(text: str, width: int, max_lines: int = 6) -> list[str]:
    """Word-wrapped lines of a plain text (the prompt), at most ``max_lines`` (then an ellipsis)."""
    lines = []
    for para in text.splitlines() or [""]:
        lines += textwrap.wrap(para, width) or [""]
    return lines if len(lines) <= max_lines else lines[: max_lines - 1] + [lines[max_lines - 1][: width - 1] + "\u2026"]


def _text_color(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"


def _heatmap_lines(entry: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The text lines of one pair's PNG: ("head"|"label", text) or ("tok", [(column, text, weight), ...])."""
    lines: list[tuple[str, Any]] = [("head", line) for line in _wrap_text(f"Prompt: {entry['prompt']}", WRAP)]
    for side in ("chosen", "rejected"):
        resp = entry[side]
        if len(resp["tokens"]) != len(resp["weights"]):
            raise ValueError(f"heatmap {side}: {len(resp['tokens'])} tokens but {len(resp['weights'])} weights")
        lines += [("head", ""), ("label", f"{side.upper()} response{_reward_note(resp)}")]
        placed = _layout(resp["tokens"], WRAP)
        for k in range(placed[-1][0] + 1 if placed else 1):
            lines.append(("tok", [(c, t, resp["weights"][i]) for (ln, c, t, i) in placed if ln == k]))
    return lines


def plot_heatmap(entry: Mapping[str, Any], norm: TwoSlopeNorm, path: Path, *, title: str = "") -> Path:
    """One pair as a PNG: the prompt, then chosen and rejected responses with coloured tokens, a colour bar.

    Monospace text on a character grid (one x unit = one character), wrapped at ``WRAP`` characters.
    """
    cmap = ScalarMappable(norm=norm, cmap=CMAP)
    lines = _heatmap_lines(entry)
    char_in, line_in = CHAR_EM * FONT_PT / 72, 1.75 * FONT_PT / 72
    text_w, text_h, bar_h, pad = WRAP * char_in, len(lines) * line_in, 0.85, 0.25
    fig = Figure(figsize=(text_w + 2 * pad, text_h + bar_h + 2 * pad + 0.35))
    W, H = fig.get_figwidth(), fig.get_figheight()
    ax = fig.add_axes((pad / W, (bar_h + pad) / H, text_w / W, text_h / H))
    ax.set_xlim(0, WRAP)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    font = {"va": "center", "family": "DejaVu Sans Mono", "size": FONT_PT}
    for y, (kind, payload) in enumerate(lines):
        if kind != "tok":
            ax.text(0, y + 0.5, payload, weight="bold" if kind == "label" else "normal", **font)
            continue
        for col, text, w in payload:
            rgba = cmap.to_rgba(w)
            ax.add_patch(Rectangle((col, y + 0.08), len(text), 0.84, facecolor=rgba, edgecolor="none"))
            ax.text(col, y + 0.5, text, color=_text_color(rgba), **font)
    if title:
        fig.suptitle(title, x=pad / W, y=1 - 0.08 / H, ha="left", va="top", fontsize=11, weight="bold")
    top = max((w for side in ("chosen", "rejected") for w in entry[side]["weights"]), default=0.0)
    cax = fig.add_axes((0.25, (pad + 0.3) / H, 0.5, 0.16 / H))
    bar = fig.colorbar(cmap, cax=cax, orientation="horizontal", extend="max" if top > norm.vmax else "neither")
    bar.set_label(f"TI-DPO token weight ({LEGEND})", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    _save(fig, path)
    return path


def heatmap_spans(resp: Mapping[str, Any], norm: TwoSlopeNorm) -> str:
    """The response as HTML spans, each with its weight's background colour and a tooltip."""
    cmap = ScalarMappable(norm=norm, cmap=CMAP)
    spans = []
    for tok, w in zip(resp["tokens"], resp["weights"], strict=True):
        rgba = cmap.to_rgba(w)
        text, breaks = _display(tok)
        style = f"background:{to_hex(rgba)};color:{_text_color(rgba)}"
        spans.append(f'<span class="tok" style="{style}" title="weight {w:.3f}">{html.escape(text)}</span>')
        if breaks:
            spans.append("\n")
    return "".join(spans)


def legend_html(norm: TwoSlopeNorm) -> str:
    """A CSS gradient colour bar, linear in the weight, with ticks at 0, 1 (white) and the top of the scale."""
    cmap = ScalarMappable(norm=norm, cmap=CMAP)
    span = norm.vmax - norm.vmin
    stops = ", ".join(
        f"{to_hex(cmap.to_rgba(v))} {100 * (v - norm.vmin) / span:.1f}%" for v in np.linspace(norm.vmin, norm.vmax, 21)
    )
    ticks = "".join(f'<span style="left:{100 * (v - norm.vmin) / span:.1f}%">{v:.2g}</span>' for v in (0, 1, norm.vmax))
    return (
        '<div class="legend"><span>token weight</span><div><div class="bar" '
        f'style="background:linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks">{ticks}</div></div>'
        f"<span>{LEGEND}</span></div>"
    )


def heatmaps_section(heatmaps: Sequence[Mapping[str, Any]], eval_dir: Path) -> tuple[str, str]:
    """(legend HTML, body HTML) with one PNG and one HTML rendering per pair."""
    if not heatmaps:
        return "", '<p class="note">No heatmap pairs were saved for this run (eval/heatmaps.json).</p>'
    norm = weight_norm(heatmaps)
    parts = []
    for i, entry in enumerate(heatmaps):
        name = f"heatmap-{i}.png"
        title = f"Eval pair {entry.get('row_id', i)}"
        png = plot_heatmap(entry, norm, eval_dir / name, title=title)
        sides = "".join(
            f"<h4>{side}{_reward_note(entry[side])}</h4><div class='tokens'>{heatmap_spans(entry[side], norm)}</div>"
            for side in ("chosen", "rejected")
        )
        parts.append(
            f'<div class="pair"><h3>{html.escape(title)}</h3><p><b>Prompt:</b> {html.escape(entry["prompt"])}</p>'
            f"{_img(png, title + ' heatmap')}{sides}</div>"
        )
    return legend_html(norm), "\n".join(parts)


def _reward_note(resp: Mapping[str, Any]) -> str:
    return f" (implicit reward {resp['reward']:.3g})" if resp.get("reward") is not None else ""


# ----------------------------------------------------------------------------------------------------------
# Entry points.


def write_report(
    output_dir: str | Path,
    summary: Mapping[str, Any],
    *,
    curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    heatmaps: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write ``<output_dir>/eval/report.html`` and its PNGs; returns the HTML path. ``curves`` None reads
    ``<output_dir>/train/metrics.jsonl`` when it exists (else the section says so)."""
    out = Path(output_dir)
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "train" / "metrics.jsonl"
    if curves is None and metrics_path.is_file():
        curves = load_curves(metrics_path)
    if curves:
        curves_html = _img(plot_curves(curves, eval_dir / "curves.png"), "training curves")
    else:
        curves_html = '<p class="note">No training metrics (train/metrics.jsonl) in this run.</p>'
    legend, heat_html = heatmaps_section(heatmaps, eval_dir)
    meta = summary.get("meta", {}) if isinstance(summary.get("meta"), Mapping) else {}
    page = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=html.escape(out.name),
        subtitle=html.escape(
            f"output folder {out.resolve()}; policy {meta.get('policy', '?')}; reference {meta.get('reference', '?')}"
        ),
        summary_table=summary_table(summary),
        curves=curves_html,
        rounds=rounds_section(load_rounds(eval_dir), eval_dir),
        legend=legend,
        heatmaps=heat_html,
    )
    path = eval_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def render_from_saved(output_dir: str | Path) -> Path:
    """Re-render the report from ``eval/summary.json`` and ``eval/heatmaps.json`` (no model is loaded)."""
    eval_dir = Path(output_dir) / "eval"
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: run `tidpo evaluate` on this output folder first")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    heat_path = eval_dir / "heatmaps.json"
    heatmaps = json.loads(heat_path.read_text(encoding="utf-8")) if heat_path.is_file() else []
    return write_report(output_dir, summary, heatmaps=heatmaps)
