"""User-facing errors: the CLI prints one line naming the problem and exits non-zero.

MMRankError itself is defined by the serving runtime (model_repository/errors.py), which cannot import
this project, so errors raised inside the runtime are MMRankErrors too.
"""

from model_repository.errors import MMRankError


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
