#!/usr/bin/env bash
# Set up this machine for sdca_dist: a virtual environment at .venv/ in the repository root.
#   bash launch/install.sh                         # the package and its runtime dependencies
#   bash launch/install.sh --dev                   # + test tools (pytest, ruff)
#   bash launch/install.sh --cuda 12|13            # GPU node: this CUDA build of torch
#   bash launch/install.sh --system-site-packages  # new venv that sees the cluster's own torch
# Without an NVIDIA GPU: torch==2.13.0 (CPU build) first, so the project's torch range does not
# pull a multi-GB CUDA build, and DALI's CUDA 12 package (it runs CPU-only). With a GPU: the
# torch CUDA build the driver supports (launch/torch_build.py decides, or --cuda), a CPU torch
# already in the venv is replaced, DALI for torch's CUDA version, and the script fails in one line
# if torch then cannot use the GPU. It ends by printing the torch, CUDA, NCCL and DALI versions.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
cuda=""
system=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="dev," ;;
    --cuda) cuda="${2:-}"; shift ;;
    --cuda=*) cuda="${1#*=}" ;;
    --system-site-packages) system=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install: unknown option $1 (--dev, --cuda 12|13, --system-site-packages)" >&2; exit 2 ;;
  esac
  shift
done
build() { python3 launch/torch_build.py "$@"; }
torch_version=$(build version)
driver=""
if command -v nvidia-smi >/dev/null 2>&1; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
choice=$(build torch --driver "$driver" ${cuda:+--cuda "$cuda"}) || exit 2
if [ ! -x .venv/bin/python ]; then
  if [ "$system" = 1 ]; then python3 -m venv --system-site-packages .venv; else python3 -m venv .venv; fi
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
# torch.version.cuda of the torch this venv sees ("cpu" for a CPU build, "none" without torch)
have=$($py -c "import torch; print(torch.version.cuda or 'cpu')" 2>>"$log" || echo none)
if [ "$choice" = cpu ]; then
  if [ "$have" = none ]; then
    echo "install: no GPU; installing torch==$torch_version (CPU build) first"
    pipq "torch==$torch_version"
  fi
else
  major=${choice%% *}
  index=${choice#* }
  keep=0
  if [ "$have" != none ] && [ "$have" != cpu ]; then  # a CUDA torch: keep it if the driver runs it
    if [ -z "$cuda" ] || [ "${have%%.*}" = "$cuda" ]; then
      build torch --driver "$driver" --cuda "${have%%.*}" >/dev/null 2>&1 && keep=1
    fi
  fi
  if [ "$keep" = 1 ]; then
    echo "install: GPU (driver $driver); keeping torch with CUDA $have"
  else
    echo "install: GPU (driver $driver); installing torch==$torch_version for CUDA $major from $index"
    pipq --force-reinstall "torch==$torch_version" --index-url "$index" --extra-index-url https://pypi.org/simple
  fi
fi
PYTHONWARNINGS=ignore $py - "$torch_version" <<'EOF' || exit 2
import sys, torch
floor = tuple(int(x) for x in sys.argv[1].split(".")[:2])
have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if have < floor:
    sys.exit(f"install: torch {torch.__version__} (from {torch.__file__}) is older than {sys.argv[1]}, the oldest "
             "tested; install without --system-site-packages")
EOF
have=$($py -c "import torch; print(torch.version.cuda or 'cpu')" 2>>"$log")
dali=$(build dali --torch-cuda "$have") || exit 2
pipq -e ".[${extras}${dali}]"
if [ -n "$driver" ] && ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  echo "install: a GPU is present (driver $driver) but torch $($py -c 'import torch; print(torch.__version__)') cannot use it (torch.cuda.is_available() is False); try --cuda 12 or a newer driver" >&2
  exit 1
fi
$py -c "import sdca_dist, nvidia.dali, deepspeed, submitit, hydra" >>"$log" 2>&1 \
  || { echo "install: the project does not import cleanly (see $log)" >&2; exit 1; }
echo "install: ready ($($py -c '
import torch, nvidia.dali as d
nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"
cuda = torch.version.cuda or "none (CPU build)"
print(f"torch {torch.__version__}, CUDA {cuda}, NCCL {nccl}, DALI {d.__version__}")
'))"
