"""Atomic file writes: write a temporary file in the target's directory, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SaveLocationError


def ensure_directory(path: str | os.PathLike) -> Path:
    """Create `path` as a directory; refuse if it exists as anything else."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveLocationError(f"cannot save into {str(path)!r}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `target`, so readers see the old or the new file.

    A crash (or exception) during `write` leaves `target` untouched and removes the temporary.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Atomically write a UTF-8 text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(target, write)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory entry (renames) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
