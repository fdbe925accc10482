"""Keyboard review: one photo at a time, a fixed hotkey per category, like the annotation tools.

Keys 1-9, 0, then letters (C and R are Streamlit's own, U is Undo on the Review page) go to the categories once:
first the keys pinned to categories (`PRODCAT_REVIEW_KEYS`, e.g. `Shoes=s,Bags=b`, changed per browser session under
Change keys), then the keys this session has shown already (a category added meanwhile takes a free key instead of
moving the others), then the free keys in category order with names that start with a letter or digit first. So a key
means the same category on every photo and the legend can be learnt. Enter keeps the current label (a `confirm` event
in the audit trail: confirmed by a person) or accepts the prediction of an unlabelled photo; Right skips (a `skip`
event: who set it aside, when; not a change, never undone): the photo leaves this page's queue (the session count
says how many are skipped) until the rest is done and the person asks for the skipped ones again, which then say when
they were skipped. Categories beyond the keys, a new category, and the photo's current label stay one click away. The
next photos are drawn small under the current one, so the browser has them before the key press.

The whole block is one keyed fragment: a key press reruns it alone, not the page.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from core.auth import Action
from core.catalog.labels import confirm_label, record_skip
from core.db import Database
from core.settings import REVIEW_HOTKEYS
from core.views.review import ReviewItem, review_items
from pages import _auth
from pages._cards import label_one, prediction_text, seen_prediction
from pages._ui import actor, flash_errors, md_escape, plural, refusal_of, typed_category

HOTKEYS = list(REVIEW_HOTKEYS)
CONFIRM_KEY = "Enter"
SKIP_KEY = "Right"
PREFETCH = 3  # photos drawn small after the current one
FRAGMENT = "keyboard_review"
LOG_KEY = "review_keyboard_log"  # what keyboard review did in this session
PINS_KEY = "review_keyboard_pins"  # category -> key pinned in this session (starts as PRODCAT_REVIEW_KEYS)
SHOWN_KEYS_KEY = "review_keyboard_keys"  # the keys last shown, kept while categories come and go
KEYS_NOTE_KEY = "_kb_keys_note"  # what the last pin or unpin did
PIN_CATEGORY_KEY = "kb_pin_category"
PIN_KEY_KEY = "kb_pin_key"
PREFIX = "kb"
# Streamlit's button shortcuts ignore a key pressed while a form control has the focus, and after a click on the
# Keyboard review toggle the toggle's checkbox keeps it: the first key press did nothing until the person clicked into
# the page. This takes the focus off such a control (never off a text field the person is typing in) when keyboard
# review appears: switched on, or the page opened in it. It runs when the element is first drawn, not at every key
# press (an unchanged st.html is not drawn again). A constant: no user text goes into it.
FOCUS_SCRIPT = """<script>
(() => {
  const el = document.activeElement;
  if (!el || el === document.body) return;
  const textTypes = ["text", "search", "email", "number", "password", "tel", "url", "date", "time"];
  const typing = el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT"
    || (el.tagName === "INPUT" && textTypes.includes(el.type));
  if (!typing) el.blur();
})();
</script>"""


def hotkeys(
    categories: Sequence[str], *, pinned: Mapping[str, str] | None = None, kept: Mapping[str, str] | None = None
) -> dict[str, str]:
    """category -> its key, in key order (as the legend shows them); it never depends on the photo.

    Pinned keys first (names matched case aside; a pin to no live category, or to a key given already, is left out),
    then the keys `kept` from the last assignment, then the free keys in category order (names led by a letter or digit
    before names led by a symbol). Categories beyond the keys get none."""
    live = set(categories)
    by_fold = {name.casefold(): name for name in categories}
    free = list(HOTKEYS)
    chosen: dict[str, str] = {}

    def give(name: str | None, key: str) -> None:
        if name is not None and name not in chosen and key in free:
            chosen[name] = key
            free.remove(key)

    for name, key in (pinned or {}).items():
        give(by_fold.get(name.casefold()), key)
    for name, key in (kept or {}).items():
        give(name if name in live else None, key)
    for name in sorted(categories, key=lambda name: (not name[:1].isalnum(), name.casefold(), name)):
        if free:
            give(name, free[0])
    return dict(sorted(chosen.items(), key=lambda pair: HOTKEYS.index(pair[1])))


def session_pins(db: Database) -> dict[str, str]:
    """The keys pinned in this browser session: the team's (PRODCAT_REVIEW_KEYS) until the person changes them."""
    pins = st.session_state.get(PINS_KEY)
    if not isinstance(pins, dict):
        pins = st.session_state[PINS_KEY] = dict(db.settings.review_keys)
    return pins


