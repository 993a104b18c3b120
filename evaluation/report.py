"""The evaluation report: ``<output_dir>/eval/report.html``, one self-contained page (PNGs inlined).

Sections: the summary table (every number of ``summary.json``), training curves of every training stage on one
step axis with the held-out points (:mod:`evaluation.report_curves`), per-round metrics (``eval/round-<k>/
summary.json``, metrics as rows and rounds as columns), the tokens with the highest weight over the eval split
(``summary["top_tokens"]``, :func:`evaluation.importance.top_weight_tokens`), and token-importance heatmaps of a
few eval pairs as HTML (:mod:`evaluation.report_heatmap`; the same heatmaps as PNG files beside the page).

A heatmap entry: ``{"row_id", "prompt", "chosen": side, "rejected": side}`` with the sides of
:func:`evaluation.importance.heatmap_side` (plus ``"reward"``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.nested import flatten
from evaluation.report_curves import held_out_points, plot_training, timeline, training_stages
from evaluation.report_heatmap import SIDES, heatmap_html, legend_html, plot_heatmap, reward_note, weight_norm

TEMPLATE = Path(__file__).with_name("templates") / "report.html"
TOP_TOKENS = "top_tokens"  # the summary key of the highest-weight token tables (not a number: its own section)


def load_rounds(eval_dir: Path) -> dict[int, dict[str, Any]]:
    """{k: summary} of every ``eval/round-<k>/summary.json``, by round."""
    paths = [p for p in eval_dir.glob("round-*/summary.json") if re.fullmatch(r"round-\d+", p.parent.name)]
    rounds = {int(p.parent.name[6:]): json.loads(p.read_text(encoding="utf-8")) for p in paths}
    return dict(sorted(rounds.items()))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "null" if value is None else str(value)


def _img(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined (data URI), so the HTML stays whole when viewed alone (e.g. in MLflow)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{path.name}">'


# ----------------------------------------------------------------------------------------------------------
# Sections.


def summary_table(summary: Mapping[str, Any]) -> str:
    """An HTML table of every entry but the token tables, grouped by the metric family (``eval/<family>/...``)."""
    rows, group = [], None
    for key, value in flatten({k: v for k, v in summary.items() if k != TOP_TOKENS}, keep_empty=False).items():
        parts = key.split("/")
        family = parts[1] if parts[0] == "eval" and len(parts) > 2 else parts[0].split(".")[0]
        if family != group:
            group = family
            rows.append(f'<tr class="group"><td colspan="2">{html.escape(family)}</td></tr>')
        cls = ' class="num"' if isinstance(value, (int, float)) else ""
        rows.append(f"<tr><td>{html.escape(key)}</td><td{cls}>{html.escape(_fmt(value))}</td></tr>")
    return "<table>\n<tr><th>measure</th><th>value</th></tr>\n" + "\n".join(rows) + "\n</table>"


def curves_section(output_dir: Path, rounds: Mapping[int, Mapping[str, Any]]) -> str:
    """The training-curves PNG (every stage, held-out points), or a note saying what was looked for."""
    stages = timeline(training_stages(output_dir))
    held, unplaced = held_out_points(stages, rounds)
    png = plot_training(stages, held, output_dir / "eval" / "curves.png")
    if png is None:
        return ('<p class="note">No training metrics in this run (looked for train/metrics.jsonl and '
                "rounds/round-&lt;k&gt;/metrics.jsonl) and no held-out results.</p>")  # fmt: skip
    labels = ", ".join(st.label for st in stages) or "none"
    note = f"Training stages: {html.escape(labels)}, one after another on the step axis; black: held-out pairs."
    if unplaced:
        note += f" Rounds without training metrics, not plotted: {', '.join(map(str, unplaced))}."
    if (output_dir / "sft" / "metrics.jsonl").is_file():
        note += " The SFT warm start (sft/metrics.jsonl, a likelihood loss) is not plotted."
    return f'<p class="note">{note}</p>\n{_img(png, "training curves")}'


def rounds_section(rounds: Mapping[int, Mapping[str, Any]]) -> str:
    """A table of every held-out number of every round: metrics as rows, rounds as columns."""
    if not rounds:
        return '<p class="note">No per-round results (eval/round-&lt;k&gt;/summary.json) in this run.</p>'
    flat = {k: flatten({m: v for m, v in s.items() if m != TOP_TOKENS}, keep_empty=False) for k, s in rounds.items()}
    keys = list(dict.fromkeys(m for f in flat.values() for m, v in f.items() if m.startswith("eval/")))
    head = "".join(f"<th>round {k}</th>" for k in flat)
    body = "\n".join(
        f"<tr><td>{html.escape(m.removeprefix('eval/'))}</td>"
        + "".join(f'<td class="num">{_fmt(f.get(m))}</td>' for f in flat.values())
        + "</tr>"
        for m in keys
    )
    return f'<table class="rounds">\n<tr><th>measure (eval/...)</th>{head}</tr>\n{body}\n</table>'


def _visible(token: str) -> str:
    """A token's text with its whitespace shown: space as a middle dot, newline and tab as arrows."""
    return token.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "")


