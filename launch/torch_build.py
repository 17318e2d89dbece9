"""Which torch build and which DALI package suit this machine (used by launch/install.sh).

Pure logic on version strings, standard library only (it runs before anything is installed), so
it is tested with given driver versions:

    python3 launch/torch_build.py torch --driver 550.54.15 [--cuda 12|13]   -> "12 <index url>"
    python3 launch/torch_build.py torch                                    -> "cpu" (no driver)
    python3 launch/torch_build.py dali --torch-cuda 12.8                    -> "dali-cuda12" (extra)
    python3 launch/torch_build.py version                                  -> "2.13.0"

A CUDA build of torch runs only on a driver at least as new as its CUDA major version needs
(CUDA 12.x: 525.60.13 with minor-version compatibility; CUDA 13.x: 580.65.06). The newest build
the driver supports is chosen unless ``--cuda`` asks for one; a driver too old for the build asked
for (or for any build) is refused with one line, never installed and left to fail at run time
(torch would then silently see no GPU).
"""

from __future__ import annotations

import argparse
import re
import sys

#: the torch release the project is tested with (pyproject's floor)
TORCH_VERSION = "2.13.0"
#: oldest driver for each CUDA major version torch is built for (NVIDIA's compatibility table)
MIN_DRIVER = {"13": (580, 65, 6), "12": (525, 60, 13)}
#: wheel index of each torch CUDA build
TORCH_INDEX = {"13": "https://download.pytorch.org/whl/cu130", "12": "https://download.pytorch.org/whl/cu128"}
#: pyproject extra holding the DALI package for each CUDA major version (DALI's wheels are per
#: CUDA major version: nvidia-dali-cuda120, nvidia-dali-cuda130)
DALI_EXTRA = {"12": "dali-cuda12", "13": "dali-cuda13"}


class ChoiceError(ValueError):
    """No build fits (one line saying why and what to do)."""


def parse_driver(text: str) -> tuple[int, ...]:
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?\s*", text or "")
    if not m:
        raise ChoiceError(f"cannot read the NVIDIA driver version {text!r} (nvidia-smi --query-gpu=driver_version)")
    return tuple(int(g) for g in m.groups() if g is not None)


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join([str(version[0])] + [f"{v:02d}" for v in version[1:]])


def cuda_build(driver: str | None, asked: str | None = None) -> str:
    """``"cpu"`` without a driver, else the CUDA major version ("12" or "13") of the torch build."""
    if asked is not None and asked not in MIN_DRIVER:
        raise ChoiceError(f"--cuda {asked}: choose one of {', '.join(sorted(MIN_DRIVER))}")
    if not driver:
        if asked is not None:
            raise ChoiceError(f"--cuda {asked} asked for, but this machine has no NVIDIA driver (nvidia-smi)")
        return "cpu"
    have = parse_driver(driver)
    if asked is not None:
        if have < MIN_DRIVER[asked]:
            fix = f"use --cuda {int(asked) - 1} or a newer driver" if asked != "12" else "update the driver"
            raise ChoiceError(
                f"driver {driver.strip()} is older than CUDA {asked} needs ({_fmt(MIN_DRIVER[asked])}); {fix}"
            )
        return asked
    for major in sorted(MIN_DRIVER, key=int, reverse=True):
        if have >= MIN_DRIVER[major]:
            return major
    raise ChoiceError(
        f"driver {driver.strip()} is older than any torch CUDA build needs ({_fmt(MIN_DRIVER['12'])} for CUDA 12); "
        "update the driver"
    )


def dali_extra(torch_cuda: str | None) -> str:
    """The extra with the DALI package for torch's CUDA (``torch.version.cuda``); a CPU torch keeps
    the CUDA 12 package, which also runs CPU-only."""
    if not torch_cuda or torch_cuda in ("None", "cpu"):
        return DALI_EXTRA["12"]
    major = torch_cuda.split(".")[0]
    if major not in DALI_EXTRA:
        raise ChoiceError(f"torch is built for CUDA {torch_cuda}; DALI packages exist for CUDA {', '.join(DALI_EXTRA)}")
    return DALI_EXTRA[major]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("torch", help="print the torch build (cpu, or the CUDA major version and its index URL)")
    t.add_argument("--driver", default="", help="NVIDIA driver version; empty: no GPU")
    t.add_argument("--cuda", choices=sorted(MIN_DRIVER), help="force a CUDA major version")
    d = sub.add_parser("dali", help="print the pyproject extra with the DALI package for torch's CUDA")
    d.add_argument("--torch-cuda", default="", help="torch.version.cuda (empty, None or cpu: CPU torch)")
    sub.add_parser("version", help="print the tested torch release")
    args = p.parse_args(argv)
    try:
        if args.what == "torch":
            build = cuda_build(args.driver or None, args.cuda)
            print(build if build == "cpu" else f"{build} {TORCH_INDEX[build]}")
        elif args.what == "dali":
            print(dali_extra(args.torch_cuda))
        else:
            print(TORCH_VERSION)
    except ChoiceError as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
