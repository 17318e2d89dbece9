"""Which torch build and which DALI package suit this machine (used by launch/install.sh).

Pure logic on version strings, standard library only (it runs before anything is installed), so
it is tested with given driver versions and compute capabilities:

    python3 launch/torch_build.py torch --driver 550.54.15 --cc 8.0 [--cuda 12|13]  -> "12 <index url> 2.13.0+cu128"
    python3 launch/torch_build.py torch                                             -> "cpu <index url> 2.13.0+cpu"
    python3 launch/torch_build.py torch --cuda 12          (no driver: a login node) -> "12 <index url> 2.13.0+cu128"
    python3 launch/torch_build.py check --want cu128 --have-version 2.13.0+cu128 --have-cuda 12.8
    python3 launch/torch_build.py dali --torch-cuda 12.8                            -> "dali-cuda12" (extra)
    python3 launch/torch_build.py constraints --file launch/constraints.txt [--without-torch]
    python3 launch/torch_build.py lock < pip-freeze-output > launch/constraints.txt
    python3 launch/torch_build.py version                                           -> "2.13.0"

A CUDA build of torch runs only on a driver at least as new as its CUDA major version needs
(CUDA 12.x: 525.60.13 with minor-version compatibility; CUDA 13.x: 580.65.06) and only on GPUs
whose compute capability it was compiled for: CUDA 13 dropped Maxwell, Pascal and Volta (below
7.5), so a V100 (7.0) gets the CUDA 12 build even under a CUDA 13 driver. The newest build the
driver and the GPU support is chosen unless ``--cuda`` asks for one; a driver or GPU too old for
the build asked for (or for any build) is refused with one line, never installed and left to fail
at run time (torch would then silently see no GPU). ``--cuda`` without a driver prepares a GPU
venv on a login node for the compute nodes (their driver is not checked here: the GPU check's G0
checks it on a compute node).

Every build is pinned by its local version label (``2.13.0+cpu``, ``2.13.0+cu128``,
``2.13.0+cu130``) and installed from its own index only: PyPI's ``torch==2.13.0`` (a CUDA build
on Linux x86_64) can never stand in for the CPU build, and an index that lacks the version makes
pip fail instead of substituting another build. ``check`` then compares what was installed with
what was asked for.
"""

from __future__ import annotations

import argparse
import re
import sys

#: the torch release the project is tested with (pyproject's floor)
TORCH_VERSION = "2.13.0"
#: oldest driver for each CUDA major version torch is built for (NVIDIA's compatibility table)
MIN_DRIVER = {"13": (580, 65, 6), "12": (525, 60, 13)}
#: lowest GPU compute capability each build runs on (CUDA 13 dropped sm_50-sm_72; torch's CUDA 12.8
#: build starts at sm_70). ``torch.cuda.get_arch_list()`` of the installed torch is the final word:
#: install.sh and the GPU check's G0 read it.
MIN_CC = {"13": (7, 5), "12": (7, 0)}
#: local version label of each build: the pin that only its own index (or a local file of that
#: very build) can satisfy
LABEL = {"cpu": "cpu", "12": "cu128", "13": "cu130"}
#: wheel index of each torch build
TORCH_INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "12": "https://download.pytorch.org/whl/cu128",
    "13": "https://download.pytorch.org/whl/cu130",
}
#: pyproject extra holding the DALI package for each CUDA major version (DALI's wheels are per
#: CUDA major version: nvidia-dali-cuda120, nvidia-dali-cuda130)
DALI_EXTRA = {"12": "dali-cuda12", "13": "dali-cuda13"}
#: packages of a torch build (its CUDA libraries are not in the lock: it is written on a CPU machine): left out when
#: the venv uses a cluster's own torch (``--system-site-packages``)
TORCH_PACKAGES = re.compile(r"^(torch|triton)$")


class ChoiceError(ValueError):
    """No build fits (one line saying why and what to do)."""


def parse_driver(text: str) -> tuple[int, ...]:
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?\s*", text or "")
    if not m:
        raise ChoiceError(f"cannot read the NVIDIA driver version {text!r} (nvidia-smi --query-gpu=driver_version)")
    return tuple(int(g) for g in m.groups() if g is not None)


