"""Server-side paths typed into the web pages: confined to one exchange folder, never trusted as given."""

from __future__ import annotations

from pathlib import Path

from core.errors import ProdcatError
from core.settings import Settings


class PathRefused(ProdcatError):
    """A path typed in the browser points outside the folder the web pages may use."""


def exchange_path(settings: Settings, text: str) -> Path:
    """Resolve `text` (relative to the exchange folder, or absolute) and refuse anything outside that folder.

    Anyone who can open the web app can type a path, so the pages may only read and write below
    `settings.exchange_dir` (PRODCAT_SERVER_FILES_DIR); `..` and symbolic links are resolved before the check.
    """
    root = settings.exchange_dir
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
