"""Server-side paths typed into the web pages: confined to one exchange folder, never trusted as given, and only
for accounts allowed to use server folders (admins: `Action.SERVER_FILES`)."""

from __future__ import annotations

import os
from pathlib import Path

from core.auth import Action, authorize
from core.db import Database
from core.errors import ProdcatError
from core.settings import Settings


class PathRefused(ProdcatError):
    """A path typed in the browser points outside the folder the web pages may use."""


def exchange_path(db: Database, text: str, *, actor: str) -> Path:
    """Resolve `text` (relative to the exchange folder, or absolute) and refuse anything outside that folder.

    Only an actor allowed to use server folders may (PermissionDenied otherwise), and the pages may only read and
    write below `settings.exchange_dir` (PRODCAT_SERVER_FILES_DIR); `..` and symbolic links are resolved before the
    check.
    """
    authorize(db, actor, Action.SERVER_FILES)
    root = db.settings.exchange_dir
    raw = (text or "").strip()
    if not raw:
        raise PathRefused("no path given: type a folder inside " + str(root))
    if "\x00" in raw:
        raise PathRefused(f"{raw!r}: a path cannot contain a NUL character")
    try:
        candidate = Path(raw).expanduser()  # "~/..." is the server account's home, which may hold the exchange folder
    except (RuntimeError, KeyError) as exc:  # "~someone/...": no such account (or no home) on the server
        raise PathRefused(
            f"{raw}: {raw.split('/', 1)[0]!r} is no home folder on the server: type a path inside the server "
            f"exchange folder {root}"
        ) from exc
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise PathRefused(
            f"{raw}: outside the server exchange folder {root}. Put the files there, "
            "or set PRODCAT_SERVER_FILES_DIR to the folder the web app may use."
        )
    return resolved


def exchange_file(settings: Settings, name: str, *, suffix: str | None = None) -> Path:
    """A file picked by its name inside the exchange folder: relative, no `..`, and still inside once links resolve.

    Stricter than `exchange_path`: a name chosen from a list is never absolute, so one that is (or that climbs out
    with `..`, or is a link pointing outside) was typed or forged and is refused, naming the file. `suffix` (e.g.
    `.safetensors`) is compared ignoring case.
    """
    root = settings.exchange_dir
    raw = (name or "").strip()
    if not raw:
        raise PathRefused(f"no file given: choose a file inside the server exchange folder {root}")
    if "\x00" in raw:
        raise PathRefused(f"{raw!r}: a file name cannot contain a NUL character")
    given = Path(raw)
    if given.is_absolute() or raw.startswith("~"):
        raise PathRefused(f"{raw}: give the file's name inside the server exchange folder {root}, not a full path")
    if ".." in given.parts:
        raise PathRefused(f"{raw}: '..' would leave the server exchange folder {root}")
    resolved = (root / given).resolve()
    if not resolved.is_relative_to(root):
        raise PathRefused(f"{raw}: a link pointing outside the server exchange folder {root}")
    if suffix is not None and resolved.suffix.lower() != suffix.lower():
        raise PathRefused(f"{raw}: not a {suffix} file")
    if not resolved.is_file():
        raise PathRefused(f"{raw}: no such file in the server exchange folder {root}")
    return resolved


def exchange_files(settings: Settings, *, suffix: str, max_depth: int = 3, max_entries: int = 20_000) -> list[str]:
    """Names (relative, with `/`) of the `suffix` files in the exchange folder and its sub-folders, sorted.

    The walk stops `max_depth` folders down and after `max_entries` entries, because the exchange folder also holds
    photo batches of many thousands of files and a page lists it on every run. Hidden entries and links that lead
    outside the folder are left out.
    """
    root = settings.exchange_dir
    found: list[str] = []
    seen = 0
    pending: list[tuple[Path, int]] = [(root, 0)]
    while pending and seen < max_entries:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # missing or unreadable: nothing to offer from it
            continue
        for entry in entries:
            seen += 1
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 < max_depth:
                    pending.append((path, depth + 1))
            elif entry.name.lower().endswith(suffix.lower()):
                resolved = path.resolve()
                if resolved.is_relative_to(root) and resolved.is_file():
                    found.append(path.relative_to(root).as_posix())
    return sorted(found)
