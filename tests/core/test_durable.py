"""Flushing written files to the disk (core.durable): a failed flush is an error the caller sees, never silence."""

from __future__ import annotations

import ctypes
import errno
import sys
from pathlib import Path

import pytest

import core.durable as durable


def written(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images" / "ab"
    folder.mkdir(parents=True)
    paths = [folder / f"{i}.png" for i in range(3)]
    for path in paths:
        path.write_bytes(b"x" * 100)
    return paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux's")
def test_linux_flushes_a_batch_with_one_syncfs_of_the_data_directory(tmp_path: Path) -> None:
    assert durable._SYNCFS is not None  # glibc has had syncfs since 2.14: the file-by-file path would be slower
    durable.sync_files(tmp_path, written(tmp_path))


def test_a_failed_syncfs_raises_with_the_disks_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def lost_write(_fd: int) -> int:  # what syncfs returns when the disk failed a write back (Linux 5.8+)
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(durable, "_SYNCFS", lost_write)
    with pytest.raises(OSError) as failure:
        durable.sync_files(tmp_path, written(tmp_path))
    assert failure.value.errno == errno.EIO


def test_without_syncfs_each_file_is_flushed_and_a_vanished_one_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "_SYNCFS", None)
    paths = written(tmp_path)
    durable.sync_files(tmp_path, paths)
    paths[1].unlink()  # removed by another process before the flush: its row must not be committed
    with pytest.raises(FileNotFoundError):
        durable.sync_files(tmp_path, paths)


def test_nothing_written_flushes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(_fd: int) -> int:
        raise AssertionError("flushed a file system for an empty batch")

    monkeypatch.setattr(durable, "_SYNCFS", must_not_run)
    durable.sync_files(tmp_path, [])
