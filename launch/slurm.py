#!/usr/bin/env python
"""Run the SDCA chain: ``python launch/slurm.py conf=NAME nodes=N [settings...] [launcher keys...]``.

The launcher is the package ``sdca_dist.launch`` (its docstring is the contract; ``--help``
prints it); this file is the same command as ``python -m sdca_dist.launch``.
"""

import sys

from sdca_dist.launch.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
