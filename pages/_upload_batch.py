"""The upload page's record of one upload: what each import call stored, repeated, refused, and what is still to go.

Kept in session state and filled a chunk at a time, so an import cut short (the person opened another page, which
stops the page's script) still says what was stored and keeps the rest to resume.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from core.catalog.ingest import ImportResult, Upload
from core.catalog.labels import usable_category_name
from core.db import Database
from core.errors import CategoryError
from pages._ui import plural


def category_problem(db: Database, name: str) -> str | None:
    """Why the upload's category cannot take photos (too long, archived), in full, or None. Checked before any file
    is read, so one bad name refuses nothing silently and leaves the chosen files where they are."""
    try:
        usable_category_name(db, name)
    except CategoryError as exc:
        return f"Nothing was imported: {exc}."
    return None


@dataclass
class Batch:
    total: int
    category: str | None
    pending: list[Upload]
    processed: int = 0
    imported: list[tuple[str, int]] = field(default_factory=list)
    duplicates: list[tuple[str, int, str]] = field(default_factory=list)  # (file, image id, that image's name)
    refused: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)  # photos of this upload deleted on their cards since

    @classmethod
    def start(cls, uploads: list[Upload], *, category: str | None) -> Batch:
        return cls(total=len(uploads), category=category, pending=list(uploads))

    def add(self, result: ImportResult, *, done: int) -> None:
        """Record one import call's result over the next `done` pending uploads."""
        self.imported += [(i.name, i.image_id) for i in result.imported]
        self.duplicates += [(d.name, d.image_id, d.existing_name) for d in result.duplicates]
        self.refused += [(r.name, r.reason) for r in result.refused]
        self.notes += [n for n in result.notes if n not in self.notes]
        self.pending = self.pending[done:]
        self.processed += done

    def add_stopped(self, result: ImportResult, chunk: list[Upload]) -> None:
        """Record what an import call of `chunk` stored before an error stopped it (`stored_before`).

        An import reports in input order, so the uploads it accounts for lead `chunk`: those leave the pending list
        with their outcomes. A zip cut off part-way stays pending whole, and its entries' outcomes are not recorded
        (the entries it stored come back as duplicates when it is imported again)."""
        left = Counter([*(i.name for i in result.imported), *(d.name for d in result.duplicates)])
        left.update(r.name for r in result.refused)
        done = 0
        while done < len(chunk) and left[chunk[done].name] > 0:  # two uploads of one name need two outcomes
            left[chunk[done].name] -= 1
            done += 1
        room = Counter(u.name for u in chunk[:done])

        def covered(name: str) -> bool:
            room[name] -= 1
            return room[name] >= 0

        self.add(
            ImportResult(
                imported=[i for i in result.imported if covered(i.name)],
                duplicates=[d for d in result.duplicates if covered(d.name)],
                refused=[r for r in result.refused if covered(r.name)],
                notes=result.notes,
            ),
            done=done,
        )

    @property
    def imported_ids(self) -> list[int]:
        return [i for _, i in self.imported]

    def forget(self, image_id: int) -> None:
        """The photo was deleted (on its card): no longer shown; the summary says so."""
        if image_id not in self.deleted:
            self.deleted.append(image_id)

    @property
    def ids(self) -> list[int]:
        """The photos to show: new ones, then the catalogue's copies of duplicates (each once), less the deleted."""
        shown = dict.fromkeys([*self.imported_ids, *(i for _, i, _ in self.duplicates)])
        return [i for i in shown if i not in self.deleted]

    def repeated(self) -> list[tuple[str, int, str]]:
        """Duplicates of a photo this same upload brought in (not earlier catalogue photos)."""
        new = set(self.imported_ids)
        return [d for d in self.duplicates if d[1] in new]

    def existing(self) -> list[tuple[str, int, str]]:
        """Duplicates of photos that were in the catalogue before this upload."""
        new = set(self.imported_ids)
        return [d for d in self.duplicates if d[1] not in new]

    def summary(self) -> str:
        duplicates = plural(len(self.duplicates), "duplicate")
        deleted = f", {len(self.deleted)} deleted since" if self.deleted else ""
        return f"{len(self.imported)} imported, {duplicates}, {len(self.refused)} refused{deleted}"

    def interrupted_text(self) -> str:
        stored = len(self.imported) + len(self.duplicates)
        refused = f", {len(self.refused)} refused" if self.refused else ""
        return (
            f"Import interrupted: {stored} of {plural(self.total, 'file')} stored{refused}; "
            f"{len(self.pending)} not imported: import them with the button below, or upload them again. "
            "(Any stored just before the interruption show up as duplicates.)"
        )
