"""One error type for bad data: its message is one line that names the file or key at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data (unreadable, truncated, unpaired, mismatched, unknown ids, missing folder)."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}".replace("\n", " "))

    def __reduce__(self):  # survive the trip back from a worker process
        return (DataError, (self.where, self.problem))
