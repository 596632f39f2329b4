"""Atomic writes, for softmask_peft and the device alike: one file (temporary file, fsync,
rename) or a set of files (a journal).

A set of files — a checkpoint's config, weights and importance — cannot be renamed into place
in one atomic step, so `commit_files` uses a staging folder as a journal:

1. every file is written and fsynced in a fresh staging folder inside the target directory;
2. a `COMMITTED` marker is written into it: from here on the new set is the checkpoint;
3. the files are renamed into place and the staging folder is removed.

A crash before 2 leaves the old files untouched; a crash after 2 leaves a committed staging
folder that `recover_directory` (run by every load and save) rolls forward. One writer per
directory at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

STAGING_PREFIX = ".softmask_save."
COMMIT_MARKER = "COMMITTED"


def ensure_directory(path: str | os.PathLike, error: type[Exception] = NotADirectoryError) -> Path:
    """Create `path` as a directory; if it exists as anything else, raise `error` (the caller's type)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"cannot save into {str(path)!r}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    """The process umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `target`, so readers see the old or the new file.

    A crash (or exception) during `write` leaves `target` untouched and removes the temporary.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; the result gets the mode open() would give it, so a
        # web server serving an artifacts folder (or a shared model folder) can read it
        os.chmod(tmp, 0o666 & ~_umask())
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


def commit_files(directory: Path, write: Callable[[Path], None]) -> None:
    """Let `write(staging)` create files, then move them all into `directory` (module docstring).

    An exception before the commit point removes the staging folder and leaves `directory` as it
    was; from the commit point on, the staging folder is never deleted before its files moved.
    """
    recover_directory(directory, drop_uncommitted=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    marker = staging / COMMIT_MARKER
    try:
        write(staging)
        for item in staging.rglob("*"):  # adapters other than PEFT's "default" sit in sub-folders
            if item.is_file():
                fsync_file(item)
        atomic_write_text(marker, "")  # the commit point
    except BaseException:
        if not marker.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _roll_forward(staging, directory)


def recover_directory(directory: Path, drop_uncommitted: bool = False) -> None:
    """Finish every committed save left in `directory`; optionally drop uncommitted ones.

    Loading only rolls forward (an uncommitted staging folder may be another writer's save in
    progress); saving also removes uncommitted leftovers of crashed saves.
    """
    for staging in sorted(directory.glob(STAGING_PREFIX + "*")):
        if not _ours(staging):
            continue  # a link or a folder someone else planted: never follow or consume it
        if (staging / COMMIT_MARKER).is_file():
            _roll_forward(staging, directory)
        elif drop_uncommitted:
            shutil.rmtree(staging, ignore_errors=True)


def _ours(staging: Path) -> bool:
    """A real directory as `tempfile.mkdtemp` creates it: not a link, ours, mode 0700."""
    try:
        st = staging.lstat()
    except FileNotFoundError:
        return False
    owner = getattr(os, "getuid", lambda: st.st_uid)()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == owner and stat.S_IMODE(st.st_mode) == 0o700


def _roll_forward(staging: Path, directory: Path) -> None:
    """Move a committed save's files into place; idempotent, and a reader may race the writer."""
    fsync_directory(staging)  # the marker is durable before the first file moves
    try:
        items = sorted(staging.iterdir())
    except FileNotFoundError:  # another process finished this save
        return
    for item in items:
        if item.name != COMMIT_MARKER and not item.is_symlink():
            _move(item, directory / item.name)
    fsync_directory(directory)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_directory(directory)


def _move(item: Path, target: Path) -> None:
    """Rename a file into place; a folder's files one by one (the target folder may exist)."""
    if item.is_dir():
        target.mkdir(exist_ok=True)
        for child in sorted(item.iterdir()):
            if not child.is_symlink():
                _move(child, target / child.name)
        fsync_directory(target)
        return
    with contextlib.suppress(FileNotFoundError):  # another process moved it first
        os.replace(item, target)
