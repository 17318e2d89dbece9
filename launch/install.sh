#!/usr/bin/env bash
# Set up this machine for sdca_dist: a virtual environment at .venv/ in the repository root.
#   bash launch/install.sh          # the package and its runtime dependencies
#   bash launch/install.sh --dev    # + test tools (pytest)
# On a machine without an NVIDIA GPU, torch==2.13.0 (CPU build) is installed first so that the
# project's torch range does not pull a multi-GB CUDA build. GPU clusters bring their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip 2>&1 | grep -v -i "warning" || true
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: GPU found; installing the project's torch range (CUDA build)"
  else
    echo "install: no GPU; installing torch==2.13.0 (CPU build) first"
    $py -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
    $py -c "import torch" || { echo "install: torch==2.13.0 failed to install" >&2; exit 1; }
  fi
fi
$py -m pip install -q -e ".${extra}" 2>&1 | grep -v -e "is ignored" -e "BuildBackendWarning" -e "^ *$" || true
$py -c "import sdca_dist, nvidia.dali, deepspeed, submitit, hydra" 2>/dev/null \
  || { echo "install: the project did not install cleanly (see pip output above)" >&2; exit 1; }
echo "install: ready ($($py -c 'import torch; print("torch", torch.__version__)'))"
