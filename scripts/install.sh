#!/usr/bin/env bash
# Install the project and its dependencies into the current Python (no venv needed).
#   bash scripts/install.sh          # core + dev/test extras
#   EXTRAS=vllm bash scripts/install.sh   # on a GPU cluster, with the vLLM engine
# torch is installed FIRST and kept as a constraint: a free torch pulls gigabytes of CUDA wheels on CPU
# machines. On a machine with an NVIDIA GPU the CUDA build of the same version is installed instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
EXTRAS=${EXTRAS:-dev}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# bubblewrap: the sandbox HumanEval runs model-written code in (evaluation refuses without it unless
# eval.sandbox=unsafe-local). Installed with apt where this runs as root; otherwise say how.
if ! command -v bwrap >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)) \
      && echo "installed bubblewrap ($(bwrap --version))" \
      || echo "WARNING: could not install bubblewrap with apt; HumanEval will refuse to run code" >&2
  else
    echo "NOTE: bubblewrap (bwrap) is missing: HumanEval evaluation refuses to run model-written code without it." >&2
    echo "      Install it as root: apt-get install bubblewrap (Debian/Ubuntu), dnf install bubblewrap (Fedora)," >&2
    echo "      or set eval.sandbox=unsafe-local to run that code unisolated." >&2
  fi
fi
current=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)

if have_gpu; then
  # PyPI's Linux wheel of torch is the CUDA build; ignore any local CPU wheel folder.
  if [[ "$current" != "$TORCH_VERSION" && "$current" != "$TORCH_VERSION+cu"* ]]; then
    PIP_FIND_LINKS= pip_install "torch==$TORCH_VERSION"
  fi
elif [[ "$current" != "$TORCH_VERSION+cpu" ]]; then
  # A local CPU wheel (pip's find-links) wins when present; otherwise PyTorch's CPU index.
  pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || pip_install "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
# PIP_CONSTRAINT also reaches the build environments of sdists (deepspeed builds against torch).
export PIP_CONSTRAINT="$constraints"
pip_install -e ".[$EXTRAS]"
"$PY" -c 'import torch; print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")'
