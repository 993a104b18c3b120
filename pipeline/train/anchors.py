"""Anchors made from the current policy during training: the row logic shared by both ways of doing it.

``train.anchors=online`` (the authors' behaviour): :func:`online_anchor_pack` samples inside the step with the
very policy being updated (exact, but a generate call on the critical path of every micro-batch).
``generation.sync=steps``: generation actors run the same :func:`sample_anchors` on weights the trainer
publishes (:mod:`pipeline.generation.sync_pool`), ahead of the step; the worker packs what they return with
:func:`anchor_pack`.

The context follows ``loss.anchor_context`` (prompt alone, or prompt + the chosen response's first tokens,
which are then part of the anchor so it aligns position by position with the chosen and rejected responses).
A row's sample is seeded by (:func:`anchor_seed` of the optimizer step, its ``row_id``): the same row at the
same step gets the same anchor in either mode, in any batch, on any actor, after any restart.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.batching import pack_sequences
from pipeline.config import RunConfig


def sample_anchors(cfg: RunConfig, generate, tokenizer, rows: Sequence[dict[str, Any]], *,
                   seed: int) -> tuple[list[list[int]], int]:  # fmt: skip
    """(anchor token ids per row: copied prefix + sampled continuation, sampled token count).

    ``generate(contexts, params, row_keys=...)`` returns one :class:`~pipeline.generation.engine.Generation` list
    per context: an engine's ``generate`` or :func:`policy_generate` of an in-memory model.
    """
    from pipeline.generation.anchor_udf import anchor_context
    from pipeline.generation.engine import SamplingParams, stop_token_ids

    g = cfg.generation
    contexts, prefixes = zip(
        *(
            anchor_context(
                [int(t) for t in r["prompt_ids"]],
                [int(t) for t in r["chosen_ids"]],
                cfg.loss.anchor_context,
                cfg.loss.anchor_prefix_tokens,
            )  # fmt: skip
            for r in rows
        )
    )
    params = SamplingParams.from_config(g, stop_token_ids(tokenizer, g.stop), seed=seed, n=1)
    gens = [samples[0] for samples in generate(list(contexts), params, row_keys=[str(r["row_id"]) for r in rows])]
    anchors = [list(prefix) + list(gen.token_ids) for prefix, gen in zip(prefixes, gens)]
    return anchors, sum(len(gen.token_ids) for gen in gens)


def policy_generate(model: torch.nn.Module, tokenizer):
    """The ``generate`` of :func:`sample_anchors` for an in-memory model (no gradient through sampling)."""
    from pipeline.generation.hf_engine import sample_responses

    def generate(contexts, params, *, row_keys):
        with torch.no_grad():
            return [[gen] for gen in sample_responses(model, tokenizer, contexts, params, row_keys=row_keys)]

    return generate


def anchor_seed(cfg: RunConfig, step: int) -> int:
    """The sampling seed of the anchors of optimizer step ``step`` (0-based), whichever side samples them."""
    return cfg.generation.seed + step


def anchor_pack(rows: Sequence[dict[str, Any]], anchors: Sequence[Sequence[int]], pad_id: int):
    """Prompt + anchor of each row, packed for the step (the ``batch["anchor"]`` of the loss)."""
    prompts = [[int(t) for t in r["prompt_ids"]] for r in rows]
    return pack_sequences(prompts, [list(a) for a in anchors], pad_id)


def online_anchor_pack(
    cfg: RunConfig, model: torch.nn.Module, tokenizer, rows: Sequence[dict[str, Any]], *, seed: int
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Sample one anchor per row with the policy itself (no gradient through sampling): (pack, anchors)."""
    anchors, _ = sample_anchors(cfg, policy_generate(model, tokenizer), tokenizer, rows, seed=seed)
    return anchor_pack(rows, anchors, tokenizer.pad_token_id), anchors


