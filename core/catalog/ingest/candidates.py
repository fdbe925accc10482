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


def read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Refuse(f"file is {size:,} bytes, larger than the limit of {max_bytes:,} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise Refuse(f"cannot be read ({exc.strerror or exc})") from exc


def peek(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(4)
    except OSError:
        return b""  # reported when the file itself is read


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
