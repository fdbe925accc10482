"""Content-addressed image store: originals byte for byte under images/, JPEG grid thumbnails under thumbs/."""

from __future__ import annotations

import io
import os
import re
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from core.catalog.imaging import DecodedImage
from core.durable import sync_files
from core.settings import Settings

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,8}")
THUMBNAIL_QUALITY = 85


class _StoredRow(Protocol):
    """What the path helpers read of an `images` row: read-only, so frozen dataclasses match too."""

    @property
    def stored_path(self) -> str: ...

    @property
    def thumb_path(self) -> str: ...


@dataclass(frozen=True)
class StoredFiles:
    """Where one image's files live: relative paths (for the `images` row) and absolute ones."""

    sha256: str
    original_rel: str  # relative to data_dir, POSIX separators
    thumb_rel: str
    original: Path
    thumb: Path
    wrote_original: bool  # False when the same bytes were already stored


def _shard(sha256: str) -> str:
    """The folder of a new file: the hash's first two hex digits (256 folders a tree).

    One level, not two (ab/cd/ until 2026-11-30): a young catalogue then makes 512 folders in all instead of about
    two for each of its first thousands of images, which measured 1.2-1.35x more small files imported a second
    (docs/benchmarks.md). At a million images a folder holds about 4,000 files, which ext4 and XFS index. Rows keep
    the relative paths they were stored with, so files stored under the earlier layout are still found."""
    if not _SHA256.fullmatch(sha256):  # only our own hex digests ever become path components
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return sha256[:2]


def original_rel_path(sha256: str, ext: str) -> str:
    """images/ab/<sha>.<ext>, relative to data_dir; `ext` comes from the detected format."""
    if not _EXT.fullmatch(ext):
        raise ValueError(f"bad extension {ext!r}")
    return f"images/{_shard(sha256)}/{sha256}.{ext}"


def thumb_rel_path(sha256: str) -> str:
    """thumbs/ab/<sha>.jpg, relative to data_dir."""
    return f"thumbs/{_shard(sha256)}/{sha256}.jpg"


# The temporary files of writes in progress (`core.catalog.filecheck` finds those a killed writer left).
TEMP_PREFIX = ".tmp-"
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_temp(path: Path) -> tuple[int, Path]:
    """A temporary file beside `path` for this thread alone (named by process, thread and target, so two writers
    never share one), created with the usual umask-based mode, so a worker or web server running as another user on
    shared storage can read the stored originals and thumbnails. O_TRUNC without O_EXCL: a file of that name can only
    be the leftover of a killed writer that had the same process and thread id, and it is overwritten."""
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
    except FileNotFoundError:  # first file in this shard: make the folder only then (saves a syscall per file)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(tmp, _TEMP_FLAGS, 0o666), tmp


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write through a temporary file in the same folder, then os.replace: readers never see half a file.

    Plain os.write calls, no Python file object: opening one costs three more system calls (fstat, ioctl, lseek) per
    file, and each system call hands the interpreter lock to another import thread and waits to get it back."""
    fd, tmp = _open_temp(path)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_thumbnail(rgb: Image.Image, side: int) -> Image.Image:
    """A copy whose longest side is at most `side` (never enlarged); the input is left untouched."""
    width, height = rgb.size
    scale = side / max(width, height)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Pillow's bilinear is antialiased (its support widens with the scale): fine for a grid thumbnail and
    # about 40% cheaper than bicubic, which matters at hundreds of images a second.
    return rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def store_image(
    settings: Settings, data: bytes, decoded: DecodedImage, *, thumbnail: Image.Image | None = None
) -> StoredFiles:
    """Store the original bytes once (content addressed) and a JPEG thumbnail of the normalised image (`thumbnail`,
    when the caller has already made it with `make_thumbnail`).

    Idempotent: a file already present with the right size is kept, so re-importing after a failed
    database insert reuses it. No user-supplied name ever reaches a path here.
    """
    sha = decoded.sha256
    original_rel = original_rel_path(sha, decoded.ext)
    thumb_rel = thumb_rel_path(sha)
    original = settings.data_dir / original_rel
    thumb = settings.data_dir / thumb_rel
    wrote = _size_of(original) != len(data)
    if wrote:
        _atomic_write(original, data)
    else:
        _refresh(original)
    if wrote or _size_of(thumb) is None:
        small = thumbnail if thumbnail is not None else make_thumbnail(decoded.image, settings.thumbnail_size)
        encoded = io.BytesIO()
        small.save(encoded, "JPEG", quality=THUMBNAIL_QUALITY)
        _atomic_write(thumb, encoded.getbuffer())
    else:
        _refresh(thumb)
    return StoredFiles(sha, original_rel, thumb_rel, original, thumb, wrote)


def flush_stored(settings: Settings, stored: Iterable[StoredFiles]) -> None:
    """Put these images' files (originals and thumbnails) on the disk: call it before committing rows that name them.

    `store_image` renames without a flush (a flush per file would cost two waits for the disk per image); the importer
    flushes each batch's files at once here, so a power cut can leave files without rows (importing them again reuses
    them) but never a row whose file lost its bytes. OSError when the disk reports a failed write."""
    sync_files(settings.data_dir, [path for files in stored for path in (files.original, files.thumb)])


def _refresh(path: Path) -> None:
    """Mark a file already there (a stray of a killed import, reused for the same bytes) as just stored, so the file
    check's grace period keeps it until its row commits. Best effort: the file is still the right one."""
    try:
        os.utime(path)
    except OSError:
        pass


def _size_of(path: Path) -> int | None:
    """The size of a regular file at `path`, None when there is none (one stat call)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_size if stat.S_ISREG(found.st_mode) else None


def _inside_data_dir(settings: Settings, rel: str) -> Path:
    """Resolve a stored relative path, refusing anything that would leave data_dir (a tampered row)."""
    root = settings.data_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"stored path {rel!r} points outside the data directory")
    return path


def original_path(settings: Settings, image: _StoredRow) -> Path:
    """Absolute path of an image row's stored original."""
    return _inside_data_dir(settings, image.stored_path)


def thumbnail_path(settings: Settings, image: _StoredRow) -> Path:
    """Absolute path of an image row's grid thumbnail."""
    return _inside_data_dir(settings, image.thumb_path)
