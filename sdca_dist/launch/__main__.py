"""``python -m sdca_dist.launch ...``: the launcher (``sdca_dist.launch.cli.main``)."""

import sys

from sdca_dist.launch.cli import main

sys.exit(main(sys.argv[1:]))
