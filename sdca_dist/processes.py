"""Process lifetimes: a worker never outlives the process that started it. No torch here: the
shard builder's pool workers and the training ranks both use it.

``die_with_parent`` asks the kernel (Linux ``PR_SET_PDEATHSIG``) to send the process a signal
when its parent exits: the training ranks ask for SIGTERM (they stop together at the next step
boundary with a checkpoint, ``sdca_dist.engine.preemption``), the shard builder's pool workers
for SIGKILL (they hold no state worth saving).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM, parent: Optional[int] = None) -> bool:
    """Have the kernel send ``signum`` to this process when its parent exits (Linux; elsewhere a
    no-op returning False). ``parent``: the pid the parent had when it started this process; if
    it is gone already (this process was adopted), the signal is sent at once."""
    if not sys.platform.startswith("linux"):
        return False
    if parent is None:
        parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)
    return True
