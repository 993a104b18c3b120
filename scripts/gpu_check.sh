#!/usr/bin/env bash
# The GPU check in one command (at most 8 minutes): bash scripts/gpu_check.sh [gpu_check.py flags]
# Needs torch and transformers only (no Ray, vLLM, DeepSpeed or network); writes benchmarks/results/gpu.json.
# CPU smoke run of the same code: bash scripts/gpu_check.sh --tiny --device cpu --out /tmp/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# The script's own budget is 420 s (--budget-s); the hard stop leaves it a margin and still ends within 8 min.
exec timeout --signal=TERM --kill-after=10 470 python3 scripts/gpu_check.py "$@"
