"""Keyboard review: one photo at a time, a fixed hotkey per category, like the annotation tools.

Keys 1-9, 0, then letters (C and R are Streamlit's own, U is Undo on the Review page) go to the categories once, in
category order with names that start with a letter or digit first, so a key means the same category on every photo
and the legend can be learnt. Enter keeps the current label (a `confirm` event in the audit trail: confirmed by a
person) or accepts the prediction of an unlabelled photo; Right skips (recorded in the session). Categories beyond
the keys, and the photo's current label, stay one click away. The next photos are drawn small under the current
one, so the browser has them before the key press.

The whole block is one keyed fragment: a key press reruns it alone, not the page.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import streamlit as st

from core.db import Database
from core.labels import confirm_label
from core.review import ReviewItem, review_items
from pages._cards import label_one, prediction_text, seen_prediction
from pages._ui import actor, flash_errors, md_escape, plural

HOTKEYS = [*"1234567890", *(c for c in string.ascii_lowercase if c not in "cru")]
CONFIRM_KEY = "Enter"
SKIP_KEY = "Right"
PREFETCH = 3  # photos drawn small after the current one
FRAGMENT = "keyboard_review"
LOG_KEY = "review_keyboard_log"  # what keyboard review did in this session
PREFIX = "kb"


def hotkeys(categories: Sequence[str]) -> dict[str, str]:
    """category -> its key: fixed by category order (names led by a letter or digit before names led by a symbol),
    so it never depends on the photo. Categories beyond the keys get none."""
    ordered = sorted(categories, key=lambda name: (not name[:1].isalnum(), name.casefold(), name))
    return dict(zip(ordered, HOTKEYS, strict=False))


@dataclass
class KeyboardLog:
    """This session's keyboard review: photos labelled, kept as they were (confirmed), skipped; the last action."""

    labelled: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    last: str = ""

    def describe(self) -> str:
        return (
            f"This session: {plural(len(self.labelled), 'photo')} labelled, {len(self.confirmed)} kept as labelled, "
            f"{len(self.skipped)} skipped"
        )


def keyboard_log() -> KeyboardLog:
    log = st.session_state.get(LOG_KEY)
    if not isinstance(log, KeyboardLog):
        log = st.session_state[LOG_KEY] = KeyboardLog()
    return log


def _message(image_id: int) -> tuple[str, str] | None:
    return st.session_state.pop(f"_card_msg_{PREFIX}_{image_id}", None)


def _on_label(
    db: Database, item: ReviewItem, category: str, done: list[int], also: tuple[str, ...] = (), verb: str = "labelled"
) -> None:
    if not label_one(db, item, category, prefix=PREFIX, verb=verb):
        return  # refused (e.g. archived meanwhile): stay on this photo, its card says why
    log = keyboard_log()
    log.labelled.append(item.image_id)
    shown = _message(item.image_id)
    log.last = shown[1] if shown else f"#{item.image_id} {item.original_name}: already {category}"
    done.append(item.image_id)
    if also:  # the page shows something a label change alters (a filtered queue's count): redraw that too
        st.rerun([FRAGMENT, *also])


def _on_other(db: Database, item: ReviewItem, key: str, done: list[int], also: tuple[str, ...]) -> None:
    choice = st.session_state.get(key)
    if choice is not None:
        _on_label(db, item, choice, done, also)


def _on_confirm(db: Database, item: ReviewItem, done: list[int], also: tuple[str, ...]) -> None:
    if item.label is None:
        if item.predicted is not None:
            _on_label(db, item, item.predicted, done, also, verb="accepted")
        return
    seen = seen_prediction(item)
    change = flash_errors(
        confirm_label, db, item.image_id, actor=actor(), seen_prediction=seen, expected_label=item.label
    )
    if change is None:  # refused (say, relabelled by someone else meanwhile): the photo stays, the error shows
        return
    log = keyboard_log()
    log.confirmed.append(item.image_id)
    log.last = f"#{item.image_id} {item.original_name}: kept {item.label}"
    done.append(item.image_id)


