"""The project's user-facing errors: the CLI prints one line naming the problem and exits non-zero.

The serving runtime raises them too (a rendered repository carries a copy of this module), so an error
raised inside the runtime is the same MMRankError as anywhere else.
"""


class MMRankError(Exception):
    """An error caused by the user's input or environment (bad file, unknown id, server down)."""


class RequestError(MMRankError):
    """A request the server refuses before any graph runs; answered as INVALID_ARGUMENT. The message
    names the input and the limit it broke."""


class DataError(MMRankError):
    """A dataset file is missing, malformed or inconsistent. The message names file, column and row."""

    def __init__(self, path, message: str, column: str | None = None, row: int | None = None):
        where = str(path)
        if column is not None:
            where += f", column {column!r}"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {message}")
        self.path, self.column, self.row = str(path), column, row
