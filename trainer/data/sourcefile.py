"""Raw source files (delimited text, CSV) parsed with errors that point at the offending line.

Every table returned here is indexed by the 1-based line number of its row in the file (the header, when
there is one, is line 1), and every DataError raised here puts that number in `row`, so a user can jump
straight to it in an editor. Blank lines are skipped. (In a CSV whose quoted fields span lines the number
counts records, not physical lines.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError

_INT = r"[+-]?\d{1,18}"


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(path, "missing file")
    return path


def read_lines(path: Path, encoding: str = "utf-8") -> pd.Series:
    """Non-blank lines of a text file, indexed by line number."""
    data = require_file(path).read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            path, f"not {encoding} text ({e.reason})", row=data[: e.start].count(b"\n") + 1
        ) from e
    # split("\n"), not splitlines(): latin-1 text may hold \x85 or \x0c, which splitlines would also cut on.
    lines = pd.Series(text.split("\n"), dtype=object).str.rstrip("\r")
    lines.index = pd.RangeIndex(1, len(lines) + 1)
    return lines[lines.str.strip() != ""]


def split_columns(lines: pd.Series, path: Path, sep: str, names: list[str]) -> pd.DataFrame:
    """Split each line on `sep` into exactly len(names) text columns."""
    found = lines.str.count(re.escape(sep)) + 1
    bad = found != len(names)
    if bad.any():
        line = int(bad.idxmax())
        raise DataError(path, f"{found[line]} {sep!r}-separated columns, expected {len(names)}", row=line)
    if lines.empty:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in names})
    table = lines.str.split(sep, n=len(names) - 1, expand=True, regex=False)
    table.columns = names
    return table


def read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """A CSV file with a header, every value as text, indexed by record number (header = 1)."""
    try:
        table = pd.read_csv(require_file(path), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(path, f"unreadable CSV ({e})") from e
    for name in required:
        if name not in table.columns:
            raise DataError(path, "missing column", column=name, row=1)
    table.index = pd.RangeIndex(2, len(table) + 2)
    return table


def parse_ints(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """Integer column -> int64 array; the first value that is not an integer raises."""
    text = values.astype(object).str.strip()
    ok = text.str.fullmatch(_INT).fillna(False).astype(bool)
    if not ok.all():
        line = int(ok.idxmin())
        raise DataError(path, f"not an integer: {values[line]!r}", column=column, row=line)
    return text.astype(np.int64).to_numpy()


def parse_numbers(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """Finite numeric column -> float64 array; the first value that is not a finite number raises."""
    numbers = pd.to_numeric(values.astype(object).str.strip(), errors="coerce").astype(float)
    ok = np.isfinite(numbers.to_numpy())
    if not ok.all():
        line = int(values.index[np.flatnonzero(~ok)[0]])
        raise DataError(path, f"not a finite number: {values[line]!r}", column=column, row=line)
    return numbers.to_numpy()


def check_range(values: np.ndarray, lines: pd.Index, path: Path, column: str, low: int, high: int) -> None:
    bad = (values < low) | (values > high)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(path, f"{values[i]} outside [{low}, {high}]", column=column, row=int(lines[i]))


def check_known(
    values: np.ndarray,
    known: np.ndarray,
    lines: pd.Index,
    path: Path,
    column: str,
    what: str,
    defined_in: str,
) -> None:
    """Every value is one of `known`, the ids that the file `defined_in` defines."""
    bad = ~np.isin(values, known)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            path, f"unknown {what} {values[i]} (not in {defined_in})", column=column, row=int(lines[i])
        )


def check_unique(keys: pd.DataFrame, path: Path, column: str) -> None:
    """No key (one row of `keys`, indexed by line) occurs twice; names the second line and the first."""
    later = keys.duplicated(keep="first")
    if later.any():
        line = int(later.idxmax())
        key = keys.loc[line]
        first = int(keys.index[(keys == key).all(axis=1).to_numpy()][0])
        value = key.iloc[0] if len(key) == 1 else tuple(key.tolist())
        raise DataError(path, f"duplicate {value} (first on line {first})", column=column, row=line)