def top_tokens_section(record: Mapping[str, Any] | None) -> str:
    """The highest-weight tokens of the chosen and of the rejected responses, side by side."""
    if not record:
        return '<p class="note">No token-weight table in this summary (it needs the preference measure).</p>'
    tables = []
    for side in SIDES:
        rec = record[side]
        rows = "".join(
            f'<tr><td class="tokcell">{html.escape(_visible(r["token"]))}</td>'
            f'<td class="num">{r["mean_weight"]:.3g}</td><td class="num">{r["count"]}</td></tr>'
            for r in rec["tokens"]
        )
        caption = f"{side}: {rec['responses']} responses" + (f", {rec['skipped']} left out" if rec["skipped"] else "")
        tables.append(
            f"<table><caption>{html.escape(caption)}</caption><tr><th>token</th><th>mean weight</th>"
            f"<th>count</th></tr>{rows}</table>"
        )
    some = record[SIDES[0]]
    note = (f"Mean normalised weight (a token's weight / the mean weight of its response) over the eval responses "
            f"with weights (eval.weight_diag_pairs pairs); tokens seen at least {some['min_count']} times. "
            "\u00b7 is a space, \u21b5 a newline.")  # fmt: skip
    return f'<p class="note">{html.escape(note)}</p>\n<div class="side-by-side">{"".join(tables)}</div>'


def heatmaps_section(heatmaps: Sequence[Mapping[str, Any]], eval_dir: Path) -> tuple[str, str]:
    """(legend HTML, body HTML): each pair once, as HTML; its PNG is saved as ``heatmap-<i>.png`` and linked."""
    if not heatmaps:
        return "", '<p class="note">No heatmap pairs were saved for this run (eval/heatmaps.json).</p>'
    norm = weight_norm(heatmaps)
    parts = []
    for i, entry in enumerate(heatmaps):
        title = f"Eval pair {entry.get('row_id', i)}"
        png = plot_heatmap(entry, norm, eval_dir / f"heatmap-{i}.png", title=title)
        sides = "".join(
            f"<h4>{side}{reward_note(entry[side])}</h4><div class='tokens'>{heatmap_html(entry[side], norm)}</div>"
            for side in SIDES
        )
        parts.append(
            f'<div class="pair"><h3>{html.escape(title)} <a class="png" href="{png.name}">PNG</a></h3>'
            f"<p><b>Prompt:</b> {html.escape(entry['prompt'])}</p>{sides}</div>"
        )
    return legend_html(norm), "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Entry points.


def write_report(output_dir: str | Path, summary: Mapping[str, Any], *, heatmaps: Sequence[Mapping[str, Any]] = ()):
    """Write ``<output_dir>/eval/report.html`` and its PNGs (curves, one per heatmap pair); returns the HTML
    path. Training curves come from the output folder's training stages (:mod:`evaluation.report_curves`)."""
    out = Path(output_dir)
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    rounds = load_rounds(eval_dir)
    legend, heat_html = heatmaps_section(heatmaps, eval_dir)
    meta = summary.get("meta", {}) if isinstance(summary.get("meta"), Mapping) else {}
    page = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=html.escape(out.name),
        subtitle=html.escape(
            f"output folder {out.resolve()}; policy {meta.get('policy', '?')}; reference {meta.get('reference', '?')}"
        ),
        summary_table=summary_table(summary),
        curves=curves_section(out, rounds),
        rounds=rounds_section(rounds),
        top_tokens=top_tokens_section(summary.get(TOP_TOKENS)),
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
