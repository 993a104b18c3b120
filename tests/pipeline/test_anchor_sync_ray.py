"""generation.sync=steps through `tidpo train` on the shared local Ray: 2 train workers, one hf generation actor.

Exactness against the trainer's own in-step sampling (train.anchors=online, the in-process reference) with a
generation actor killed mid-run, bounded staleness with a weights checksum per sync, and a train worker
killed after a registered checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.pipeline.test_train_ray import _assert_data_order

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]


def tiny_cfg(out: Path, *extra: str):
    return load_config(
        None,
        [
            f"output_dir={out}",
            "data.synthetic_num_pairs=120",
            "train.sft_steps=0",
            "train.micro_batch_size=8",
            "train.lr=2e-2",
            "train.warmup_steps=0",
            "train.report_interval_s=0",
            "loss.preset=paper",
            "generation.engine=hf",
            "generation.max_new_tokens=6",
            "tracking.enabled=true",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    from pipeline.data.prepare import prepare

    out = tmp_path_factory.mktemp("anchor-sync")
    prepare(tiny_cfg(out))
    return out


def _stage(prepared: Path, name: str) -> Path:
    out = prepared.parent / f"{prepared.name}-{name}"
    out.mkdir(exist_ok=True)
    if not (out / "data").exists():
        (out / "data").symlink_to(prepared / "data")
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _steps(stage_dir: Path) -> list[dict]:
    return [r for r in _jsonl(stage_dir / "metrics.jsonl") if "loss" in r and "final" not in r]


def _anchors(stage_dir: Path, rank: int) -> dict[tuple[int, int], dict]:
    """(epoch, micro-batch index) -> the last record of the anchors that micro-batch trained with."""
    return {(r["epoch"], r["index"]): r for r in _jsonl(stage_dir / "workers" / f"anchors_rank{rank}.jsonl")}


def _kill_when(path_fn, ready, on_kill: dict, timeout: float = 900) -> threading.Thread:
    """A thread that SIGKILLs the pid ``path_fn()`` names once ``ready()`` holds (a real process death)."""

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                pid = path_fn()
                os.kill(pid, signal.SIGKILL)
                on_kill.update(pid=pid, at=time.time())
                return
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _greedy_reference(cfg, rows):
    """Greedy anchors of the initial policy, sampled in this process (the tiny model is built from its seed)."""
    from pipeline.models import build_model, build_tokenizer
    from pipeline.train.anchors import anchor_seed, policy_generate, sample_anchors

    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, len(tok), seed=cfg.seed).eval()
    return sample_anchors(cfg, policy_generate(model, tok), tok, rows, seed=anchor_seed(cfg, 0))[0]


def test_step_anchors_are_the_policy_after_the_previous_step(prepared):
    """sync_every=1, max_staleness=0, greedy: the anchors each micro-batch of step t trained with (both ranks)
    equal those the trainer itself sampled from its policy after step t-1 (train.anchors=online, same data
    order), and so do the losses; step 0's equal the initial policy's greedy output computed here; and a
    generation actor SIGKILLed mid-run is replaced, its batches regenerated identically."""
    import pyarrow.parquet as pq

    from pipeline.batching import rows_from_columns
    from pipeline.train.inputs import train

    common = ["train.max_steps=6", "train.save_every=0", "generation.temperature=0"]
    online_dir = _stage(prepared, "online")
    online = tiny_cfg(online_dir, *common, "train.anchors=online")
    train(online, force=True)
    steps_dir = _stage(prepared, "steps")
    cfg = tiny_cfg(steps_dir, *common, "generation.sync=steps", "generation.sync_every=1", "generation.max_staleness=0")
    workers = steps_dir / "train" / "workers"
    killed: dict = {}
    thread = _kill_when(
        lambda: _jsonl(workers / "anchor_actor0.jsonl")[-1]["pid"],
        lambda: max((r["step"] for r in _steps(steps_dir / "train")), default=0) >= 2,
        killed,
    )
    summary = train(cfg, force=True)
    thread.join(timeout=5)
    assert killed, "the generation actor was never killed"
    assert summary["steps"] == 6
    assert [r["pid"] for r in _jsonl(workers / "anchor_actor0.jsonl")][0] == killed["pid"]
    assert len(_jsonl(workers / "anchor_actor0.jsonl")) == 2  # replaced once
    records = _steps(steps_dir / "train")
    assert [r["step"] for r in records] == list(range(1, 7))  # no step lost or repeated
    assert records[-1]["anchors/actor_restarts"] == 1.0
    assert all(r["anchors/staleness_max"] == 0.0 for r in records)
    for rank in (0, 1):
        mine, reference = _anchors(steps_dir / "train", rank), _anchors(online_dir / "train", rank)
        assert sorted(mine) == sorted(reference) and len(mine) == 6
        for key, rec in mine.items():
            assert rec["version"] == rec["step"] and rec["anchor_ids"] == reference[key]["anchor_ids"], key
    for mine, ref in zip(records, _steps(online_dir / "train"), strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5), mine["step"]
    # step 0 against the initial policy, sampled in this process from the rows the worker logged
    table = pq.read_table(prepared / "data" / "train").to_pydict()
    by_id = {str(r["row_id"]): r for r in rows_from_columns(table)}
    first = _jsonl(workers / "rows_rank0.jsonl")[0]
    assert first["index"] == 0
    assert _anchors(steps_dir / "train", 0)[(0, 0)]["anchor_ids"] == _greedy_reference(
        cfg, [by_id[i] for i in first["row_ids"]]
    )
    last = _anchors(steps_dir / "train", 0)[(0, 5)]  # trained policy != initial policy: anchors moved
    rows = [by_id[i] for i in _jsonl(workers / "rows_rank0.jsonl")[5]["row_ids"]]
    assert last["anchor_ids"] != _greedy_reference(cfg, rows)


def test_killed_train_worker_resumes_with_anchors_from_restored_weights(prepared):
    """Rank 0 is SIGKILLed after a registered checkpoint: the run resumes there with a new generation pool
    whose first weights are the restored ones, and every step run twice had the same rows, anchors and loss.
    sync_every=2, max_staleness=2 (checkpoints every 4): every logged staleness is in 0..2, each micro-batch
    used the version the rule names, each sync's weights differ from the last, and a version published again
    after the restart has the very weights it had before."""
    from pipeline.generation.sync_pool import anchor_version
    from pipeline.train.inputs import train

    out = _stage(prepared, "resume")
    cfg = tiny_cfg(out, "train.max_steps=10", "train.save_every=4", "train.max_failures=2", "generation.sync=steps",
                   "generation.sync_every=2", "generation.max_staleness=2", "generation.temperature=1.0")  # fmt: skip
    train_dir = out / "train"

    def ready():
        snapshot = train_dir / "ray" / "preference" / "checkpoint_manager_snapshot.json"
        registered = snapshot.exists() and json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        return bool(registered) and max((r["step"] for r in _steps(train_dir)), default=0) >= 5

    killed: dict = {}
    thread = _kill_when(lambda: json.loads((train_dir / "workers" / "rank0.json").read_text())["pid"], ready, killed)
    summary = train(cfg, force=True)
    thread.join(timeout=5)
    assert killed and summary["steps"] == 10 and summary["restarts"] == 1
    resumed = summary["resumed_from_step"]
    assert resumed in (4, 8)
    syncs = [s["version"] for s in _jsonl(train_dir / "workers" / "anchor_syncs.jsonl")]
    restart = [i for i in range(1, len(syncs)) if syncs[i] <= syncs[i - 1]]
    assert len(restart) == 1 and syncs[restart[0]] == resumed  # the new pool started from the restored weights
    assert len(_jsonl(train_dir / "workers" / "anchor_actor0.jsonl")) == 2
    records = _steps(train_dir)
    first = {}
    for rec in records:
        if rec["step"] in first:  # run twice: same batch, same anchors, same weights -> same loss
            assert rec["loss"] == pytest.approx(first[rec["step"]]["loss"], abs=1e-5), rec["step"]
        first.setdefault(rec["step"], rec)
    assert sorted(first) == list(range(1, 11))
    for rank in (0, 1):
        seen: dict = {}
        for rec in _jsonl(train_dir / "workers" / f"anchors_rank{rank}.jsonl"):
            key = (rec["epoch"], rec["index"])
            assert seen.setdefault(key, rec) == rec, key  # a micro-batch redone got the very same anchors
        assert any(r["step"] == resumed and r["version"] == resumed for r in seen.values())
        for rec in seen.values():
            assert rec["version"] == anchor_version(rec["step"], sync_every=2, max_staleness=2, save_every=4)
    assert all(0 <= r["anchors/staleness_mean"] <= r["anchors/staleness_max"] <= 2 for r in records)
    assert max(r["anchors/staleness_max"] for r in records) == 2
    crc: dict[int, int] = {}
    for sync in _jsonl(train_dir / "workers" / "anchor_syncs.jsonl"):
        assert crc.setdefault(sync["version"], sync["crc32"]) == sync["crc32"], sync  # restored = saved weights
    assert len(set(crc.values())) == len(crc)  # the weights really changed between syncs
    # 10 steps of 16 rows span two epochs of the train split, each in its seeded order, the redone micro-batches
    # with the very rows they had before the kill
    _assert_data_order(prepared, train_dir, micro=8, world=2, epochs=2)
