"""Image cards: a photo with its label and prediction, one-click labelling, and the history and similar-images dialogs.

A card's body is a keyed fragment, so a click on it reruns that card alone (re-read from the database), not the page:

- pick a category, Accept prediction, Relabel as X: the card, plus the fragments the page names in `also_rerun`
  (the Review page's count line: a label change can take a photo out of a filtered queue; the card stays, showing
  its new label, until the page is drawn again, so the person sees what they did and can undo it);
- Select (outside the body, under it): the fragments named in `on_select` (the upload page's bulk bar, whose button
  says how many photos it labels), else nothing;
- a relabel from the Similar dialog changes many cards, a new category (New category, to roles that may add one)
  changes every card's picker, and Delete (admins; the page passes a `CardDelete`) changes the grid and its count: the
  whole page reruns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st

from core.auth import Action
from core.catalog.deletion import delete_images
from core.catalog.labels import SeenPrediction, audit_trail, bulk_relabel, set_label
from core.db import Database
from core.errors import LabelConflict
from core.views.review import ReviewItem, review_items
from core.views.similar import similar_images
from pages import _auth
from pages._ui import actor, attempt, flash, md_escape, percent, refusal_of, remember_changes, typed_category


@dataclass(frozen=True)
class CardDelete:
    """Delete on every card of a grid (give it only to accounts that may delete images: core refuses the others
    anyway): the reason the audit row records when the person types none, and what the page does with the id of a
    photo once it is deleted (before the whole page reruns), e.g. drop it from the upload's list."""

    default_reason: str
    on_deleted: Callable[[int], None] | None = None


def shown_labels(items: Sequence[ReviewItem]) -> dict[int, str | None]:
    """The label each card showed: a bulk change refuses (naming them) images relabelled elsewhere since."""
    return {item.image_id: item.label for item in items}


def seen_prediction(item: ReviewItem) -> SeenPrediction | None:
    """What the card showed of the model's prediction (recorded with the person's decision)."""
    return _seen(item)


def _seen(item: ReviewItem) -> SeenPrediction | None:
    if item.predicted_category_id is None or item.model_version_id is None or item.confidence is None:
        return None
    return SeenPrediction(item.model_version_id, item.predicted_category_id, float(item.confidence))


def seen_predictions(items: Sequence[ReviewItem]) -> dict[int, SeenPrediction | None]:
    """What the grid showed for each image: the audit row of a bulk change records it, like a one-click one."""
    return {item.image_id: _seen(item) for item in items}


def fragment_key(prefix: str, image_id: int) -> str:
    """The name of a card's fragment (st.rerun(<name>) from a callback redraws just that card)."""
    return f"{prefix}_frag_{image_id}"


def _message_key(prefix: str, image_id: int) -> str:
    return f"_card_msg_{prefix}_{image_id}"


def label_one(db: Database, item: ReviewItem, category: str, *, prefix: str, verb: str = "labelled") -> bool:
    """Label one photo as the person chose, with what the model showed them; remembered for this session's undo.

    The outcome is shown in the card `prefix` draws for the photo. False when refused."""
    try:
        change = set_label(
            db, item.image_id, category, actor=actor(), seen_prediction=_seen(item), expected_label=item.label
        )
    except LabelConflict as exc:  # changed by someone else since this card was drawn: show theirs, let them choose
        st.session_state[_message_key(prefix, item.image_id)] = ("error", f"{exc} The card now shows their label.")
        return False
    except Exception as exc:
        refusal = refusal_of(exc)  # a refusal, or a database/disk failure in plain words
        if refusal is None:
            raise
        st.session_state[_message_key(prefix, item.image_id)] = ("error", str(refusal))
        return False
    remember_changes([change])
    if change.changed:
        st.session_state[_message_key(prefix, item.image_id)] = (
            "success",
            f"#{item.image_id} {item.original_name}: {verb} {category}",
        )
    return True


def _rerun(keys: Sequence[str]) -> None:
    """From a callback: redraw just these fragments (instead of the one the widget sits in, or the page)."""
    if keys:
        st.rerun(list(keys))


def _on_label(
    db: Database, item: ReviewItem, category: str | None, prefix: str, verb: str, also: tuple[str, ...]
) -> None:
    if category is not None and label_one(db, item, category, prefix=prefix, verb=verb) and also:
        _rerun([fragment_key(prefix, item.image_id), *also])


