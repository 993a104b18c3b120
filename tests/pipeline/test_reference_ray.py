"""Reference log-probs precomputed by Ray Data: each split's rows land in its own cache folder with the values of
an unbatched forward of the reference, both splits in one pass. (A train split with anchors, a column eval
lacks, goes in a pass of its own: every paper-preset run in test_train_ray.py takes that path.)"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _table(folder) -> pa.Table:
    return pq.read_table(folder).sort_by("row_id")


def _expected_logps(model, prompt, response) -> list[float]:
    """log pi(y_t | x, y_<t) for each response token, one unpadded sequence at a time."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[-len(response) :].tolist()


def test_both_splits_in_their_folders_with_unbatched_values(ray_cluster, tmp_path):
    from pipeline.data.prepare import prepare
    from pipeline.models import build_model, build_tokenizer
    from pipeline.plan import plan
    from pipeline.train.reference import precompute_reference_splits

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.synthetic_num_pairs=40", "data.eval_size=8"])
    prepare(cfg)
    p = plan(cfg, "train")
    assert p.reference.precompute
    splits = {"train": p.train_split, "eval": p.eval_split}
    outs = precompute_reference_splits(cfg, splits, p.reference.model, p.layout.cache)
    assert len(set(outs.values())) == 2 and all(o.parent == p.layout.cache for o in outs.values())
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, len(tok), name=p.reference.model, seed=cfg.seed).eval()
    for name, src in splits.items():
        before, after = _table(src), _table(outs[name])
        assert after.num_rows == before.num_rows == {"train": 32, "eval": 8}[name]
        assert "_ref_split" not in after.column_names
        for column in before.column_names:  # every input row, unchanged, once (lists come back as Ray tensors)
            got = [list(x) if x is not None and not isinstance(x, str | int) else x for x in after[column].to_pylist()]
            assert got == before[column].to_pylist(), (name, column)
        assert json.loads((outs[name] / "_DONE.json").read_text())["rows"] == before.num_rows
        rows = after.to_pylist()
        for row in rows[:6]:
            for side in ("chosen", "rejected"):
                got = row[f"ref_{side}_logps"]
                want = _expected_logps(model, row["prompt_ids"], row[f"{side}_ids"])
                assert got == pytest.approx(want, abs=1e-4), (name, row["row_id"], side)
    # cached: a second call computes nothing
    stamps = {n: (o / "_DONE.json").stat().st_mtime for n, o in outs.items()}
    assert precompute_reference_splits(cfg, splits, p.reference.model, p.layout.cache) == outs
    assert {n: (o / "_DONE.json").stat().st_mtime for n, o in outs.items()} == stamps