def _on_skip(item: ReviewItem, done: list[int]) -> None:
    log = keyboard_log()
    log.skipped.append(item.image_id)
    log.last = f"#{item.image_id} {item.original_name}: skipped"
    done.append(item.image_id)


def keyboard_review(
    db: Database,
    image_ids: Sequence[int],
    categories: Sequence[str],
    done: list[int],
    *,
    also_rerun: Sequence[str] = (),
) -> None:
    """The first photo of `image_ids` not in `done` (kept in session state by the page), large, with the keys.

    A key press labels, keeps or skips it and the next one comes up; the page around it is not redrawn, except the
    fragments named in `also_rerun` after a label change."""
    st.fragment(_keyboard_body, key=FRAGMENT)(db, list(image_ids), list(categories), done, tuple(also_rerun))


def _legend(keys: dict[str, str]) -> str:
    return "Keys: " + " · ".join(f"{key.upper()} {name}" for name, key in keys.items())


def _keyboard_body(
    db: Database, image_ids: list[int], categories: list[str], done: list[int], also: tuple[str, ...]
) -> None:
    handled = set(done)
    remaining = [i for i in image_ids if i not in handled]
    items = review_items(db, remaining[: 1 + PREFETCH]) if remaining else []
    log = keyboard_log()
    if log.last:
        st.caption(md_escape(f"Last: {log.last}. {log.describe()}"))
    if not items:
        st.info("Every photo on this page is done: go to the next page (below), or change the filters.")
        return
    item, upcoming = items[0], items[1:]
    keys = hotkeys(categories)
    probabilities = dict(item.top3)
    with st.container(border=True, key=f"kb_card_{item.image_id}"):
        picture, controls = st.columns([1, 2])
        picture.image(str(item.thumb_path), width="stretch")
        controls.text(f"#{item.image_id} {item.original_name}   [{item.split}]")
        controls.text(f"Label: {item.label or '(unlabelled)'}")
        controls.text(prediction_text(item))
        message = _message(item.image_id)
        if message is not None:
            controls.error(md_escape(message[1]))
        buttons = controls.columns(3)
        shown = list(keys.items())
        if item.label is not None and item.label not in keys:  # beyond the keys (or archived): still one click
            shown.append((item.label, ""))
        for n, (name, key) in enumerate(shown):
            chance = f" ({probabilities[name]:.0%})" if name in probabilities else ""
            buttons[n % 3].button(
                md_escape(f"{name}{chance}"),
                key=f"kb_pick_{item.image_id}_{key or 'label'}",
                shortcut=key or None,
                on_click=_on_label,
                args=(db, item, name, done, also),
                type="primary" if name == item.label else "secondary",
                width="stretch",
            )
        others = [c for c in categories if c not in keys and c != item.label]
        if others:  # more categories than keys: the rest are one pick away, without a key
            other_key = f"kb_other_{item.image_id}"
            controls.selectbox(
                "Other category",
                sorted(others, key=str.casefold),
                index=None,
                placeholder=f"{plural(len(others), 'more category', 'more categories')} (no key)",
                key=other_key,
                on_change=_on_other,
                args=(db, item, other_key, done, also),
            )
        confirm, skip = controls.columns(2)
        if item.label is not None:
            confirm_label = f"Keep {item.label}"
        else:
            confirm_label = f"Accept {item.predicted}" if item.predicted is not None else "Nothing to accept"
        confirm.button(
            md_escape(confirm_label),
            key=f"kb_confirm_{item.image_id}",
            shortcut=CONFIRM_KEY,
            on_click=_on_confirm,
            args=(db, item, done, also),
            disabled=item.label is None and item.predicted is None,
            width="stretch",
        )
        skip.button(
            "Skip", key=f"kb_skip_{item.image_id}", shortcut=SKIP_KEY, on_click=_on_skip, args=(item, done),
            width="stretch",
        )  # fmt: skip
    st.caption(md_escape(_legend(keys)))
    if upcoming:
        # Drawn small now, so the next photo's image is already in the browser when its key is pressed.
        st.caption("Next up")
        for column, nxt in zip(st.columns(8), upcoming, strict=False):
            column.image(str(nxt.thumb_path), width=64)
