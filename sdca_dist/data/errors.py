"""Error types of the data path: each message is one line that names the file, key or option at fault.

``DataError``: bad input data (unreadable, truncated, unpaired, mismatched, unknown ids, missing
folder, a shard folder built from other data). ``OutputError``: the output cannot be written (no
space, not writable, a file where a folder should be). ``UsageError``: a bad command-line value.
The shard CLI turns all three into ``error: <line>`` and exit status 2.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data (unreadable, truncated, unpaired, mismatched, unknown ids, missing folder)."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}".replace("\n", " "))

    def __reduce__(self):  # survive the trip back from a worker process
        return (type(self), (self.where, self.problem))


class OutputError(DataError):
    """A file-system failure while writing shards (ENOSPC, EACCES, ENOTDIR, ...), naming the path."""


class UsageError(DataError):
    """A bad option value; ``where`` is the option's name (``--shard-size``)."""
