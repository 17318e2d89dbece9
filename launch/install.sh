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
log=.venv/install.log
: > "$log"
pipq() {  # pip, quiet; its full output goes to .venv/install.log and is shown only on failure
  if ! $py -m pip install -q "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install: pip install $* failed (full log: $log)" >&2
    exit 1
  fi
}
pipq --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: GPU found; installing the project's torch range (CUDA build)"
  else
    echo "install: no GPU; installing torch==2.13.0 (CPU build) first"
    pipq torch==2.13.0
  fi
fi
pipq -e ".${extra}"
$py -c "import sdca_dist, nvidia.dali, deepspeed, submitit, hydra" >>"$log" 2>&1 \
  || { echo "install: the project does not import cleanly (see $log)" >&2; exit 1; }
echo "install: ready ($($py -c 'import torch; print("torch", torch.__version__)'))"
