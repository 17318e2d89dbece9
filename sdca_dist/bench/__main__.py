"""``python -m sdca_dist.bench NAME [args]``: run one benchmark program.

Each benchmark lives in ``sdca_dist/bench/<NAME>.py`` with a ``main(argv) -> int`` and ends
with one line per goal (``speedup: 35.2x`` / ``memory ratio: 0.04x`` / ``allreduce share: 0.3%``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m sdca_dist.bench {{{','.join(names)}}} [args]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"error: unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"sdca_dist.bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