def parse_cc(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    if not m:
        raise ChoiceError(f"cannot read the GPU compute capability {text!r} (nvidia-smi --query-gpu=compute_cap)")
    return int(m.group(1)), int(m.group(2))


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join([str(version[0])] + [f"{v:02d}" for v in version[1:]])


def _cc(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def cuda_build(driver: str | None, asked: str | None = None, cc: str | None = None) -> str:
    """``"cpu"`` without a driver (and nothing asked), else the CUDA major version ("12" or "13")
    of the torch build. ``cc`` is the GPU's compute capability ("7.0"), None where unknown."""
    if asked is not None and asked not in MIN_DRIVER:
        raise ChoiceError(f"--cuda {asked}: choose one of {', '.join(sorted(MIN_DRIVER))}")
    if not driver:
        return asked if asked is not None else "cpu"  # --cuda on a login node: a venv for the compute nodes
    have = parse_driver(driver)
    gpu = parse_cc(cc) if cc else None
    if asked is not None:
        if have < MIN_DRIVER[asked]:
            fix = f"use --cuda {int(asked) - 1} or a newer driver" if asked != "12" else "update the driver"
            raise ChoiceError(
                f"driver {driver.strip()} is older than CUDA {asked} needs ({_fmt(MIN_DRIVER[asked])}); {fix}"
            )
        if gpu is not None and gpu < MIN_CC[asked]:
            fix = f"use --cuda {int(asked) - 1}" if asked != "12" else "this GPU is too old for torch's CUDA builds"
            raise ChoiceError(
                f"the GPU's compute capability {_cc(gpu)} is below what CUDA {asked} supports "
                f"({_cc(MIN_CC[asked])}); {fix}"
            )
        return asked
    for major in sorted(MIN_DRIVER, key=int, reverse=True):
        if have >= MIN_DRIVER[major] and (gpu is None or gpu >= MIN_CC[major]):
            return major
    if have < MIN_DRIVER["12"]:
        raise ChoiceError(
            f"driver {driver.strip()} is older than any torch CUDA build needs ({_fmt(MIN_DRIVER['12'])} for CUDA 12); "
            "update the driver"
        )
    raise ChoiceError(
        f"the GPU's compute capability {_cc(gpu)} is below what any torch CUDA build supports "
        f"({_cc(MIN_CC['12'])} for CUDA 12)"
    )


def torch_spec(build: str) -> str:
    """The exact requirement of ``build`` ("cpu", "12", "13"): ``2.13.0+cu128`` and so on."""
    return f"{TORCH_VERSION}+{LABEL[build]}"


def check_installed(want: str, have_version: str, have_cuda: str | None) -> None:
    """Refuse (one line) an installed torch that is not the build asked for: ``want`` is a label
    ("cpu", "cu128"), ``have_version`` is ``torch.__version__``, ``have_cuda`` ``torch.version.cuda``."""
    label = have_version.partition("+")[2]
    cuda_major = (have_cuda or "").split(".")[0] if have_cuda not in (None, "", "None") else ""
    if want == "cpu":
        ok = label == "cpu" and not cuda_major
    else:
        major = next(k for k, v in LABEL.items() if v == want)
        ok = label == want and cuda_major == major
    if not ok:
        built = f"CUDA {have_cuda}" if cuda_major else "the CPU"
        raise ChoiceError(
            f"pip installed torch {have_version} (built for {built}), not the {want} build asked for "
            f"({TORCH_VERSION}+{want}); the index offered another build: remove .venv and rerun (docs/gpu-nodes.md)"
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


def _name(line: str) -> str:
    return re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def lock_lines(freeze: str) -> list[str]:
    """Constraint lines from ``pip freeze`` output: one ``name==version`` per package, sorted; the
    project itself (editable) and direct references left out; local version labels dropped (torch's
    ``+cpu``: the build is chosen by install.sh, the release by the lock)."""
    out = {}
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ", "--")) or " @ " in line or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if name.lower().replace("_", "-") == "sdca-dist":
            continue
        out[name.lower().replace("_", "-")] = f"{name}=={version.split('+')[0]}"
    return [out[k] for k in sorted(out)]


def constraints(text: str, without_torch: bool) -> str:
    """The lock file's constraint lines (comments dropped), without torch's own packages when the
    venv uses a cluster's torch."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if without_torch:
        lines = [ln for ln in lines if not TORCH_PACKAGES.match(_name(ln))]
    return "\n".join(lines) + "\n"


LOCK_HEADER = """\
# Every package version launch/install.sh installs (it installs with -c this file unless --no-lock).
# Written by: python3 launch/torch_build.py lock < <(.venv/bin/python -m pip freeze) > launch/constraints.txt
# after `bash launch/install.sh --dev --no-lock` in a fresh clone (docs/gpu-nodes.md, "Versions").
# torch's build (CPU, CUDA 12 or 13) is install.sh's choice; the release is pinned here.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("torch", help="print the torch build (cpu, 12 or 13), its index URL and the exact version")
    t.add_argument("--driver", default="", help="NVIDIA driver version; empty: no GPU")
    t.add_argument("--cc", default="", help="the GPU's compute capability (e.g. 7.0); empty: unknown")
    t.add_argument("--cuda", choices=sorted(MIN_DRIVER), help="force a CUDA major version (also without a driver)")
    c = sub.add_parser("check", help="exit 2 unless the installed torch is the build asked for")
    c.add_argument("--want", required=True, choices=sorted(LABEL.values()))
    c.add_argument("--have-version", required=True, help="torch.__version__")
    c.add_argument("--have-cuda", default="", help="torch.version.cuda")
    d = sub.add_parser("dali", help="print the pyproject extra with the DALI package for torch's CUDA")
    d.add_argument("--torch-cuda", default="", help="torch.version.cuda (empty, None or cpu: CPU torch)")
    k = sub.add_parser("constraints", help="print the lock file's constraints (for pip -c)")
    k.add_argument("--file", required=True)
    k.add_argument("--without-torch", action="store_true", help="leave out torch and its CUDA packages")
    sub.add_parser("lock", help="read pip freeze on stdin, print the lock file")
    sub.add_parser("version", help="print the tested torch release")
    args = p.parse_args(argv)
    try:
        if args.what == "torch":
            build = cuda_build(args.driver or None, args.cuda, args.cc or None)
            print(f"{build} {TORCH_INDEX[build]} {torch_spec(build)}")
        elif args.what == "check":
            check_installed(args.want, args.have_version, args.have_cuda or None)
        elif args.what == "dali":
            print(dali_extra(args.torch_cuda))
        elif args.what == "constraints":
            try:
                text = open(args.file, encoding="utf-8").read()
            except OSError as exc:
                raise ChoiceError(f"cannot read the lock file {args.file}: {exc.strerror}") from None
            sys.stdout.write(constraints(text, args.without_torch))
        elif args.what == "lock":
            sys.stdout.write(LOCK_HEADER + "\n".join(lock_lines(sys.stdin.read())) + "\n")
        else:
            print(TORCH_VERSION)
    except ChoiceError as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
