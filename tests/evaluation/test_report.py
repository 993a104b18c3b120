"""The HTML + PNG report renders from small synthetic results laid out like a loop's output folder, and
re-renders from saved files."""

from __future__ import annotations

import json
import re

import pytest

from evaluation.report import render_from_saved, write_report
from evaluation.report_curves import held_out_points, load_curves, timeline, training_stages
from evaluation.report_heatmap import layout, response_words

SUMMARY = {
    "eval/rewards/accuracies": 0.75,
    "eval/rewards/margins": 0.125,
    "eval/weights/logratio_corr": None,  # NaN is stored as null
    "meta": {"policy": "out/model", "reference": "tiny", "round": None},
    "top_tokens": {
        side: {
            "tokens": [{"token": " cat", "id": 5, "mean_weight": 2.5, "count": 4}],
            "responses": 4,
            "skipped": 0,
            "min_count": 3,
        }  # fmt: skip
        for side in ("chosen", "rejected")
    },
}


def _pair(row_id: str) -> dict:
    """Chosen words: "The", " cat", " sat." (two tokens, max 3.0), "↵", "<eos>" (special): 5 coloured words."""
    return {
        "row_id": row_id,
        "prompt": "say <b>",
        "chosen": {
            "tokens": ["The", " cat", " sat", ".", "\n", "<eos>"],
            "weights": [0.5, 0.8, 3.0, 1.2, 0.5, 2.0],
            "special": [5],
        },  # fmt: skip
        "rejected": {"tokens": ["No", "<eos>"], "weights": [0.2, 1.8], "special": [1], "reward": -0.25},
    }


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _loop_folder(root):
    """Two rounds of 3 and 2 logged steps (round 1 has a mid-run eval at step 2 and a restart that logged step 3
    twice), and the evaluate stage's summaries of rounds 0, 1, 2."""
    _jsonl(root / "rounds" / "round-1" / "metrics.jsonl",
           [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, "eval/rewards/accuracies": 0.55},
            {"step": 3, "loss": 9.0}, {"step": 3, "loss": 0.5}, {"step": 3, "final": True,
                                                                 "eval/rewards/accuracies": 0.6}])  # fmt: skip
    _jsonl(root / "rounds" / "round-2" / "metrics.jsonl", [{"step": 1, "loss": 0.45}, {"step": 2, "loss": 0.4}])
    for k, acc in ((0, 0.5), (1, 0.625), (2, 0.75)):
        (root / "eval" / f"round-{k}").mkdir(parents=True)
        summary = {"eval/rewards/accuracies": acc, "eval/kl/full_per_token": 0.01 * k, "top_tokens": {}}
        (root / "eval" / f"round-{k}" / "summary.json").write_text(json.dumps(summary))


def test_curves_of_every_round_on_one_axis(tmp_path):
    """Round 2 starts where round 1 ended (offset 3). Held-out points: round 0 at 0, round 1's mid-run eval at 2,
    round k's summary at the end of round k (3 and 3 + 2 = 5), replacing the worker's final eval (0.6) at 3."""
    _loop_folder(tmp_path)
    stages = timeline(training_stages(tmp_path))
    assert [(st.label, st.offset, st.end) for st in stages] == [("round 1", 0.0, 3.0), ("round 2", 3.0, 5.0)]
    assert stages[0].curves["loss"] == [(1.0, 0.7), (2.0, 0.6), (3.0, 0.5)]  # step 3 again after a restart: last
    from evaluation.report import load_rounds

    held, unplaced = held_out_points(stages, load_rounds(tmp_path / "eval"))
    assert held["eval/rewards/accuracies"] == [(0.0, 0.5), (2.0, 0.55), (3.0, 0.625), (5.0, 0.75)]
    assert held["eval/kl/full_per_token"] == [(0.0, 0.0), (3.0, 0.01), (5.0, 0.02)] and unplaced == []
    assert held_out_points(stages[:1], load_rounds(tmp_path / "eval"))[1] == [2]  # round 2 has no curves


