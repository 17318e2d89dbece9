#!/usr/bin/env bash
# Set up this machine for sdca_dist: a virtual environment at .venv/ in the repository root.
#   bash launch/install.sh                         # the package and its runtime dependencies
#   bash launch/install.sh --dev                   # + test tools (pytest, ruff)
#   bash launch/install.sh --cuda 12|13            # this CUDA build of torch (also on a login node without a GPU)
#   bash launch/install.sh --system-site-packages  # new venv that sees the cluster's own torch
#   bash launch/install.sh --no-lock               # newest versions in pyproject's ranges, not launch/constraints.txt
# Every version comes from launch/constraints.txt (pip -c) unless --no-lock. torch is pinned by
# its build label and taken from that build's own index only: without a GPU and without --cuda the
# CPU build (torch==2.13.0+cpu, never PyPI's CUDA build); with a GPU the CUDA build its driver and
# compute capability support (launch/torch_build.py decides, or --cuda); the installed build is
# checked against the one asked for. DALI follows torch's CUDA version; the script fails in one
# line if a GPU is present and torch cannot use it. It ends by printing the torch, CUDA, NCCL and
# DALI versions.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
cuda=""
system=0
lock=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="dev," ;;
    --cuda) cuda="${2:-}"; shift ;;
    --cuda=*) cuda="${1#*=}" ;;
    --system-site-packages) system=1 ;;
    --no-lock) lock=0 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install: unknown option $1 (--dev, --cuda 12|13, --system-site-packages, --no-lock)" >&2; exit 2 ;;
  esac
  shift
done
build() { python3 launch/torch_build.py "$@"; }
torch_version=$(build version)
driver=""
cc=""
if command -v nvidia-smi >/dev/null 2>&1; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -n | head -n 1 || true)
  case "$cc" in [0-9]*.[0-9]*) ;; *) cc="" ;; esac  # old nvidia-smi: no compute_cap field
fi
choice=$(build torch --driver "$driver" --cc "$cc" ${cuda:+--cuda "$cuda"}) || exit 2
read -r major index spec <<<"$choice"
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
pins=()
if [ "$lock" = 1 ]; then
  without=()
  [ "$system" = 1 ] && without=(--without-torch)  # the cluster's torch stays
  build constraints --file launch/constraints.txt "${without[@]}" > .venv/constraints.txt || exit 2
  pins=(-c .venv/constraints.txt)
fi
# torch.__version__ and torch.version.cuda ("cpu" for a CPU build) of the torch this venv sees
torch_now() { $py -c "import torch; print(torch.__version__, torch.version.cuda or 'cpu')" 2>>"$log" || echo "none none"; }
read -r have_version have <<<"$(torch_now)"
keep=0
if [ "$major" = cpu ]; then
  [ "$have" = cpu ] && keep=1
elif [ "$have" != none ] && [ "$have" != cpu ]; then  # a CUDA torch: keep it if the driver and GPU run it
  if [ -z "$cuda" ] || [ "${have%%.*}" = "$cuda" ]; then
    build torch --driver "$driver" --cc "$cc" --cuda "${have%%.*}" >/dev/null 2>&1 && keep=1
  fi
fi
want=""
if [ "$keep" = 1 ]; then
  echo "install: keeping torch $have_version ($([ "$have" = cpu ] && echo "CPU build" || echo "CUDA $have"))"
else
  if [ "$major" = cpu ]; then
    echo "install: no GPU and no --cuda; installing torch==$spec (CPU build) from $index"
  elif [ -z "$driver" ]; then
    echo "install: no GPU here; installing torch==$spec (CUDA $major build) from $index for GPU nodes"
  else
    echo "install: GPU (driver $driver${cc:+, compute capability $cc}); installing torch==$spec from $index"
  fi
  # the build's own index only, and its label pinned: no other index can substitute another build;
  # then its dependencies from the default index (the installed build satisfies the pin itself)
  pipq --force-reinstall --no-deps "torch==$spec" --index-url "$index" "${pins[@]}"
  pipq "torch==$spec" "${pins[@]}"
  want=${spec#*+}
fi
check_build() {  # the torch now installed is the build asked for (after each pip run that could change it)
  [ -z "$want" ] && return 0
  read -r have_version have <<<"$(torch_now)"
  build check --want "$want" --have-version "$have_version" --have-cuda "$([ "$have" = cpu ] || echo "$have")" || exit 2
}
check_build
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
pipq -e ".[${extras}${dali}]" "${pins[@]}"
check_build  # the project's dependencies must not have replaced the build installed above
if [ -n "$driver" ] && ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  echo "install: a GPU is present (driver $driver) but torch $($py -c 'import torch; print(torch.__version__)') cannot use it (torch.cuda.is_available() is False); try --cuda 12 or a newer driver" >&2
  exit 1
fi
if [ -n "$driver" ] && ! $py - >>"$log" 2>&1 <<'EOF'
import sys, torch
cc = "sm_%d%d" % torch.cuda.get_device_capability(0)
sys.exit(0 if cc in torch.cuda.get_arch_list() else f"{cc} not in {torch.cuda.get_arch_list()}")
EOF
then
  echo "install: torch $($py -c 'import torch; print(torch.__version__)') has no kernels for this GPU (compute capability $cc, see $log); try --cuda 12" >&2
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
