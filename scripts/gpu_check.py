"""GPU check: step cost of DPO vs TI-DPO, ``token_logps`` memory and attribution accuracy on one accelerator.

    python scripts/gpu_check.py                       # ~1B Llama on CUDA, bf16; writes benchmarks/results/gpu.json
    python scripts/gpu_check.py --tiny --device cpu   # the same code on a tiny model (the test runs this)

Runs on a machine with torch and transformers only: it imports torch, transformers (the Llama class, built from
a config with random weights: nothing is downloaded), the standard library and ``tidpo`` (pure torch). No Ray,
vLLM, DeepSpeed or network. Each measurement runs in its own try block (a failure is recorded as an error
string, the others still run), the JSON is rewritten after each one, and a global time budget (``--budget-s``)
skips or shortens what no longer fits.

Measurements (``measurements`` in the JSON):

- ``train_step``: one step = the loss as ``pipeline.train.step.preference_step`` composes it from ``tidpo``
  (the shared-forward attribution, precomputed reference log-probs, anchors for the triplet) + backward +
  AdamW on float32 master weights of the ``--dtype`` model (DeepSpeed's bf16 mixed precision: bf16 weights
  and gradients, fp32 master and Adam states, 16 bytes per parameter). Variants ``dpo`` (preset dpo),
  ``weights`` (paper, gamma 0) and ``full`` (paper: weights + triplet), with and without gradient
  checkpointing; ``weights_separate+gc``, the ZeRO-3 path (``tidpo.attribution_scores`` in its own pass, in eval
  mode, so without checkpointing, then the training forward); ``reference`` (a no-grad forward +
  ``token_logps``: the cost of precomputing reference log-probs). Median seconds per step over rotated,
  interleaved repeats; tokens/s of the pair batch; peak memory of the forward + backward above what the weights
  and optimizer states hold (it includes the gradients).
  A test checks that this loss equals ``preference_step``'s.
- ``token_logps``: extra peak memory and time of ``tidpo.token_logps`` against the naive
  ``logits.float().log_softmax(-1).gather(...)`` on bf16 ``logits[:, :-1]`` (as the step slices them), forward
  only and forward + backward, at the Llama-3 vocabulary (128,256).
- ``attribution``: ``tidpo.attribution_scores`` on the device (float32, and the training dtype) against a
  float64 CPU computation with the same weights and tokens: max abs / relative error of the scores and of the
  TI-DPO weights (``hybrid_weights``, mean 1) built from them; the float32 error against a tolerance derived
  from float32's unit roundoff (see ``fp32_tolerance``).

Peak memory comes from the CUDA allocator (``max_memory_allocated``) on CUDA, and on CPU from ``LiveBytes`` (storages
allocated inside the measured block and still alive).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tidpo import (  # noqa: E402
    LossConfig,
    Side,
    attribution_scores,
    call_model,
    forward_with_attribution,
    hybrid_weights,
    tidpo_objective,
)
from tidpo.logps import token_logps  # noqa: E402

MIB = 2**20
# Llama-3.2-1B's shape (random weights): 1,235,814,400 parameters with tied embeddings.
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
# Batch shapes: pairs per step (2 x pairs sequences in the pair forward), max prompt / response tokens,
# token_logps (B, T, V), attribution rows x tokens.
SHAPES = {
    "1b": {"pairs": 4, "prompt": 256, "response": 256, "logps": (4, 512, 128256), "attr": (2, 128)},
    "tiny": {"pairs": 2, "prompt": 12, "response": 12, "logps": (2, 64, 4096), "attr": (3, 24)},
}
JOBS = ("token_logps", "train_step", "attribution")  # in the order they run
VARIANTS = {
    "dpo": LossConfig.from_preset("dpo"),
    "weights": LossConfig.from_preset("paper", gamma=0.0),
    "full": LossConfig.from_preset("paper"),
}


class Budget:
    """Seconds left before the global deadline."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the block and still alive (the CPU stand-in for the CUDA
    allocator's statistics): every op whose schema returns a fresh tensor (no alias of an input) allocates its
    output's storage, which counts until garbage-collected; views and in-place results allocate nothing."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.now, self.peak, self.seen = device, 0, 0, weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if t.device != self.device or st in self.seen:
            return
        self.seen.add(st)
        weakref.finalize(st, self._free, st.nbytes())
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out


