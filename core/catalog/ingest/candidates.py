"""Candidates: one file to import, whatever it came from (an upload, a file in a folder tree, a zip entry), with the
names it is shown under and matched on, and the walk over a folder tree."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Operating-system litter that is not a product photo; skipped silently rather than reported as refusals.
_LITTER_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}


class Refuse(Exception):
    """A candidate refused before validation (unreadable, encrypted, nested archive, over a cap)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Candidate:
    name: str  # shown to the user and stored as original_name
    read: Callable[[], bytes]  # raises Refuse
    source: str
    folder_category: str | None = None  # first folder below the root, for labels_from_folders
    label_keys: tuple[str, ...] = ()  # names to look up in a labels mapping, most specific first


@dataclass
class Skip:
    """Entries after an archive hit a cap: one refusal standing for `count` entries."""

    name: str
    reason: str
    count: int


def is_litter(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") or p.lower() in _LITTER_NAMES for p in parts)


def clean_parts(name: str) -> list[str]:
    """Path components of a zip entry or relative path, for display and labels only (never for writing)."""
    parts = name.replace("\\", "/").split("/")  # not PurePosixPath: this runs several times per imported file
    return [p for p in parts if p not in ("", ".", "..") and not p.endswith(":")]


def is_plain_name(name: str) -> bool:
    """A relative entry name with no '..' and no drive or root: the only kind whose folders become labels."""
    raw = PurePosixPath(name.replace("\\", "/"))
    return not raw.is_absolute() and ".." not in raw.parts and not (raw.parts and raw.parts[0].endswith(":"))


def norm_key(name: str) -> str:
    """The form names are matched in: separators unified, `.`/`..` dropped, and NFC-normalised, so a name macOS
    stored decomposed (Finder's zips, HFS+ folders) matches the same name typed or saved composed (a CSV)."""
    return "/".join(clean_parts(unicodedata.normalize("NFC", name.strip())))


def upload_bytes(upload: object) -> bytes:
    data = getattr(upload, "data", None)
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(upload, "getvalue"):
        return bytes(upload.getvalue())
    return bytes(upload.read())  # type: ignore[attr-defined]  # any other file-like upload: read() is duck-typed


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def read_file(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, refused when it is larger than `max_bytes` (checked on the opened file, then while reading:
    a file that grows meanwhile is refused too, not read without bound).

    Plain os calls, no Python file object: an import reads thousands of files on one thread, and each system call
    hands the interpreter lock to a decoding thread and waits to get it back (a file object costs three more)."""
    try:
        fd = os.open(path, _READ_FLAGS)
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes:
                raise Refuse(f"file is {size:,} bytes, larger than the limit of {max_bytes:,} bytes")
            chunks = [os.read(fd, size + 1)]  # a regular file: its bytes, then an empty read at its end
            total = len(chunks[0])
            while chunks[-1] and total <= max_bytes:
                chunks.append(os.read(fd, max(size, 65536)))
                total += len(chunks[-1])
        finally:
            os.close(fd)
    except OSError as exc:
        raise Refuse(f"cannot be read ({exc.strerror or exc})") from exc
    if total > max_bytes:
        raise Refuse(f"file is more than {max_bytes:,} bytes, larger than the limit (it grew while being read)")
    return chunks[0] if len(chunks) <= 2 else b"".join(chunks)  # [data, b""] for a whole read: no copy


def peek(path: Path) -> bytes:
    """The file's first 4 bytes (b"" when it cannot be read: that is reported when the file itself is read)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return b""
    try:
        return os.read(fd, 4)
    except OSError:
        return b""
    finally:
        os.close(fd)


LINK_OUTSIDE_FOLDER = "a link to a file outside the folder: not followed (copy the file into the folder instead)"


def walk_folder(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Files under root, sorted, each with None or the reason it is refused.

    Hidden and OS-litter folders and files are skipped; symlinked folders are not followed, and a symlinked file is
    refused when its target lies outside root (a folder typed in the web page must not read the rest of the disk).
    """
    inside = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_litter([d]))
        for filename in sorted(filenames):
            if is_litter([filename]):
                continue
            path = Path(dirpath) / filename
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop
                    yield path, "a link that cannot be followed (it loops)"
                    continue
                if not target.is_relative_to(inside):
                    yield path, LINK_OUTSIDE_FOLDER
                    continue
            yield path, None
