"""Atomic writes: a folder or a JSON file appears whole or not at all.

Every command that writes an output folder (datasets, feature caches, exports, rendered repositories)
builds it in a temporary sibling and renames it into place, so a failure or Ctrl-C never leaves half of
one, and never replaces a folder the command reads from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from common.errors import DataError


def check_not_above(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output folder that is one of the inputs or holds one: replacing it would delete it."""
    target = Path(out).resolve()
    for src in inputs:
        source = Path(src).resolve()
        if source == target or target in source.parents:
            raise DataError(out, f"the output folder would replace the input {src}; choose another --out")


def _umask() -> int:
    # Read, not set and restored: os.umask would change it for every thread of the process meanwhile.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `out` only if the block finishes.

    A failure (bad input, Ctrl-C) removes the temporary folder, so `out` is either the old content
    or the complete new one, never half of each. `inputs` are folders the block reads: an `out` that
    is one of them or holds one is refused, even with `force`.
    """
    out = Path(out)
    check_not_above(out, inputs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DataError(out, "output exists and is not empty (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(out.parent, f"cannot create the output's folder ({e.strerror})") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp's 0700 would survive the rename: a server running as another user could not read `out`.
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON next to the target then rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
