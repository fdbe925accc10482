"""Getting written files onto the disk before a database row names them.

A rename is atomic, but without a flush a power cut can keep the new name and lose the bytes behind it (ext4's
delayed allocation leaves an empty file). So every writer that later commits a row pointing to a file flushes first:
a checkpoint file by file (`fsync` before its rename, then its folder), an import a whole batch at once
(`sync_files`: one `syncfs` of the data directory's file system on Linux instead of one `fsync` per file).

`models.checkpoint` keeps its own `sync_directory` for the checkpoint files it writes: the layering lets neither
`models` import `core` nor `core.catalog` import `models` (tests/test_architecture.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def sync_directory(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so the renames in it survive a power cut (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _libc_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        syncfs: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):  # no C library by that name, or one without syncfs: flush file by file
        return None
    return syncfs


_SYNCFS = _libc_syncfs()


def sync_files(root: Path, files: Iterable[Path]) -> None:
    """Flush `files` (written under `root`, each renamed into place) and the folders holding them to the disk.

    On Linux one `syncfs` flushes `root`'s whole file system: a batch of hundreds of files costs one wait for the disk
    instead of one per file (it also flushes what other processes wrote there; the disk has to write that anyway).
    Elsewhere, or if `syncfs` is missing, each file and each of its folders is fsynced. Raises OSError when the disk
    reports a failed write (Linux 5.8 and later report them to `syncfs` too): the caller must not commit rows naming
    these files then.
    """
    paths = list(files)
    if not paths:
        return
    if _SYNCFS is not None:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if _SYNCFS(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno), str(root))
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {path.parent for path in paths}:
        sync_directory(folder)
