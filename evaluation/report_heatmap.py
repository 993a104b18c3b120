"""Token-importance heatmaps, as in the paper's case study: the chosen and rejected responses of an eval pair,
each word coloured by its TI-DPO weight. HTML (selectable text, in the report) and PNG (matplotlib ``Figure``,
no pyplot state; saved beside the report for embedding elsewhere), from the same words and the same colour scale:
diverging, white at weight 1, red above, blue below, top = max(2, 98th percentile of the words shown).

A heatmap side: ``{"tokens": [display piece], "weights": [float], "special": [token index]?, "reward": float?}``
(:func:`evaluation.importance.heatmap_side`). Words come from :func:`evaluation.importance.word_spans`; a word's
colour is :func:`evaluation.importance.word_weight` (the largest of its tokens' weights); its leading and
trailing whitespace is drawn uncoloured, a whitespace-only token is a coloured word of its own.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from evaluation.importance import word_spans, word_weight

CMAP = "RdBu_r"
WRAP = 88  # characters per line in the PNG heatmaps
FONT_PT = 10.0
CHAR_EM = 0.602  # advance width of DejaVu Sans Mono, in em
LEGEND = "a word's colour is the largest weight among its tokens; token weights have mean 1 over the weighting span"
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class Word:
    lead: str  # leading whitespace, drawn uncoloured
    core: str  # the coloured text
    trail: str  # trailing whitespace, uncoloured
    weight: float
    tokens: tuple[tuple[str, float], ...]  # (piece, weight) of each of its tokens


def response_words(resp: Mapping[str, Any]) -> list[Word]:
    """The words of one heatmap side (lengths checked)."""
    tokens, weights = resp["tokens"], resp["weights"]
    if len(tokens) != len(weights):
        raise ValueError(f"heatmap: {len(tokens)} tokens but {len(weights)} weights")
    words = []
    for a, b in word_spans(tokens, set(resp.get("special", ()))):
        text = "".join(tokens[a:b])
        core = text.strip()
        lead, trail = (text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]) if core else ("", "")
        words.append(Word(lead, core or text, trail, word_weight(weights[a:b]),
                          tuple(zip(tokens[a:b], weights[a:b], strict=True))))  # fmt: skip
    return words


def weight_norm(heatmaps: Sequence[Mapping[str, Any]]) -> TwoSlopeNorm:
    """The shared colour scale: 0 .. 1 (white) .. max(2, 98th percentile of every word weight shown)."""
    weights = [w.weight for h in heatmaps for side in SIDES for w in response_words(h[side])]
    top = max(2.0, float(np.percentile(weights, 98))) if weights else 2.0
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)


def segments(text: str) -> list[tuple[str, bool]]:
    """Displayed parts of a text and whether a line break follows each: a newline shows as a return arrow and
    breaks the line, a tab as an arrow."""
    parts = text.replace("\r", "").replace("\t", "\u2192").split("\n")
    out = [(p + "\u21b5", True) for p in parts[:-1]]
    return out + [(parts[-1], False)] if parts[-1] else out


def _word_parts(word: Word) -> list[tuple[str, bool, bool]]:
    """(text, coloured, breaks after) of a word's lead, core and trail."""
    return [(t, coloured, br) for part, coloured in ((word.lead, False), (word.core, True), (word.trail, False))
            for t, br in segments(part)]  # fmt: skip


def layout(words: Sequence[Word], width: int) -> list[tuple[int, int, str, int | None]]:
    """Wrap words into lines of ``width`` characters (a word longer than a line is split): (line, column, text,
    word index or None for uncoloured whitespace) per drawn part."""
    out: list[tuple[int, int, str, int | None]] = []
    line, col = 0, 0
    for i, word in enumerate(words):
        parts = _word_parts(word)
        size = sum(len(t) for t, _, _ in parts)
        if col > 0 and col + size > width and size <= width:
            line, col = line + 1, 0
        for text, coloured, breaks in parts:
            while text:
                if col >= width:
                    line, col = line + 1, 0
                take = text[: width - col]
                out.append((line, col, take, i if coloured else None))
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


def reward_note(resp: Mapping[str, Any]) -> str:
    return f" (implicit reward {resp['reward']:.3g})" if resp.get("reward") is not None else ""


