"""Atomic writes, used by every output: a temporary name beside the target, fsync, rename.

The output path only ever holds the previous file or the complete new one: a crash, a kill
or a full disk in the middle of a write leaves at most a `<name>.tmp` beside it, and a
failed write removes its temporary file before the error goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_path(path: str | Path) -> Path:
    """Where `path` is written before it is renamed into place (same folder, same file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".tmp")


def commit(tmp: str | Path, path: str | Path) -> None:
    """Flush `tmp` to disk and rename it to `path` (the rename is atomic on POSIX)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        directory = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for fsync (some network file systems)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """`with atomic_path(out) as tmp:` write tmp; on success it becomes `out`, on failure it is removed."""
    tmp = temporary_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: Any) -> None:
    """`payload` as indented JSON with a final newline."""
    write_text(path, json.dumps(payload, indent=1) + "\n")
