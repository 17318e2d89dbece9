"""The command-line tools' parser and option types (argparse), one home for all of them.

``parser`` is every tool's ``ArgumentParser``: no abbreviations (``--k 0`` is not taken for a
hidden ``--kill-rank 0``: an option is named in full or refused) and a bad command line is one
line, ``error: ...``, exit 2. The value types refuse a value out of range the same way, naming the
option (``argument --iters: must be >= 1, got 0``), before any work starts, instead of a
traceback or a table computed from nonsense; ``int_between`` also bounds the options whose cost
(time, memory, output) grows with their value.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parser(prog: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """A tool's command-line parser: full option names only, one-line errors (exit 2)."""
    return _OneLineParser(prog=prog, description=description, allow_abbrev=False, **kwargs)


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


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer option that must lie in ``[low, high]`` (an upper bound where the cost of a
    value grows with it: memory, time or output)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high:,}, got {value:,}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def float_above(low: float) -> Callable[[str], float]:
    """A finite number option that must be > ``low``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > low and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number > {low}, got {text}")
        return value

    parse.__name__ = f"number > {low}"
    return parse


def size_wh(low: int = 1, high: int = 16384) -> Callable[[str], tuple[int, int]]:
    """A ``WxH`` option with both sides in ``[low, high]`` (memory grows with W x H)."""

    def parse(text: str) -> tuple[int, int]:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not WxH (e.g. 1024x512)") from None
        if min(w, h) < low or max(w, h) > high:
            raise argparse.ArgumentTypeError(f"{text!r}: both sides must be between {low} and {high}")
        return w, h

    parse.__name__ = "WxH size"
    return parse