def _png_lines(entry: Mapping[str, Any]) -> tuple[list[tuple[str, Any]], list[float]]:
    """The text lines of one pair's PNG, ("head"|"label", text) or ("tok", [(column, text, weight|None)]), and
    every word weight drawn."""
    lines: list[tuple[str, Any]] = [("head", line) for line in _wrap_text(f"Prompt: {entry['prompt']}", WRAP)]
    drawn = []
    for side in SIDES:
        words = response_words(entry[side])
        drawn += [w.weight for w in words]
        lines += [("head", ""), ("label", f"{side.upper()} response{reward_note(entry[side])}")]
        placed = layout(words, WRAP)
        for k in range(placed[-1][0] + 1 if placed else 1):
            lines.append(("tok", [(c, t, None if i is None else words[i].weight) for ln, c, t, i in placed if ln == k]))
    return lines, drawn


def plot_heatmap(entry: Mapping[str, Any], norm: TwoSlopeNorm, path: Path, *, title: str = "") -> Path:
    """One pair as a PNG: the prompt, then chosen and rejected responses with coloured words, a colour bar.

    Monospace text on a character grid (one x unit = one character), wrapped at ``WRAP`` characters.
    """
    cmap = ScalarMappable(norm=norm, cmap=CMAP)
    lines, drawn = _png_lines(entry)
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
            rgba = cmap.to_rgba(w) if w is not None else (1.0, 1.0, 1.0, 1.0)
            if w is not None:
                ax.add_patch(Rectangle((col, y + 0.08), len(text), 0.84, facecolor=rgba, edgecolor="none"))
            ax.text(col, y + 0.5, text, color=_text_color(rgba), **font)
    if title:
        fig.suptitle(title, x=pad / W, y=1 - 0.08 / H, ha="left", va="top", fontsize=11, weight="bold")
    cax = fig.add_axes((0.2, (pad + 0.3) / H, 0.6, 0.16 / H))
    extend = "max" if max(drawn, default=0.0) > norm.vmax else "neither"
    bar = fig.colorbar(cmap, cax=cax, orientation="horizontal", extend=extend)
    bar.set_label(f"TI-DPO weight: white = 1, red above, blue below\n({LEGEND})", fontsize=8.5)
    bar.ax.tick_params(labelsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _tooltip(word: Word) -> str:
    if len(word.tokens) == 1:
        return f"weight {word.weight:.3f}"
    parts = " \u00b7 ".join(f"{piece!r} {w:.3f}" for piece, w in word.tokens)
    return f"weight {word.weight:.3f} (largest of {len(word.tokens)} tokens: {parts})"


def heatmap_html(resp: Mapping[str, Any], norm: TwoSlopeNorm) -> str:
    """The response as HTML: a span per word with its weight's background colour and a tooltip that lists the
    weight of each of its tokens; whitespace between words uncoloured, newlines as arrows and line breaks."""
    cmap = ScalarMappable(norm=norm, cmap=CMAP)
    out = []
    for word in response_words(resp):
        rgba = cmap.to_rgba(word.weight)
        style = f"background:{to_hex(rgba)};color:{_text_color(rgba)}"
        for text, coloured, breaks in _word_parts(word):
            body = html.escape(text)
            if coloured:
                body = f'<span class="tok" style="{style}" title="{html.escape(_tooltip(word))}">{body}</span>'
            out.append(body + ("\n" if breaks else ""))
    return "".join(out)


def legend_html(norm: TwoSlopeNorm) -> str:
    """A CSS gradient colour bar, linear in the weight, with ticks at 0, 1 (white) and the top of the scale."""
    cmap = ScalarMappable(norm=norm, cmap=CMAP)
    span = norm.vmax - norm.vmin
    stops = ", ".join(
        f"{to_hex(cmap.to_rgba(v))} {100 * (v - norm.vmin) / span:.1f}%" for v in np.linspace(norm.vmin, norm.vmax, 21)
    )
    ticks = "".join(f'<span style="left:{100 * (v - norm.vmin) / span:.1f}%">{v:.2g}</span>' for v in (0, 1, norm.vmax))
    return (
        '<div class="legend"><span>weight</span><div><div class="bar" '
        f'style="background:linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks">{ticks}</div></div>'
        f"<span>{LEGEND}</span></div>"
    )
