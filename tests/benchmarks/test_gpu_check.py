"""``scripts/gpu_check.py`` on CPU with its tiny model: the same code the GPU run uses, in a few seconds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"
STEP_KEYS = {"dpo", "weights", "full", "dpo+gc", "weights+gc", "full+gc", "weights_separate+gc", "reference"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_results(gpu_check, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    args = ["--tiny", "--device", "cpu", "--repeats", "2", "--steps", "1", "--warmup", "1", "--threads", "1"]
    args += ["--out", str(out)]
    returned = gpu_check.main(args)
    written = json.loads(out.read_text())
    assert written["measurements"].keys() == returned["measurements"].keys()
    return written


def test_imports_only_torch_transformers_and_tidpo() -> None:
    """The GPU machine has no Ray, vLLM or DeepSpeed: importing the script must not load them (nor pipeline)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "bad = {'ray', 'vllm', 'deepspeed', 'mlflow', 'pipeline', 'evaluation', 'peft'} & "
        "{m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_structure_and_sane_values(gpu_check, tiny_results: dict) -> None:
    m = tiny_results["measurements"]
    assert set(m) == {"token_logps", "train_step", "attribution"}
    assert not [k for k, v in m.items() if "error" in v], m
    assert {"torch", "transformers", "device", "cpus"} <= tiny_results["environment"].keys()

    step = m["train_step"]
    assert set(step["step_s"]) == STEP_KEYS and set(step["memory"]) == STEP_KEYS
    assert step["model"]["parameters"] > 0 and step["model"]["dtype"] == "bfloat16"
    assert all(v > 0 for v in step["step_s"].values())
    assert all(v > 0 for v in step["tokens_per_s"].values())
    assert set(step["ratio_vs_dpo"]) == STEP_KEYS - {"dpo"} and all(r > 0 for r in step["ratio_vs_dpo"].values())
    assert all(torch.isfinite(torch.tensor(v)) for v in step["first_loss"].values())
    mem = {k: v["fwd_bwd_peak_extra_mib"] for k, v in step["memory"].items()}
    assert all(v > 0 for v in mem.values())
    assert mem["full"] > mem["dpo"]  # the anchor forward keeps its activations too
    assert mem["full+gc"] < mem["full"]  # gradient checkpointing drops the layers' activations
    # ZeRO-3's separate attribution pass runs in eval mode, where transformers skips checkpointing
    assert mem["weights_separate+gc"] > mem["weights+gc"]

    logps = m["token_logps"]
    assert set(logps["results"]) == {"fwd/chunked", "fwd/naive", "fwdbwd/chunked", "fwdbwd/naive"}
    for mode in ("fwd", "fwdbwd"):
        assert 0 < logps["chunked_over_naive"][mode]["peak"] <= 1.0  # never more than the naive float32 copy
    # Both evaluate in float32 from the same bf16 logits: |log p| <= ~log V + 10, so a few float32 ulps of that.
    assert logps["max_abs_diff"] < 8 * 2.0**-23 * 32

    attr = m["attribution"]
    spec, (_, tokens) = gpu_check.TINY, gpu_check.SHAPES["tiny"]["attr"]
    assert attr["fp32_tolerance"] == pytest.approx(gpu_check.fp32_tolerance(spec, tokens))
    assert attr["float32"]["scores"]["normwise_rel"] < attr["fp32_tolerance"]
    assert attr["float32_within_tolerance"] is True
    # Weights have mean 1 over the response: the float32 error is far below one bf16 step (2**-8).
    assert attr["float32"]["weights_max_abs"] < 2.0**-8
    # bf16 carries 8 significant bits: its error is larger than float32's, and below 10% of the scale.
    assert attr["float32"]["scores"]["normwise_rel"] < attr["bfloat16"]["scores"]["normwise_rel"] < 0.1


def test_loss_is_the_pipeline_step_loss(gpu_check) -> None:
    """What the check times is ``pipeline.train.step.preference_step``'s loss, for every variant."""
    from pipeline.train.step import StepModels, preference_step

    cpu = torch.device("cpu")
    model = gpu_check.build_model(gpu_check.TINY, cpu, torch.float32)
    batch = gpu_check.make_batch(gpu_check.TINY["vocab_size"], 3, 10, 12, cpu, seed=3)
    for name, cfg in gpu_check.VARIANTS.items():
        for shared in (True, False):
            ours = gpu_check.preference_objective(cfg, model, batch, shared_attribution=shared).loss
            theirs = preference_step(cfg, StepModels(policy=model, shared_attribution=shared), batch).loss
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"{name} shared={shared}")


def test_a_failing_measurement_is_recorded_and_the_rest_run(gpu_check, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "measure_token_logps", broken)
    out = tmp_path / "gpu.json"
    args = ["--tiny", "--device", "cpu", "--only", "token_logps", "attribution", "--threads", "1"]
    gpu_check.main([*args, "--out", str(out)])
    m = json.loads(out.read_text())["measurements"]
    assert m["token_logps"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "error" not in m["attribution"] and m["attribution"]["float32_within_tolerance"]


def test_time_budget_skips_what_does_not_fit(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    gpu_check.main(["--tiny", "--device", "cpu", "--budget-s", "0", "--out", str(out)])
    m = json.loads(out.read_text())["measurements"]
    assert all(v["error"] == "skipped: time budget spent" for v in m.values()) and len(m) == 3
