"""SKUs: the catalogue's stock-keeping unit for the product a photo shows (`images.sku`): checked, set and searched.

A SKU comes with the labels CSV (an optional `sku` column) or from `images set-sku`. Several photos may show one
product, so a SKU is not unique. It is kept as given (trimmed) and searched as typed: exactly, or by its beginning.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, select

from core.auth import Action, authorized_write, record
from core.catalog.labels import clean_actor
from core.db import Database, in_chunks
from core.errors import NotFound, ProdcatError
from core.schema import SKU_MAX_LENGTH, Image

# Unicode categories refused inside a SKU: control characters (tab, line break...), format characters (zero-width
# space, bidi overrides) and line/paragraph separators. A SKU is matched character for character, so an invisible
# character would make it unfindable.
_INVISIBLE = ("Cc", "Cf", "Zl", "Zp")


class SkuRefused(ProdcatError):
    """A SKU that cannot be stored: too long, or holding control characters."""


def clean_sku(value: str | None) -> str | None:
    """The SKU as stored (Unicode NFC, trimmed), or None for an empty one.

    Raises SkuRefused naming the SKU and the reason: longer than SKU_MAX_LENGTH characters, or holding control or
    other invisible characters."""
    cleaned = unicodedata.normalize("NFC", str(value or "")).strip()
    if not cleaned:
        return None
    if len(cleaned) > SKU_MAX_LENGTH:
        raise SkuRefused(f"SKU {cleaned[:24]!r}... is {len(cleaned)} characters long; at most {SKU_MAX_LENGTH}")
    bad = next((ch for ch in cleaned if unicodedata.category(ch) in _INVISIBLE), None)
    if bad is not None:
        raise SkuRefused(f"SKU {cleaned!r} contains a control character (U+{ord(bad):04X})")
    return cleaned


def _after_prefix(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix` in code point order (None: there is none)."""
    for cut in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[cut]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates are no characters (and cannot be encoded)
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:cut] + chr(code)
    return None


def sku_condition(text: str) -> ColumnElement[bool]:
    """WHERE term on `Image`: the SKU is `text` or starts with it, case and all.

    Written as a range on the column (`sku >= 'AB-1' AND sku < 'AB-2'`), which walks the `ix_images_sku` index on
    SQLite and on PostgreSQL; the LIKE beside it keeps the match exact under a PostgreSQL collation that orders
    strings other than by code point."""
    prefix = unicodedata.normalize("NFC", text).strip()
    terms = [Image.sku >= prefix, Image.sku.startswith(prefix, autoescape=True)]
    if (above := _after_prefix(prefix)) is not None:
        terms.append(Image.sku < above)
    return and_(*terms)


@dataclass(frozen=True)
class SkuChange:
    """One image's SKU before and after `set_sku` (None: no SKU)."""

    image_id: int
    old: str | None
    new: str | None

    @property
    def changed(self) -> bool:
        return self.old != self.new


def set_sku(db: Database, image_ids: Sequence[int], sku: str | None, *, actor: str) -> list[SkuChange]:
    """Give these images one SKU (None or "" removes it), with an audit row (audit_events) per image changed.

    Needs a labeller. Unknown ids, or a SKU `clean_sku` refuses, change nothing."""
    actor = clean_actor(actor)
    new = clean_sku(sku)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise ProdcatError("give at least one image id")
    with authorized_write(db, actor, Action.LABEL) as session:
        old: dict[int, str | None] = {}
        for chunk in in_chunks(ids):
            query = select(Image.id, Image.sku).where(Image.id.in_(chunk)).order_by(Image.id)
            old.update({i: sku for i, sku in session.execute(query.with_for_update(key_share=True))})
        missing = [i for i in ids if i not in old]
        if missing:
            raise NotFound(f"no image with id {', '.join(map(str, missing))}: nothing changed")
        changes = [SkuChange(i, old[i], new) for i in ids]
        for change in changes:
            if change.changed:
                session.get_one(Image, change.image_id).sku = new
                record(session, actor, Action.LABEL, f"image {change.image_id}", field="sku", old=change.old, new=new)
        return changes