def test_training_stages_are_the_plans_folders(tmp_path):
    """The report finds the folders :class:`pipeline.plan.Layout` gives training stages, in training order."""
    from pipeline.plan import Layout

    lay = Layout(tmp_path)
    for path in (lay.round(10) / "metrics.jsonl", lay.round(2) / "metrics.jsonl", lay.train / "metrics.jsonl"):
        _jsonl(path, [{"step": 1, "loss": 0.5}])
    _jsonl(lay.sft / "metrics.jsonl", [{"step": 1, "loss": 2.0}])
    stages = training_stages(tmp_path)
    assert list(stages) == ["train", "round 2", "round 10"]
    assert stages["round 10"] == lay.round(10) / "metrics.jsonl"


def test_write_report_curves_rounds_tokens_heatmaps(tmp_path):
    _loop_folder(tmp_path)
    path = write_report(tmp_path, SUMMARY, heatmaps=[_pair("a"), _pair("b")])
    assert path == tmp_path / "eval" / "report.html"
    for name in ("curves.png", "heatmap-0.png", "heatmap-1.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 1000, name
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 1  # the curves; each heatmap is in the page once, as HTML
    assert "No training metrics" not in page and "Training stages: round 1, round 2" in page
    assert '<tr><td>eval/rewards/accuracies</td><td class="num">0.75</td></tr>' in page
    assert "<tr><td>eval/weights/logratio_corr</td><td>null</td></tr>" in page
    assert "<tr><td>meta.reference</td><td>tiny</td></tr>" in page and "top_tokens" not in page
    # per-round table: metrics as rows, rounds as columns
    assert "<tr><th>measure (eval/...)</th><th>round 0</th><th>round 1</th><th>round 2</th></tr>" in page
    assert '<tr><td>rewards/accuracies</td><td class="num">0.5</td><td class="num">0.625</td>' in page
    assert page.count('<td class="tokcell">\u00b7cat</td><td class="num">2.5</td><td class="num">4</td>') == 2
    # heatmaps: 5 + 2 coloured words per pair; a word takes its tokens' largest weight; spaces stay uncoloured
    assert page.count('<span class="tok"') == 2 * (5 + 2)
    assert re.search(r' <span class="tok" [^>]*title="weight 3.000 \(largest of 2 tokens: [^"]*">sat\.</span>', page)
    assert 'title="weight 2.000">&lt;eos&gt;</span>' in page and "say &lt;b&gt;" in page
    assert "implicit reward -0.25" in page and 'href="heatmap-1.png"' in page


def test_render_from_saved(tmp_path):
    with pytest.raises(FileNotFoundError, match="tidpo evaluate"):
        render_from_saved(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"eval/rewards/accuracies": 0.5}))
    page = render_from_saved(tmp_path).read_text()  # no heatmaps.json, no training stages: says so
    assert "No heatmap pairs" in page and "No training metrics" in page and "No per-round results" in page
    assert "No token-weight table" in page
    (tmp_path / "eval" / "heatmaps.json").write_text(json.dumps([_pair("x")]))
    assert "Eval pair x" in render_from_saved(tmp_path).read_text()


def test_heatmap_rejects_mismatched_lengths(tmp_path):
    bad = _pair("a")
    bad["chosen"]["weights"] = [1.0]
    with pytest.raises(ValueError, match="6 tokens but 1 weights"):
        write_report(tmp_path, SUMMARY, heatmaps=[bad])


def test_layout_wraps_at_words_and_newlines():
    """Width 8: "hello" + " world" would need 11 columns, so " world" starts line 1 (its space uncoloured: word
    index None); "!!" joins "world"; a newline shows as an arrow and breaks the line; a long word is split."""

    def words(tokens):
        return response_words({"tokens": tokens, "weights": [1.0] * len(tokens)})

    assert layout(words(["hello", " world", "!!"]), 8) == [
        (0, 0, "hello", 0), (1, 0, " ", None), (1, 1, "world!!", 1)]  # fmt: skip
    assert layout(words(["a", "\n", "b"]), 8) == [(0, 0, "a", 0), (0, 1, "\u21b5", 1), (1, 0, "b", 2)]
    assert layout(words(["abcdefghij"]), 4) == [(0, 0, "abcd", 0), (1, 0, "efgh", 0), (2, 0, "ij", 0)]


def test_load_curves_reports_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5, "note": "x", "ok": true}\n\n{"loss": 0.4}\n')
    assert load_curves(path) == {"loss": [(1.0, 0.5), (3.0, 0.4)]}  # no step: the line number
    path.write_text('{"step": 1}\n{broken\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        load_curves(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: expected a JSON object"):
        load_curves(path)
