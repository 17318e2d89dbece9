"""The software and machine a stage ran with, recorded in its folder as ``environment.json``.

A result can only be reproduced in the environment that made it: CPU figures of this project move
with package versions and with the CPU's instruction set (docs/running.md, "Environment"). Each
stage start writes the versions of the packages that touch the numbers (torch and its CUDA /
cuDNN / NCCL, numpy, pillow, DALI, DeepSpeed, ...), the Python, the machine (CPU model, ISA torch
dispatches to, thread count) and the GPU, and a restart that finds other versions than the last
start says so in the stage log: a resumed run then mixes two environments.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from sdca_dist.files import atomic_write_text, read_json_dict
from sdca_dist.run_folder import ENVIRONMENT as FILE

#: distributions whose versions are recorded (those absent are recorded as null)
PACKAGES = (
    "torch",
    "numpy",
    "pillow",
    "nvidia-dali-cuda120",
    "nvidia-dali-cuda130",
    "deepspeed",
    "webdataset",
    "hydra-core",
    "omegaconf",
    "submitit",
    "cityscapesscripts",
)
#: environment variables that change which kernels run (recorded when set)
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device=None) -> dict:
    """What this process runs with (cheap: no file of the data is read)."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = None
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        props = torch.cuda.get_device_properties(device)
        cuda = {
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpus_visible": torch.cuda.device_count(),
        }
    return {
        "python": platform.python_version(),
        "packages": versions,
        "torch_build": torch.__version__,
        "machine": {
            "arch": platform.machine(),
            "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "gpu": cuda,
        "variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
        "executable": sys.executable,
    }


def changed_versions(before: dict, now: dict) -> list[str]:
    """``name a -> b`` for every recorded version (packages, Python, torch build, CPU ISA) that differs."""
    pairs = [("python", before.get("python"), now.get("python"))]
    pairs.append(("torch build", before.get("torch_build"), now.get("torch_build")))
    cap = "machine", "cpu_capability"
    pairs.append(("cpu capability", (before.get(cap[0]) or {}).get(cap[1]), (now.get(cap[0]) or {}).get(cap[1])))
    for name in sorted(set(before.get("packages") or {}) | set(now.get("packages") or {})):
        pairs.append((name, (before.get("packages") or {}).get(name), (now.get("packages") or {}).get(name)))
    return [f"{name} {a} -> {b}" for name, a, b in pairs if a != b]


def record_environment(folder: Path, device=None, log=print) -> dict:
    """Write ``folder/environment.json`` (atomically); log the versions that differ from the last
    start's record, if there was one."""
    now = environment(device)
    before = read_json_dict(Path(folder) / FILE)
    if before is not None:
        moved = changed_versions(before, now)
        if moved:
            log(f"environment differs from the last start of this stage: {', '.join(moved)}")
    atomic_write_text(Path(folder) / FILE, json.dumps(now, indent=1, sort_keys=True) + "\n")
    return now