@dataclass
class KeyboardLog:
    """This session's keyboard review: photos labelled, kept as they were (confirmed), skipped and not done since
    (image id -> when, in skip order), the skipped ones the person asked to see again; the last action."""

    labelled: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    again: list[int] = field(default_factory=list)
    last: str = ""

    def settled(self, image_id: int) -> None:
        """The photo was labelled or kept: no longer skipped."""
        self.skipped.pop(image_id, None)
        if image_id in self.again:
            self.again.remove(image_id)

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
    log.settled(item.image_id)
    shown = _message(item.image_id)
    log.last = shown[1] if shown else f"#{item.image_id} {item.original_name}: already {category}"
    done.append(item.image_id)
    if also:  # the page shows something a label change alters (a filtered queue's count): redraw that too
        st.rerun([FRAGMENT, *also])


def _on_other(
    db: Database, item: ReviewItem, key: str, categories: list[str], done: list[int], also: tuple[str, ...]
) -> None:
    choice = st.session_state.get(key)
    if choice is None:
        return
    if choice in categories:
        _on_label(db, item, choice, done, also)
        return
    try:  # typed: an existing category in other case or spacing, or a new one
        category = typed_category(db, choice)
    except Exception as exc:
        refusal = refusal_of(exc)  # a refusal, or a database/disk failure in plain words
        if refusal is None:
            raise
        st.session_state[f"_card_msg_{PREFIX}_{item.image_id}"] = ("error", str(refusal))
        return
    _on_label(db, item, category, done)
    st.rerun()  # a new category: it takes a key, and the page's pickers and filters show it


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
    log.settled(item.image_id)
    log.last = f"#{item.image_id} {item.original_name}: kept {item.label}"
    done.append(item.image_id)


def _on_skip(db: Database, item: ReviewItem) -> None:
    """Set the photo aside: a `skip` event in the audit trail (who, when; not a change, never undone), then the next."""
    try:
        record_skip(db, item.image_id, actor=actor(), seen_prediction=seen_prediction(item))
    except Exception as exc:
        refusal = refusal_of(exc)  # e.g. deleted meanwhile, or a database failure in plain words
        if refusal is None:
            raise
        st.session_state[f"_card_msg_{PREFIX}_{item.image_id}"] = ("error", str(refusal))
        return
    log = keyboard_log()
    log.settled(item.image_id)  # skipped again: to the back once more
    log.skipped[item.image_id] = datetime.now().strftime("%H:%M")
    log.last = f"#{item.image_id} {item.original_name}: skipped (it can come back after the rest of this page)"


def _on_again(image_ids: list[int]) -> None:
    keyboard_log().again = list(image_ids)


def queue(
    image_ids: Sequence[int], done: Collection[int], skipped: Mapping[int, str], again: Collection[int] = ()
) -> tuple[list[int], list[int]]:
    """(to show, skipped and set aside): the photos of the page still to do in the order keyboard review shows them
    (not skipped ones in queue order, then the skipped ones asked `again`, longest skipped first), and the skipped ones
    not asked again."""
    handled = set(done)
    fresh = [i for i in image_ids if i not in handled and i not in skipped]
    on_page = set(image_ids)
    back = [i for i in skipped if i in on_page and i not in handled]
    return fresh + [i for i in back if i in again], [i for i in back if i not in again]


def _note_keys(kind: str, text: str) -> None:
    st.session_state[KEYS_NOTE_KEY] = (kind, text)


