"""Atomic writes, used by every output: a temporary name beside the target, fsync, rename;
and `OutputLock`, one writer per output.

The output path only ever holds the previous file or the complete new one: a crash, a kill
or a full disk in the middle of a write leaves at most a `<name>.tmp` beside it, and a
failed write removes its temporary file before the error goes on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if out_of_space(err):
            raise PipelineError(
                f"{path}: could not be written ({one_line(err)}): the disk is full or a file-size limit was "
                f"reached; free space and run the same command again (it keeps what was finished)"
            ) from None
        raise


NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def out_of_space(err: BaseException) -> bool:
    """A write that failed for lack of space: ENOSPC, EFBIG (a file-size limit) or EDQUOT, as
    an OSError or as the message of a library's error (h5py, torch.save)."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    text = str(err)
    return isinstance(err, (OSError, RuntimeError)) and any(
        mark in text for mark in ("No space left", "File too large", "Disk quota exceeded", "errno = 28",
                                  "errno = 27", "file write failed"))


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:160] + "...") if len(text) > 160 else text or type(err).__name__


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: Any) -> None:
    """`payload` as indented JSON with a final newline."""
    write_text(path, json.dumps(payload, indent=1) + "\n")


class OutputLock:
    """`with OutputLock(out):` one process at a time writes `out` (a precompute cache, a run dir).

    The lock is a file `<out>.lock` created exclusively, holding the holder's pid, host and
    command. A second process is refused in one line naming the holder. A lock whose holder
    is gone (same host, no such process: killed with -9, the machine rebooted) is stale: it
    is taken over, with a warning. A lock from another host cannot be checked from here: the
    message says to delete it if that job is gone.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".lock")
        self.held = False

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and holder_is_gone(holder):
                    log.warning("%s: taking over a stale lock of process %s on %s (it is gone)", self.out,
                                holder["pid"], holder["host"])
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"process {holder['pid']} on {holder['host']} ({holder['command']})" if holder
                       else "another process")
                raise PipelineError(
                    f"{self.out}: in use by {who}, lock {self.path}; wait for it to finish, or delete the lock "
                    f"if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200]}, f)
            self.held = True
            return self
        raise PipelineError(f"{self.out}: could not take the lock {self.path}; delete it if no job uses {self.out}")

    def holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return {"pid": int(holder["pid"]), "host": str(holder["host"]), "command": str(holder.get("command", ""))}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # being written, or not ours: treated as held

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def holder_is_gone(holder: dict[str, Any]) -> bool:
    """True when the lock's process is known to be dead: same host and no such pid."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
