"""Value types for the command-line tools' options (argparse): a value out of range is refused
with one line naming the option (``argument --iters: must be >= 1, got 0``), exit 2, before any
work starts, instead of a traceback or a table computed from nonsense."""

from __future__ import annotations

import argparse
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer option that must be >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def size_wh(low: int = 1) -> Callable[[str], tuple[int, int]]:
    """A ``WxH`` option with both sides >= ``low``."""

    def parse(text: str) -> tuple[int, int]:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not WxH (e.g. 1024x512)") from None
        if min(w, h) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: both sides must be >= {low}")
        return w, h

    parse.__name__ = "WxH size"
    return parse