def _on_pin(db: Database, keys: dict[str, str]) -> None:
    """Pin the chosen key to the chosen category for this session; a key pinned to another category is refused."""
    name, key = st.session_state.get(PIN_CATEGORY_KEY), st.session_state.get(PIN_KEY_KEY)
    if name is None or key is None:
        _note_keys("error", "Choose a category and a key first.")
        return
    pins = session_pins(db)
    holder = next((other for other, k in pins.items() if k == key and other.casefold() != name.casefold()), None)
    if holder is not None and holder.casefold() in {c.casefold() for c in keys}:
        _note_keys("error", f"{key.upper()} is pinned to {holder}: unpin it first, or choose another key.")
        return
    for other in [o for o in pins if o.casefold() == name.casefold() or o == holder]:
        del pins[other]  # the category's old pin, and a pin of this key to a category that is gone
    pins[name] = key
    moved = next((other for other, k in keys.items() if k == key and other != name), None)
    _note_keys("success", f"{key.upper()} is now {name}" + (f"; {moved} takes a free key" if moved else ""))


def _on_unpin(db: Database, name: str) -> None:
    key = session_pins(db).pop(name, None)
    if key is not None:
        _note_keys("success", f"{key.upper()} is no longer pinned to {name}")


def _on_team_keys(db: Database) -> None:
    st.session_state[PINS_KEY] = dict(db.settings.review_keys)
    _note_keys("success", "Back to the team's keys (PRODCAT_REVIEW_KEYS)")


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
    fragments named in `also_rerun` after a label change. The first key press acts at once (see FOCUS_SCRIPT)."""
    st.html(FOCUS_SCRIPT, unsafe_allow_javascript=True)
    st.fragment(_keyboard_body, key=FRAGMENT)(db, list(image_ids), list(categories), done, tuple(also_rerun))


def _legend(keys: dict[str, str]) -> str:
    return "Keys: " + " · ".join(f"{key.upper()} {name}" for name, key in keys.items())


def _keys_editor(db: Database, categories: list[str], keys: dict[str, str]) -> None:
    """Change keys: pin a key to a category for this browser session, unpin, or go back to the team's keys."""
    note = st.session_state.pop(KEYS_NOTE_KEY, None)
    if note is not None:
        (st.error if note[0] == "error" else st.caption)(md_escape(note[1]))
    pins = session_pins(db)
    owner = {key: name for name, key in keys.items()}
    with st.popover("Change keys", icon=":material/keyboard:"):
        st.caption("Pin a key to a category for this browser session (PRODCAT_REVIEW_KEYS sets the team's keys).")
        with st.form("kb_pin_form", border=False):
            st.selectbox("Category", sorted(categories, key=str.casefold), index=None, key=PIN_CATEGORY_KEY)
            st.selectbox(
                "Key",
                HOTKEYS,
                index=None,
                key=PIN_KEY_KEY,
                format_func=lambda k: f"{k.upper()}  ({owner[k]})" if k in owner else k.upper(),
            )
            st.form_submit_button("Pin", key="kb_pin", on_click=_on_pin, args=(db, keys))
        live = {c.casefold() for c in categories}
        for name, key in sorted(pins.items(), key=lambda pair: HOTKEYS.index(pair[1])):
            text, unpin = st.columns([3, 1], vertical_alignment="center")
            gone = "" if name.casefold() in live else " (no such category now: the key is free)"
            text.text(f"{key.upper()} {name}{gone}")
            unpin.button("Unpin", key=f"kb_unpin_{key}", on_click=_on_unpin, args=(db, name))
        if pins != db.settings.review_keys:
            st.button("Back to the team's keys", key="kb_team_keys", on_click=_on_team_keys, args=(db,))