class StepAnchors:
    """The worker's hook for ``generation.sync=steps`` (every rank; rank 0 holds the :class:`AnchorPool`).

    ``attach`` (every micro-batch): this rank's anchors for the micro-batch at (epoch, index), from the weights
    :func:`anchor_version` names for the step; on the first micro-batch of a step rank 0 collects the step's
    anchors of every rank (the trainer waits here, ``anchors/wait_s``), broadcasts them, and submits the next
    step's requests so they are generated while this step trains. ``after_step``: rank 0 publishes the weights
    at sync points. ``metrics``: the anchor figures since the last log, reduced over ranks (collective).
    """

    def __init__(self, cfg: RunConfig, plan, table, module: torch.nn.Module, *, start_step: int):
        import torch.distributed as dist

        from pipeline.generation.sync_pool import AnchorPool
        from pipeline.train.worker import micro_batches_per_epoch

        tc, a = cfg.train, plan.anchors
        self.cfg, self.plan, self.table = cfg, plan, table
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.micro, self.accum = tc.micro_batch_size, tc.grad_accum
        self.total = micro_batches_per_epoch(table.num_rows, micro=self.micro, accum=self.accum, world=self.world)
        self.rule = {"sync_every": a.sync_every, "max_staleness": a.max_staleness, "save_every": tc.save_every}
        self.ready: dict[tuple[int, int], dict] = {}
        self.deferred: list[dict] = []
        self.stale: list[int] = []
        self.wait_s, self.tokens, self.gen_s, self.regenerated = 0.0, 0, 0.0, 0
        self.pool = AnchorPool(cfg, plan, plan.stage_dir / "workers") if self.rank == 0 else None
        self.checksum, self.latest = 0, start_step
        self._publish(module, start_step)

    def version(self, step: int) -> int:
        from pipeline.generation.sync_pool import anchor_version

        return anchor_version(step, **self.rule)

    def attach(self, rows, epoch: int, index: int, step: int, pad_id: int):
        """(pack, anchors, weights version) of this rank's micro-batch ``rows`` at (epoch, index)."""
        result = self.ready.get((epoch, index))
        if result is None or result["version"] != self.version(step):  # same on every rank: a collective
            self._fetch(epoch, index, step)
            result = self.ready[(epoch, index)]
        del self.ready[(epoch, index)]
        ids = [str(r["row_id"]) for r in rows]
        if result["row_ids"] != ids:
            raise RuntimeError(f"anchors for micro-batch {(epoch, index)} of rank {self.rank} belong to rows "
                               f"{result['row_ids'][:3]}..., the pairs are {ids[:3]}...")  # fmt: skip
        self.stale.append(step - result["version"])
        return anchor_pack(rows, result["anchors"], pad_id), result["anchors"], result["version"]

    def after_step(self, step: int, module: torch.nn.Module) -> None:
        """``step`` optimizer steps are done: publish at a sync point (rank 0), then submit what waited for it."""
        from pipeline.generation.sync_pool import is_sync_point

        if self.pool is None or step >= self.plan.max_steps or not is_sync_point(step, **_sync(self.rule)):
            return
        self._publish(module, step)
        waiting, self.deferred = self.deferred, []
        for request in waiting:
            self._submit(request)

    def _publish(self, module: torch.nn.Module, version: int) -> None:
        if self.pool is None:
            return
        from pipeline.generation.sync_pool import policy_weights

        named = policy_weights(module, self.plan.anchors.weights)
        self.checksum, self.latest = self.pool.publish(named, version), version

    def _submit(self, request: dict) -> None:
        if request["version"] in self.pool.published:
            self.pool.submit(request)
        else:
            self.deferred.append(request)  # published after the step that produces it

    def _positions(self, epoch: int, index: int) -> list[tuple[int, int]]:
        return [(epoch, j) for j in range(index, min(index + self.accum, self.total))]

    def _next(self, epoch: int, index: int) -> tuple[int, int]:
        return (epoch, index + self.accum) if index + self.accum < self.total else (epoch + 1, 0)

    def _requests(self, step: int, epoch: int, index: int) -> list[dict]:
        from pipeline.batching import rows_from_columns
        from pipeline.train.worker import epoch_order, micro_batch_rows

        order = epoch_order(self.table.num_rows, self.plan.seed, epoch)
        columns = self.table.select(["row_id", "prompt_ids", "chosen_ids"])
        out = []
        for _, j in self._positions(epoch, index):
            for r in range(self.world):
                positions = micro_batch_rows(order, j, micro=self.micro, accum=self.accum, world=self.world, rank=r)
                rows = rows_from_columns(columns.take(positions).to_pydict())
                out.append({"key": (epoch, j, r), "slot": j * self.world + r, "rows": rows, "step": step,
                            "version": self.version(step), "seed": anchor_seed(self.cfg, step)})  # fmt: skip
        return out

    def _fetch(self, epoch: int, index: int, step: int) -> None:
        import torch.distributed as dist

        start = time.perf_counter()
        results = None
        if self.pool is not None:
            keys = []
            for request in self._requests(step, epoch, index):
                keys.append(request["key"])
                held = self.pool.pending.get(request["key"])
                if held is None or (held[1]["version"], held[1]["seed"]) != (request["version"], request["seed"]):
                    self.regenerated += held is not None
                    self.pool.submit(request)
            self.deferred = [r for r in self.deferred if r["key"] not in keys]  # submitted just now instead
            results = self.pool.take(keys)
            self.tokens += sum(r["tokens"] for r in results)
            self.gen_s += sum(r["seconds"] for r in results)
            self.pool.prune(self.version(step))
            if step + 1 < self.plan.max_steps:  # the next step's anchors, generated while this one trains
                for request in self._requests(step + 1, *self._next(epoch, index)):
                    self._submit(request)
        if self.world > 1:
            box = [results]
            dist.broadcast_object_list(box, src=0)
            results = box[0]
        self.ready.update({(e, j): res for res in results for e, j, r in [res["key"]] if r == self.rank})
        self.wait_s += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """Anchor figures since the last call, over all ranks (every rank calls it at the same step)."""
        import torch.distributed as dist

        sums = torch.tensor([sum(self.stale), len(self.stale), self.tokens, self.gen_s], dtype=torch.float64)
        maxes = torch.tensor([max(self.stale, default=0), self.wait_s], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        out = {"anchors/staleness_mean": float(sums[0] / max(1.0, float(sums[1]))),
               "anchors/staleness_max": float(maxes[0]), "anchors/wait_s": float(maxes[1])}  # fmt: skip
        if self.pool is not None:  # rank 0 logs: the pool's own figures
            loads = self.pool.load_s
            out.update({"anchors/engine_tokens_per_s": float(sums[2] / max(float(sums[3]), 1e-9)),
                        "anchors/weights_version": float(self.latest), "anchors/weights_crc32": float(self.checksum),
                        "anchors/load_s": sum(loads) / len(loads) if loads else 0.0,
                        "anchors/actor_restarts": float(self.pool.restarts),
                        "anchors/regenerated": float(self.regenerated)})  # fmt: skip
            self.pool.load_s = []
        self.stale, self.wait_s, self.tokens, self.gen_s = [], 0.0, 0, 0.0
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _sync(rule: dict) -> dict:
    return {"sync_every": rule["sync_every"], "save_every": rule["save_every"]}