def _on_pick(db: Database, item: ReviewItem, key: str, prefix: str, also: tuple[str, ...]) -> None:
    choice = st.session_state.get(key)
    if choice is None:  # clicking the selected pill again deselects it: keep showing the stored label
        st.session_state[key] = item.label
        return
    _on_label(db, item, choice, prefix, "labelled", also)


def _in_card(prefix: str, image_id: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Run a core call for one card: (True, result), or (False, None) with the refusal (or a database/disk failure
    in plain words) shown in that card. Anything else is a bug and propagates."""
    try:
        return True, fn(*args, **kwargs)
    except Exception as exc:
        refusal = refusal_of(exc)
        if refusal is None:
            raise
        st.session_state[_message_key(prefix, image_id)] = ("error", str(refusal))
        return False, None


def _on_new(db: Database, item: ReviewItem, key: str, prefix: str) -> None:
    """The New category form: create the typed category (or take the existing one of that name) and label with it."""
    name = str(st.session_state.get(key) or "").strip()
    if not name:
        st.session_state[_message_key(prefix, item.image_id)] = ("error", "Type the new category's name first.")
        return
    ok, category = _in_card(prefix, item.image_id, typed_category, db, name)
    if ok and label_one(db, item, category, prefix=prefix):
        st.rerun()  # every card's picker (and the page's filters) gains the category: the whole page


def _on_delete(db: Database, item: ReviewItem, reason_key: str, prefix: str, delete: CardDelete) -> None:
    reason = str(st.session_state.get(reason_key) or "").strip() or delete.default_reason
    ok, _ = _in_card(prefix, item.image_id, delete_images, db, [item.image_id], actor=actor(), reason=reason)
    if not ok:
        return
    if delete.on_deleted is not None:
        delete.on_deleted(item.image_id)
    flash("success", f"Deleted #{item.image_id} {item.original_name} ({reason})")
    st.rerun()  # the grid and its count change: the whole page


def new_category_form(db: Database, item: ReviewItem, *, prefix: str) -> None:
    """`New category`: a popover to type a category that does not exist yet; Enter creates it and labels the photo."""
    with st.popover("New category", icon=":material/add:", width="stretch"):
        key = f"{prefix}_new_{item.image_id}"
        with st.form(f"{prefix}_new_form_{item.image_id}", border=False, clear_on_submit=True):
            st.text_input("New category for this photo", key=key, placeholder="e.g. Sandals")
            st.form_submit_button(
                "Create and label",
                key=f"{prefix}_new_go_{item.image_id}",
                on_click=_on_new,
                args=(db, item, key, prefix),
            )


def _delete_control(db: Database, item: ReviewItem, prefix: str, delete: CardDelete) -> None:
    """`Delete`: a popover that says what goes, with an optional reason, and the button that does it."""
    with st.popover("Delete", icon=":material/delete:"):
        st.text(
            f"Delete #{item.image_id} {item.original_name} for good: its file, label and predictions. An audit row "
            "keeps its name, hash and label."
        )
        reason_key = f"{prefix}_delete_reason_{item.image_id}"
        st.text_input("Reason (optional)", key=reason_key, placeholder="e.g. not a product photo")
        st.button(
            "Delete permanently",
            key=f"{prefix}_delete_{item.image_id}",
            type="primary",
            on_click=_on_delete,
            args=(db, item, reason_key, prefix, delete),
        )


def suggestion_text(item: ReviewItem) -> str | None:
    """`Label check: probably Shirt (81%); this label's quality 4%`, where the check doubts the label."""
    if not item.suggests_change or item.suggestion is None:
        return None
    s = item.suggestion
    flag = "likely wrong label" if s.issue else "doubtful label"
    return f"Label check: {flag}, probably {s.category} ({percent(s.probability)}); quality {percent(s.quality)}"


@st.dialog("Label history", width="large")
def show_audit(db: Database, image_id: int, name: str) -> None:
    """The audit trail of one image, newest first."""
    st.text(f"#{image_id} {name}")
    ok, rows = attempt(audit_trail, db, image_id)
    if not ok:
        return
    if not rows:
        st.text("No label changes yet.")
        return
    st.dataframe(
        [
            {
                "time (UTC)": r.time.strftime("%Y-%m-%d %H:%M:%S"),
                "who": r.actor,
                "action": r.action,
                "from": r.old_category or "",
                "to": r.new_category or "",
                "model saw": (
                    f"{r.predicted_category} ({r.predicted_confidence:.0%})"
                    if r.predicted_category and r.predicted_confidence is not None
                    else ""
                ),
                "note": r.note,
            }
            for r in rows
        ],
        hide_index=True,
    )


@st.dialog("Similar images", width="large")
def show_similar(db: Database, item: ReviewItem, categories: list[str]) -> None:
    """The photos most like this one to the active model, to relabel a whole cluster of one mistake at once."""
    ok, found = attempt(similar_images, db, item.image_id)
    if not ok:
        return
    if not found:
        st.text("Nothing to compare with yet: similar images need a trained model (retrain once).")
        return
    st.text(f"The {len(found)} photos most like #{item.image_id} {item.original_name}, to the active model")
    chosen = [item.image_id] if st.checkbox(f"Include #{item.image_id} itself", value=True, key="sim_self") else []
    columns = st.columns(4)
    for n, near in enumerate(found):
        with columns[n % 4]:
            st.image(str(near.item.thumb_path), width="stretch")
            st.text(f"#{near.item.image_id} {near.item.original_name}")
            st.text(f"Label: {near.item.label or '(unlabelled)'}  ({near.similarity:.0%} alike)")
            if st.checkbox("Select", value=True, key=f"sim_{item.image_id}_{near.item.image_id}"):
                chosen.append(near.item.image_id)
    target = st.selectbox("Relabel the selected photos as", categories, index=None)  # selectboxes show plain text
    if st.button(f"Relabel {len(chosen)} selected", disabled=not chosen or target is None, type="primary"):
        shown = seen_predictions([item, *(near.item for near in found)])
        labels = shown_labels([item, *(near.item for near in found)])
        ok, changes = attempt(
            bulk_relabel, db, chosen, target, actor=actor(), seen_predictions=shown, expected_labels=labels
        )
        if ok:
            remember_changes(changes)
            flash("success", f"{len(changes)} similar photos relabelled {target}")
            st.rerun()  # many cards changed: the whole page


def prediction_text(item: ReviewItem) -> str:
    """`Predicted: Shoes (93%)` or that there is none."""
    if item.predicted is None:
        return "Predicted: (no model prediction)"
    return f"Predicted: {item.predicted} ({percent(item.confidence)})"


def _card_body(
    db: Database,
    first: list[ReviewItem],
    image_id: int,
    categories: list[str],
    prefix: str,
    also: tuple[str, ...],
    delete: CardDelete | None,
) -> None:
    """The card's fragment. `first` holds the item the page run read: used once; a rerun of this fragment alone
    (after a click on it) reads the photo afresh, so the card shows its new label."""
    if first:
        item = first.pop()
    else:
        found = review_items(db, [image_id])
        if not found:
            st.text(f"#{image_id}: no longer in the catalogue")
            return
        item = found[0]
    st.image(str(item.thumb_path), width="stretch")
    st.text(f"#{item.image_id} {item.original_name}")
    if item.sku is not None:
        st.text(f"SKU: {item.sku}")
    st.text(f"Label: {item.label or '(unlabelled)'}   [{item.split}]")
    st.text(prediction_text(item))
    message = st.session_state.pop(_message_key(prefix, image_id), None)
    if message is not None:
        kind, text = message
        if kind == "error":
            st.error(md_escape(text))
        else:
            st.caption(md_escape(text))
    if item.unusual:
        st.info("Unlike anything labelled so far: maybe a new category?", icon=":material/new_releases:")
    check = suggestion_text(item)
    if check is not None:
        st.warning(md_escape(check), icon=":material/report:")
        if item.suggestion is not None and item.suggestion.category in categories:
            st.button(
                md_escape(f"Relabel as {item.suggestion.category}"),
                key=f"{prefix}_suggest_{item.image_id}",
                on_click=_on_label,
                args=(db, item, item.suggestion.category, prefix, "relabelled (label check)", also),
                help="The category the label check (K-fold, out of sample) finds likeliest",
                width="stretch",
            )
    if item.top3:
        with st.popover("Top 3", width="stretch"):
            for name, probability in item.top3:
                st.text(f"{name}: {probability:.1%}")
    if item.predicted is not None and item.predicted != item.label and item.predicted in categories:
        st.button(
            "Accept prediction",
            key=f"{prefix}_accept_{item.image_id}",
            on_click=_on_label,
            args=(db, item, item.predicted, prefix, "accepted", also),
            # Prominent only where nothing is lost: on a labelled image one misclick would overwrite a person.
            type="primary" if item.label is None else "secondary",
            width="stretch",
        )
    options = list(categories)
    if item.label is not None and item.label not in options:  # e.g. an archived category
        options.append(item.label)
    # The key carries the stored label, so a change made elsewhere (bulk, undo) shows up fresh here.
    key = f"{prefix}_pick_{item.image_id}_{item.label}"
    if key not in st.session_state:
        st.session_state[key] = item.label
    st.pills(
        "Category",
        options,
        key=key,
        format_func=md_escape,
        on_change=_on_pick,
        args=(db, item, key, prefix, also),
        label_visibility="collapsed",
    )
    if _auth.may(Action.ADD_CATEGORY):
        new_category_form(db, item, prefix=prefix)
    # One row that wraps: three fixed columns cut the labels to "Si..." / "Hi..." in a four-card row.
    with st.container(horizontal=True, wrap=True):
        if st.button("Similar", key=f"{prefix}_similar_{item.image_id}", disabled=item.model_version_id is None):
            show_similar(db, item, categories)
        if st.button("History", key=f"{prefix}_hist_{item.image_id}"):
            show_audit(db, item.image_id, item.original_name)
        if delete is not None:
            _delete_control(db, item, prefix, delete)


def image_card(
    db: Database,
    item: ReviewItem,
    categories: list[str],
    *,
    prefix: str,
    also_rerun: Sequence[str] = (),
    on_select: Sequence[str] = (),
    delete: CardDelete | None = None,
) -> bool:
    """One image: thumbnail, name, SKU, label, prediction (top 3 on demand), one-click labelling, a selection box, and
    with `delete` (pass one only where the account may delete images) a Delete that asks first.

    Returns whether the image is selected. See the module docstring for what each click reruns.
    """
    # The key names the card in the page (CSS class st-key-<key>), which the browser test relies on.
    with st.container(border=True, key=f"{prefix}_card_{item.image_id}"):
        body = st.fragment(_card_body, key=fragment_key(prefix, item.image_id))
        body(db, [item], item.image_id, categories, prefix, tuple(also_rerun), delete)
        selected = st.checkbox(
            "Select",
            key=_selection_key(prefix, item.image_id),
            on_change=_rerun,
            # Nothing else shows the selection: redraw only what counts it (the box itself is drawn by the browser).
            args=(list(on_select) or [fragment_key(prefix, item.image_id)],),
        )
    return bool(selected)


def _selection_key(prefix: str, image_id: int) -> str:
    return f"{prefix}_sel_{image_id}"


def clear_selection(prefix: str) -> None:
    """Untick every box of the grid `prefix` on the next run (after a bulk change: the ticks were for that change).

    A widget drawn in this run cannot be changed any more, so the boxes are reset before the grid is drawn again.
    """
    st.session_state[f"_clear_{prefix}_sel"] = True


def ticked(items: Sequence[ReviewItem] | Sequence[int], *, prefix: str) -> list[int]:
    """Ids of the images (items or ids) ticked in the grid `prefix`, readable before the grid is drawn."""
    if st.session_state.pop(f"_clear_{prefix}_sel", False):
        for key in [k for k in st.session_state if str(k).startswith(f"{prefix}_sel_")]:
            st.session_state[key] = False  # a write (not a delete) so the browser unticks the box too
    ids = [i if isinstance(i, int) else i.image_id for i in items]
    return [i for i in ids if st.session_state.get(_selection_key(prefix, i))]


def card_grid(
    db: Database,
    items: Sequence[ReviewItem],
    categories: list[str],
    *,
    prefix: str,
    per_row: int = 4,
    also_rerun: Sequence[str] = (),
    on_select: Sequence[str] = (),
    delete: CardDelete | None = None,
) -> list[int]:
    """Cards in rows of `per_row` (`delete` as in image_card); returns the ids of the selected images."""
    ticked(items, prefix=prefix)  # a pending clear_selection unticks the boxes before they are drawn
    selected: list[int] = []
    for start in range(0, len(items), per_row):
        columns = st.columns(per_row)
        for column, item in zip(columns, items[start : start + per_row], strict=False):
            with column:
                is_ticked = image_card(
                    db, item, categories, prefix=prefix, also_rerun=also_rerun, on_select=on_select, delete=delete
                )
                if is_ticked:
                    selected.append(item.image_id)
    return selected