class PeakMeter:
    """Extra peak memory (MiB) of the block above what was allocated when it started."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.extra_mib, self.total_mib = device, None, None

    def __enter__(self) -> PeakMeter:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.tracker = LiveBytes(self.device)
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.extra_mib, self.total_mib = round((peak - self.base) / MIB, 1), round(peak / MIB, 1)
        else:
            self.tracker.__exit__(*exc)
            self.extra_mib = round(self.tracker.peak / MIB, 3)


def build_model(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Llama with random weights from ``spec`` (no download), dropout off, in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**spec, attention_dropout=0.0, use_cache=False)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


def make_batch(vocab: int, pairs: int, prompt: int, response: int, device: torch.device, seed: int = 0) -> dict:
    """A ``pipeline.batching.collate_pairs``-shaped batch of random ids: ``pair`` (chosen then rejected, right
    padded, lengths in [max/2, max]), ``anchor`` (prompt + anchor response) and reference log-probs."""
    gen = torch.Generator().manual_seed(seed)

    def lengths(n: int, top: int) -> list[int]:
        return torch.randint(max(1, top // 2), top + 1, (n,), generator=gen).tolist()

    def pack(prompts: list[torch.Tensor], responses: list[int]) -> dict[str, torch.Tensor]:
        seqs = [torch.cat([p, torch.randint(3, vocab, (r,), generator=gen)]) for p, r in zip(prompts, responses)]
        width = max(len(s) for s in seqs)
        n = len(seqs)
        ids, attention = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
        resp = torch.zeros(n, width - 1, dtype=torch.bool)
        for i, (s, p) in enumerate(zip(seqs, prompts)):
            ids[i, : len(s)], attention[i, : len(s)] = s, 1
            resp[i, len(p) - 1 : len(s) - 1] = True  # label j is token j + 1
        ref = torch.where(resp, -torch.rand(n, width - 1, generator=gen) * 6, torch.zeros(()))
        out = {"input_ids": ids, "attention_mask": attention, "response_mask": resp, "span_mask": attention[:, 1:]}
        out["span_mask"], out["ref_token_logps"] = out["span_mask"].bool(), ref
        return {k: v.to(device) for k, v in out.items()}

    prompts = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths(pairs, prompt)]
    pair = pack(prompts + prompts, lengths(2 * pairs, response))
    return {"pair": pair, "num_pairs": pairs, "anchor": pack(prompts, lengths(pairs, response))}


def _logits(model, pack: dict[str, torch.Tensor]) -> torch.Tensor:
    return call_model(model, model.get_input_embeddings()(pack["input_ids"]), pack["attention_mask"])


def preference_objective(cfg: LossConfig, model, batch: dict, *, shared_attribution: bool = True):
    """The loss of one micro-batch as ``pipeline.train.step.preference_step`` composes it (attribution from the
    shared forward, or its own pass as under ZeRO-3; precomputed reference log-probs; triplet anchors)."""
    pair, B = batch["pair"], batch["num_pairs"]
    ids, attention, ref = pair["input_ids"], pair["attention_mask"], pair["ref_token_logps"]
    kwargs = {"ref_chosen_token_logps": ref[:B], "ref_rejected_token_logps": ref[B:]}
    if cfg.weighting == "attribution" and shared_attribution:
        logits, scores = forward_with_attribution(model, ids, attention)  # one forward, shared graph
    elif cfg.weighting == "attribution":
        scores = attribution_scores(model, ids, attention)  # its own pass, in eval mode
        logits = _logits(model, pair)
    else:
        logits, scores = _logits(model, pair), None
    if scores is not None:
        kwargs["chosen_scores"], kwargs["rejected_scores"] = scores[:B, 1:], scores[B:, 1:]
    policy = token_logps(logits[:, :-1], ids[:, 1:])
    if cfg.uses_triplet:
        anchor = batch["anchor"]
        kwargs["policy_anchor_token_logps"] = token_logps(_logits(model, anchor)[:, :-1], anchor["input_ids"][:, 1:])
        kwargs["ref_anchor_token_logps"], kwargs["anchor_mask"] = anchor["ref_token_logps"], anchor["response_mask"]
    mask, get = pair["response_mask"], kwargs.get
    chosen = Side(policy[:B], mask[:B], get("ref_chosen_token_logps"), get("chosen_scores"))
    rejected = Side(policy[B:], mask[B:], get("ref_rejected_token_logps"), get("rejected_scores"))
    anchor = None
    if cfg.uses_triplet:
        anchor = Side(kwargs["policy_anchor_token_logps"], kwargs["anchor_mask"], kwargs["ref_anchor_token_logps"])
    return tidpo_objective(cfg, chosen, rejected, anchor)


class MasterAdamW:
    """AdamW on float32 master copies of the model's parameters, copied back after each step: the memory and
    work of DeepSpeed's bf16 mixed precision (ZeRO-0 on one GPU) without DeepSpeed."""

    def __init__(self, params, lr: float, device: torch.device) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(self.master, lr=lr, **fused)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)
            m.grad = None


