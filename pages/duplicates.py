"""Duplicates: groups of near-duplicate images (resized, re-encoded, cropped, watermarked), keep one per group."""

from __future__ import annotations

import streamlit as st

from core.auth import Action
from core.catalog.duplicates import DuplicateGroup, duplicate_groups, keep_one
from pages import _auth, _ui

GROUPS_PER_PAGE = 10

db = _ui.get_db()
_auth.require(Action.DELETE_IMAGES)
_ui.show_flash()
st.title("Duplicates")
st.caption(
    "Copies of one picture (resized, re-encoded, slightly cropped or watermarked) share a split. "
    "Keep one image per group: the others are deleted, each with an audit record of its name and label."
)


@st.fragment
def show_group(group: DuplicateGroup) -> None:
    with st.container(border=True, key=f"dup_group_{group.group_id}"):
        st.subheader(f"Group {group.group_id}: {len(group.members)} images")
        if group.straddles_splits:
            st.warning(
                f"This group spans the {' and '.join(group.splits)} splits (imported before duplicates were "
                "detected). Splits never change, so model versions stay comparable: keep one image to resolve it."
            )
        for column, member in zip(st.columns(min(len(group.members), 4)), group.members, strict=False):
            with column:
                st.image(str(member.thumb_path), width="stretch")
                st.text(f"#{member.image_id} {member.name}")
                st.text(f"{member.label or '(unlabelled)'}   [{member.split}]   {member.width}x{member.height}")
                if st.button("Keep this one", key=f"dup_keep_{group.group_id}_{member.image_id}"):
                    ids = [m.image_id for m in group.members]
                    ok, deleted = _ui.attempt(keep_one, db, ids, member.image_id, actor=_ui.actor())
                    if ok:
                        _ui.flash("success", f"Kept #{member.image_id}; deleted {len(deleted)} duplicate(s).")
                        st.rerun()


page = int(st.session_state.get("dup_page", 1))
report = duplicate_groups(db, page=page, page_size=GROUPS_PER_PAGE)
st.session_state["dup_page"] = report.page  # the last page, when groups were resolved since this one was chosen
if report.unchecked:
    st.info(
        f"{report.unchecked:,} image(s) have not been checked for near-duplicates (imported before duplicate groups "
        "were stored, or their original could not be read): run `python -m core.cli duplicates scan` once."
    )
counts = report.counts
if not counts.groups:
    st.success("No near-duplicates among the checked images.")
else:
    st.write(
        f"{counts.groups:,} group(s) holding {counts.images:,} images; {counts.straddling:,} span more than one split "
        "(listed first, then the biggest groups)."
    )
    if report.pages > 1:
        st.number_input("Page", min_value=1, max_value=report.pages, step=1, key="dup_page")
    for group in report.groups:
        show_group(group)