def _keyboard_body(
    db: Database, image_ids: list[int], categories: list[str], done: list[int], also: tuple[str, ...]
) -> None:
    log = keyboard_log()
    remaining, set_aside = queue(image_ids, done, log.skipped, log.again)
    items = review_items(db, remaining[: 1 + PREFETCH]) if remaining else []
    if log.last:
        st.caption(md_escape(f"Last: {log.last}. {log.describe()}"))
    if not items:
        _all_done(set_aside)
        return
    item, upcoming = items[0], items[1:]
    keys = hotkeys(categories, pinned=session_pins(db), kept=st.session_state.get(SHOWN_KEYS_KEY))
    st.session_state[SHOWN_KEYS_KEY] = keys
    with st.container(border=True, key=f"kb_card_{item.image_id}"):
        picture, controls = st.columns([1, 2])
        picture.image(str(item.thumb_path), width="stretch")
        _describe(controls, item, log)
        _pick_buttons(controls, db, item, keys, done, also)
        _other_category(controls, db, item, keys, categories, done, also)
        _confirm_and_skip(controls, db, item, done, also)
    st.caption(md_escape(_legend(keys)))
    _keys_editor(db, categories, keys)
    if upcoming:
        # Drawn small now, so the next photo's image is already in the browser when its key is pressed.
        st.caption("Next up")
        for column, nxt in zip(st.columns(8), upcoming, strict=False):
            column.image(str(nxt.thumb_path), width=64)


def _all_done(set_aside: list[int]) -> None:
    if not set_aside:
        st.info("Every photo on this page is done: go to the next page (below), or change the filters.")
        return
    st.info(
        f"Every photo on this page is done but the {len(set_aside)} you skipped: go to the next page (below), "
        "change the filters, or look at the skipped ones again."
    )
    st.button(
        f"Show the {plural(len(set_aside), 'skipped photo')} again",
        key="kb_again",
        on_click=_on_again,
        args=(set_aside,),
    )


def _describe(controls: DeltaGenerator, item: ReviewItem, log: KeyboardLog) -> None:
    """The photo's id, name, split, SKU, label and prediction as text, and why it was skipped or refused."""
    controls.text(f"#{item.image_id} {item.original_name}   [{item.split}]")
    if item.sku is not None:
        controls.text(f"SKU: {item.sku}")
    controls.text(f"Label: {item.label or '(unlabelled)'}")
    controls.text(prediction_text(item))
    if item.image_id in log.skipped:
        when = log.skipped[item.image_id]
        controls.caption(f"You skipped this photo at {when}.")
    message = _message(item.image_id)
    if message is not None:
        controls.error(md_escape(message[1]))


def _pick_buttons(
    controls: DeltaGenerator,
    db: Database,
    item: ReviewItem,
    keys: dict[str, str],
    done: list[int],
    also: tuple[str, ...],
) -> None:
    """One button per keyed category (with its shortcut and the model's probability), and the current label's."""
    probabilities = dict(item.top3)
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


def _other_category(
    controls: DeltaGenerator,
    db: Database,
    item: ReviewItem,
    keys: dict[str, str],
    categories: list[str],
    done: list[int],
    also: tuple[str, ...],
) -> None:
    """Categories beyond the keys are one pick away, without a key; a new one is typed here (by those who may)."""
    others = [c for c in categories if c not in keys and c != item.label]
    may_add = _auth.may(Action.ADD_CATEGORY)
    if not (others or may_add):
        return
    other_key = f"kb_other_{item.image_id}"
    more = plural(len(others), "more category", "more categories") + " (no key)" if others else ""
    placeholder = f"{more}, or type a new one" if more and may_add else more or "type a new category"
    controls.selectbox(
        "Other or new category" if may_add else "Other category",
        sorted(others, key=str.casefold),
        index=None,
        placeholder=placeholder,
        accept_new_options=may_add,
        key=other_key,
        on_change=_on_other,
        args=(db, item, other_key, categories, done, also),
    )


def _confirm_and_skip(
    controls: DeltaGenerator, db: Database, item: ReviewItem, done: list[int], also: tuple[str, ...]
) -> None:
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
        "Skip",
        key=f"kb_skip_{item.image_id}",
        shortcut=SKIP_KEY,
        on_click=_on_skip,
        args=(db, item),
        width="stretch",
    )