def _forward_backward(model, opt: MasterAdamW, key: str, batch: dict) -> torch.Tensor:
    opt.zero_grad()
    name = key.removesuffix("+gc")
    cfg = VARIANTS[name.removesuffix("_separate")]
    obj = preference_objective(cfg, model, batch, shared_attribution=not name.endswith("_separate"))
    obj.loss.backward()
    return obj.loss.detach()


@torch.no_grad()
def _reference_pass(model, batch: dict) -> torch.Tensor:
    pair = batch["pair"]
    return token_logps(_logits(model, pair)[:, :-1], pair["input_ids"][:, 1:]).sum()


def measure_train_step(args, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    spec, shape = (TINY, SHAPES["tiny"]) if args.tiny else (LLAMA_1B, SHAPES["1b"])
    start = time.perf_counter()
    model = build_model(spec, device, dtype)
    opt = MasterAdamW(model.parameters(), lr=1e-6, device=device)
    batch = make_batch(spec["vocab_size"], shape["pairs"], shape["prompt"], shape["response"], device)
    build_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    pair_tokens = int(batch["pair"]["attention_mask"].sum())
    anchor_tokens = int(batch["anchor"]["attention_mask"].sum())
    # weights_separate+gc: the ZeRO-3 path (attribution in its own pass, which runs in eval mode: no checkpointing)
    keys = [f"{v}{gc}" for gc in ("", "+gc") for v in VARIANTS] + ["weights_separate+gc", "reference"]
    first_loss, memory, times = {}, {}, {k: [] for k in keys}

    def run(key: str, meter: PeakMeter | None = None) -> float:
        """One step of variant ``key``; with ``meter``, its peak memory covers the forward and backward."""
        if key.endswith("+gc") != model.is_gradient_checkpointing:
            if key.endswith("+gc"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
        with meter or contextlib.nullcontext():
            if key == "reference":
                return _reference_pass(model, batch)
            loss = _forward_backward(model, opt, key, batch)
        opt.step()
        return loss

    run("dpo")  # the optimizer states exist before any memory baseline
    opt.zero_grad()
    held_mib = round(torch.cuda.memory_allocated(device) / MIB, 1) if device.type == "cuda" else None
    for key in keys:
        for _ in range(args.warmup):
            run(key)
        opt.zero_grad()
        meter = PeakMeter(device)
        first_loss[key] = float(run(key, meter))
        memory[key] = {"fwd_bwd_peak_extra_mib": meter.extra_mib, "peak_total_mib": meter.total_mib}
    truncated = False
    for r in range(args.repeats):
        if budget.left() < args.reserve_s:
            truncated = True
            break
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotated interleaving
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run(key)
            sync(device)
            times[key].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    out = {
        "model": {**spec, "parameters": n_params, "dtype": str(dtype).removeprefix("torch.")},
        "optimizer": "torch AdamW on float32 master weights (16 bytes/parameter with bf16 weights and grads)",
        "batch": {
            "pairs": shape["pairs"],
            "pair_shape": list(batch["pair"]["input_ids"].shape),
            "anchor_shape": list(batch["anchor"]["input_ids"].shape),
            "pair_tokens": pair_tokens,
            "anchor_tokens": anchor_tokens,
        },
        "build_s": round(build_s, 2),
        "weights_and_optimizer_mib": held_mib,
        "repeats_done": min(len(v) for v in times.values()),
        "steps_per_repeat": args.steps,
        "truncated_by_budget": truncated,
        "first_loss": first_loss,
        "memory": memory,
        "step_s": {k: round(v, 5) for k, v in med.items()},
        "step_s_samples": {k: [round(x, 5) for x in v] for k, v in times.items()},
        # tokens of the pair batch per second; the anchors of `full` are extra work, not counted as throughput
        "tokens_per_s": {k: round(pair_tokens / v, 1) for k, v in med.items()},
        "model_tflops_per_s": {k: round(6 * n_params * pair_tokens / v / 1e12, 2) for k, v in med.items()},
        "ratio_vs_dpo": {k: round(v / med["dpo"], 3) for k, v in med.items() if "dpo" in med and k != "dpo"},
    }
    return out  # the model, optimizer and batch are freed with this frame


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0]


def measure_token_logps(args, device: torch.device, budget: Budget) -> dict:
    B, T, V = SHAPES["tiny" if args.tiny else "1b"]["logps"]
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(B, T + 1, V, device=device, dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, V, (B, T), device=device, generator=gen)
    impls = {"chunked": token_logps, "naive": naive_token_logps}
    rows = {}
    for mode in ("fwd", "fwdbwd"):
        for impl, fn in impls.items():
            base.requires_grad_(mode == "fwdbwd")

            def once(fn=fn, mode=mode) -> None:
                if mode == "fwdbwd":
                    fn(base[:, :-1], labels).sum().backward()
                    base.grad = None
                else:
                    with torch.no_grad():
                        fn(base[:, :-1], labels)

            once()  # warm-up: kernels and allocator
            with PeakMeter(device) as meter:
                once()
            times = []
            for _ in range(3 if budget.left() > args.reserve_s else 0):
                sync(device)
                t0 = time.perf_counter()
                once()
                sync(device)
                times.append(time.perf_counter() - t0)
            rows[f"{mode}/{impl}"] = {
                "peak_extra_mib": meter.extra_mib,
                "median_s": round(statistics.median(times), 5) if times else None,
            }
    base.requires_grad_(False)
    with torch.no_grad():
        diff = (token_logps(base[:, :-1], labels) - naive_token_logps(base[:, :-1], labels)).abs().max()
    ratios = {}
    for mode in ("fwd", "fwdbwd"):
        c, n = rows[f"{mode}/chunked"], rows[f"{mode}/naive"]
        ratios[mode] = {"peak": round(c["peak_extra_mib"] / max(n["peak_extra_mib"], 1e-9), 4)}
        if c["median_s"] and n["median_s"]:
            ratios[mode]["time"] = round(c["median_s"] / n["median_s"], 3)
    return {
        "shape": {"B": B, "T": T, "V": V, "logits": "bfloat16 logits[:, :-1] of (B, T+1, V)"},
        "logits_mib": round(B * (T + 1) * V * 2 / MIB, 1),
        "results": rows,
        "chunked_over_naive": ratios,
        "max_abs_diff": float(diff),
    }


def fp32_tolerance(spec: dict, tokens: int) -> float:
    """Bound on the normwise relative error of float32 attribution scores: n * u, u = 2**-24 (float32 unit
    roundoff) and n the summed inner-product lengths along the forward + backward chain (per layer: q/k/v/o and
    gate/up/down projections, attention over ``tokens``; then the head), the first-order worst-case bound of
    recursive summation (Higham, Accuracy and Stability of Numerical Algorithms, section 3.1)."""
    h, f, layers = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    n = 2 * (layers * (2 * h + f + tokens) + h)
    return n * 2.0**-24


def _errors(scores: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict:
    """Max abs error, normwise relative error (per row: max |d| / max |ref|) and elementwise relative error
    where the reference is above 1e-3 of its row maximum."""
    s, r = scores.double().cpu(), ref.double().cpu()
    d = (s - r).abs() * mask
    row_max = (r.abs() * mask).amax(-1, keepdim=True).clamp(min=1e-300)
    big = (r.abs() > 1e-3 * row_max) & mask.bool()
    return {
        "max_abs": float(d.max()),
        "normwise_rel": float((d.amax(-1, keepdim=True) / row_max).max()),
        "max_elementwise_rel": float((d / r.abs().clamp(min=1e-300))[big].max()),
    }


def measure_attribution(args, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    spec = TINY if args.tiny else LLAMA_1B
    rows, tokens = SHAPES["tiny" if args.tiny else "1b"]["attr"]
    cpu = torch.device("cpu")
    model = build_model(spec, cpu, torch.float32, seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, spec["vocab_size"], (rows, tokens), generator=gen)
    attention = torch.ones(rows, tokens, dtype=torch.long)
    attention[1:, tokens - tokens // 4 :] = 0  # right padding on all rows but the first
    response = torch.zeros(rows, tokens, dtype=torch.bool)
    response[:, tokens // 2 :] = True
    response &= attention.bool()
    t0 = time.perf_counter()
    ref = attribution_scores(model.double(), ids, attention)  # float64 on CPU
    ref_s = time.perf_counter() - t0
    ref_weights = hybrid_weights(ref, response, lam=0.7, sigma_div=4.0)
    out = {"rows": rows, "tokens": tokens, "float64_cpu_s": round(ref_s, 2), "fp32_tolerance": None}
    out["fp32_tolerance"] = fp32_tolerance(spec, tokens)
    for name, dt in (("float32", torch.float32), (str(dtype).removeprefix("torch."), dtype)):
        if name in out or budget.left() < args.reserve_s:
            continue
        on_device = model.to(device=device, dtype=dt)
        scores = attribution_scores(on_device, ids.to(device), attention.to(device))
        weights = hybrid_weights(scores, response.to(device), lam=0.7, sigma_div=4.0)
        out[name] = {
            "scores": _errors(scores, ref, attention),
            "weights_max_abs": float((weights.cpu().double() - ref_weights.double()).abs().max()),
        }
        model = on_device
    if "float32" in out:
        out["float32_within_tolerance"] = out["float32"]["scores"]["normwise_rel"] < out["fp32_tolerance"]
    out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    del model
    return out


def environment(device: torch.device) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "deepspeed": version("deepspeed"),  # recorded, never imported
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_mib=props.total_memory // MIB, cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama and shapes (CPU smoke test)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--only", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420.0, help="global time budget, seconds")
    parser.add_argument("--reserve-s", type=float, default=60.0, help="stop repeating with this much left")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "check": "gpu_check",
        "what": __doc__.split("\n\n")[0],
        "mode": "tiny model (smoke test of the same code)" if args.tiny else "~1B Llama (Llama-3.2-1B shape)",
        "argv": sys.argv[1:] if argv is None else argv,
        "budget_s": args.budget_s,
        "environment": environment(device),
        "measurements": {},
    }
    start = time.perf_counter()
    jobs = {
        "token_logps": lambda: measure_token_logps(args, device, budget),
        "train_step": lambda: measure_train_step(args, device, dtype, budget),
        "attribution": lambda: measure_attribution(args, device, dtype, budget),
    }
    assert set(jobs) == set(JOBS)
    for key in args.only:
        t0 = time.perf_counter()
        if budget.left() < args.reserve_s / 2:
            results["measurements"][key] = {"error": "skipped: time budget spent"}
        else:
            try:
                results["measurements"][key] = jobs[key]()
            except Exception as exc:  # recorded; the other measurements still run
                trace = traceback.format_exc().strip().splitlines()[-6:]
                results["measurements"][key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": trace}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results["measurements"][key]["seconds"] = round(time.perf_counter() - t0, 2)
        results["total_s"] = round(time.perf_counter() - start, 2)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{key}: {results['measurements'][key]['seconds']} s", flush=True)
    print_summary(results)
    print(f"wrote {out} in {results['total_s']} s")
    return results


def print_summary(results: dict) -> None:
    """A few lines a person can read: step time, tokens/s, memory per variant; the two headline ratios."""
    m = results["measurements"]
    step = m.get("train_step", {})
    for key, seconds in step.get("step_s", {}).items():
        mem = step["memory"][key]["fwd_bwd_peak_extra_mib"]
        ratio = step["ratio_vs_dpo"].get(key, 1.0)
        tokens = step["tokens_per_s"][key]
        print(f"{key:<20}{seconds * 1e3:>10.1f} ms {tokens:>12.0f} tok/s {ratio:>6.2f}x {mem:>10} MiB")
    if "chunked_over_naive" in m.get("token_logps", {}):
        print(f"token_logps peak chunked/naive: {m['token_logps']['chunked_over_naive']}")
    if "float32" in m.get("attribution", {}):
        print(f"attribution float32 normwise rel error {m['attribution']['float32']['scores']['normwise_rel']:.2e}")
    print("errors:", {k: v["error"] for k, v in m.items() if "error" in v} or "none")


if __name__ == "__main__":
    main()
