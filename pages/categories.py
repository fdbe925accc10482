"""Categories & data: add, rename, merge, archive categories; import labelled data; export labels, images, model."""

from __future__ import annotations

import streamlit as st

from core.auth import Action
from core.catalog.export import export_imagefolder, labels_csv_bytes
from core.catalog.ingest import (
    LabelSource,
    Upload,
    import_labelled_folder,
    import_labelled_upload,
)
from core.catalog.labels import (
    add_category,
    archive_category,
    delete_category,
    list_categories,
    merge_categories,
    rename_category,
    unarchive_category,
)
from core.catalog.serverfiles import exchange_path
from core.ml.backbone import backbone_choice, clear_weights_selection, use_weights_file
from core.ml.versions import active_version, checkpoint_files, model_archive_bytes
from pages import _auth, _ui

db = _ui.get_db()
_auth.require(Action.EDIT_CATEGORIES)
_ui.show_flash()
st.title("Categories & data")


def _done(ok: bool, message: str) -> None:
    if ok:
        _ui.flash("success", message)
        st.rerun()


# --- categories -----------------------------------------------------------------------------------------------------
rows = list_categories(db, include_archived=True)
live = [c.name for c in rows if not c.archived]
if rows:
    st.dataframe(
        [
            {
                "category": c.name,
                "labelled images": c.labelled,
                "archived": c.archived,
                "merged into": c.merged_into or "",
            }
            for c in rows
        ],
        hide_index=True,
    )
else:
    st.info("No categories yet: add one here, or give one when uploading.")

archived = [c.name for c in rows if c.archived and not c.merged_into]
tabs = st.tabs(["Add", "Rename", "Merge", "Archive", "Un-archive", "Delete"])
add_tab, rename_tab, merge_tab, archive_tab, unarchive_tab, delete_tab = tabs
with add_tab, st.form("add_category", clear_on_submit=True):
    name = st.text_input("New category name")
    if st.form_submit_button("Add category"):
        ok, _ = _ui.attempt(add_category, db, name, actor=_ui.actor())
        _done(ok, f"Added {name.strip()}")
with rename_tab, st.form("rename_category"):
    old = st.selectbox("Category", live, key="rename_old")
    new = st.text_input("New name")
    if st.form_submit_button("Rename") and old:
        ok, _ = _ui.attempt(rename_category, db, old, new, actor=_ui.actor())
        _done(ok, f"Renamed {old} to {new.strip()}")
with merge_tab, st.form("merge_categories"):
    source = st.selectbox("Move every label of", live, key="merge_source")
    target = st.selectbox("into", live, key="merge_target")
    st.caption("The first category is archived afterwards; its history stays in the audit trail.")
    if st.form_submit_button("Merge") and source and target:
        ok, moved = _ui.attempt(merge_categories, db, source, target, actor=_ui.actor())
        _done(ok, f"Merged {source} into {target}: {moved} labels moved")
with archive_tab, st.form("archive_category"):
    doomed = st.selectbox("Category", live, key="archive_name")
    st.caption("Archived categories receive no new labels; images keep the labels they have.")
    if st.form_submit_button("Archive") and doomed:
        ok, _ = _ui.attempt(archive_category, db, doomed, actor=_ui.actor())
        _done(ok, f"Archived {doomed}")
with unarchive_tab, st.form("unarchive_category"):
    revived = st.selectbox("Archived category", archived, key="unarchive_name")
    st.caption("It takes labels again (uploads, review). A merged category stays merged: its labels moved.")
    if st.form_submit_button("Un-archive") and revived:
        ok, _ = _ui.attempt(unarchive_category, db, revived, actor=_ui.actor())
        _done(ok, f"Un-archived {revived}")
with delete_tab, st.form("delete_category"):
    gone = st.selectbox("Category", [*live, *archived], key="delete_name")
    heir = st.selectbox("Move its labels to", live, index=None, placeholder="(it has no labels)", key="delete_move")
    st.caption(
        "A category with labels is deleted only after its labels move to another one (an audit row each). Its name "
        "stays readable in the audit trail."
    )
    if st.form_submit_button("Delete") and gone:
        ok, deleted = _ui.attempt(delete_category, db, gone, actor=_ui.actor(), move_to=heir)
        _done(
            ok,
            f"Deleted {gone}"
            + (f": {deleted.moved} labels moved to {deleted.moved_to}" if ok and deleted.moved else ""),
        )

# --- import ---------------------------------------------------------------------------------------------------------
LABEL_SOURCES = {
    LabelSource.FOLDERS: "Sub-folder names (ImageFolder: <folder>/<category>/<photo>)",
    LabelSource.CSV: "A labels CSV (filename,category)",
    LabelSource.CATEGORY: "One category for every image",
    LabelSource.NONE: "None: import unlabelled",
}


def _label_source(form: str) -> tuple[LabelSource, str | None]:
    """The label-source radio and the category picker, the same for both import forms."""
    source = st.radio("Labels from", list(LABEL_SOURCES), format_func=LABEL_SOURCES.__getitem__, key=f"{form}_source")
    category = st.selectbox(
        "Category for every image (with 'One category')", live, index=None, accept_new_options=True, key=f"{form}_cat"
    )
    return source, category


st.header("Import labelled data")
folder_tab, zip_tab = st.tabs(["Folder on the server", "Zip upload"])
with folder_tab, st.form("import_folder"):
    exchange = db.settings.exchange_dir
    st.caption(
        _ui.md_escape(f"Server paths are relative to the exchange folder {exchange} (PRODCAT_SERVER_FILES_DIR).")
    )
    folder = st.text_input("Folder path on the server", placeholder="photos")
    folder_source, folder_category = _label_source("folder")
    csv_path = st.text_input("Labels CSV on the server (with 'A labels CSV')", placeholder="labels.csv")
    if st.form_submit_button("Import folder") and folder.strip():
        ok, source = _ui.attempt(exchange_path, db, folder, actor=_ui.actor())
        labels_csv = None
        if ok and csv_path.strip():
            ok, labels_csv = _ui.attempt(exchange_path, db, csv_path, actor=_ui.actor())
        if ok:
            bar = st.progress(0.0, text="Importing...")
            ok, result = _ui.attempt_import(
                import_labelled_folder,
                db,
                source,
                label_source=folder_source,
                labels_csv=labels_csv,
                category=folder_category,
                actor=_ui.actor(),
                progress=lambda done, total, name: bar.progress(
                    min(done / total, 1.0) if total else 0.0, text=_ui.md_escape(name)
                ),
            )
            bar.empty()
            if ok and result is not None:
                _ui.show_import(result)
with zip_tab, st.form("import_zip", clear_on_submit=True):
    archive = st.file_uploader("Zip archive of photos", type=["zip"])
    zip_source, zip_category = _label_source("zip")
    labels_file = st.file_uploader("Labels CSV (with 'A labels CSV')", type=["csv"])
    if st.form_submit_button("Import zip") and archive is not None:
        ok, result = _ui.attempt_import(
            import_labelled_upload,
            db,
            Upload(archive.name, archive.getvalue()),
            label_source=zip_source,
            labels_csv=Upload(labels_file.name, labels_file.getvalue()) if labels_file is not None else None,
            category=zip_category,
            actor=_ui.actor(),
        )
        if ok and result is not None:
            _ui.show_import(result)


# --- pretrained backbone --------------------------------------------------------------------------------------------
def _use_weights() -> None:
    name = st.session_state.get("weights_pick")
    chosen = _ui.flash_errors(use_weights_file, db, name or "", actor=_ui.actor())
    if chosen is not None:
        _ui.flash("success", f"New model lineages start from {chosen.describe()}.")


def _clear_weights() -> None:
    cleared = _ui.flash_errors(clear_weights_selection, db, actor=_ui.actor())
    what = f"the weights file {cleared.file}" if cleared is not None else "the damaged choice"
    _ui.flash("success", f"Forgot {what}: new model lineages follow PRODCAT_PRETRAINED ({db.settings.pretrained}).")


st.header("Pretrained backbone")
st.caption(
    _ui.md_escape(
        f"A new model lineage starts from pretrained weights. Put a .safetensors file in the exchange folder "
        f"{db.settings.exchange_dir} to choose it here; the next retrain then starts a new lineage from it."
    )
)
backbone = backbone_choice(db.settings)
if backbone.problem is not None:
    st.error(_ui.md_escape(backbone.problem))
if backbone.chosen is not None:
    chosen = backbone.chosen
    by = f" by {chosen.chosen_by}" if chosen.chosen_by else ""
    st.text(
        f"Chosen: {chosen.file} ({chosen.arch}), sha256 {chosen.sha256[:12]}, {chosen.chosen_at:%Y-%m-%d %H:%M} UTC{by}"
    )
elif backbone.problem is None:
    st.text(f"No weights file chosen: new lineages follow PRODCAT_PRETRAINED ({db.settings.pretrained}).")
for note in backbone.notes:
    st.warning(_ui.md_escape(note))
if backbone.candidates:
    pick_col, use_col = st.columns([3, 1], vertical_alignment="bottom")
    pick_col.selectbox("Weights file in the exchange folder", backbone.candidates, key="weights_pick")
    use_col.button("Use as backbone", on_click=_use_weights, width="stretch")
else:
    st.caption("No .safetensors file in the exchange folder yet.")
if backbone.chosen is not None or backbone.problem is not None:
    st.button("Clear the choice", on_click=_clear_weights)

# --- export ---------------------------------------------------------------------------------------------------------
st.header("Export")
csv_col, folder_col, model_col = st.columns(3)
with csv_col:
    st.subheader("Labels CSV")
    # Deferred: the CSV is written only when someone clicks, not on every rerun of this page.
    # on_click="ignore": a click does not rerun the page. A rerun would replace both buttons' deferred files, and a
    # second download clicked before the browser got the new ids would be lost ("Deferred file ... not found").
    exporter = _ui.actor()  # read now: the deferred download runs without this page's session
    st.download_button(
        "Download labels.csv",
        lambda: labels_csv_bytes(db, actor=exporter),
        file_name="labels.csv",
        mime="text/csv",
        on_click="ignore",
    )
with folder_col, st.form("export_folder"):
    st.subheader("ImageFolder")
    target_dir = st.text_input("New or empty folder on the server (inside the exchange folder)")
    if st.form_submit_button("Export images") and target_dir.strip():
        ok, target = _ui.attempt(exchange_path, db, target_dir, actor=_ui.actor())
        if ok:
            ok, exported = _ui.attempt(export_imagefolder, db, target, actor=_ui.actor())
        if ok:
            st.success(_ui.md_escape(f"{exported.written} images written to {exported.directory}"))
            for problem in exported.missing:
                st.warning(_ui.md_escape(problem))
with model_col:
    st.subheader("Model")
    version = active_version(db)
    if version is None:
        st.text("No model yet.")
    else:
        st.text(version.label)
        ok, _ = _ui.attempt(checkpoint_files, db, version.id)  # a missing file is reported here, not on click
        if ok:
            # Deferred like the CSV: the zip (weights + JSON sidecar) is built only when someone clicks.
            st.download_button(
                "Download model (.zip)",
                lambda: model_archive_bytes(db, version.id, actor=exporter),
                file_name=f"model-v{version.id}.zip",
                mime="application/zip",
                key="download_model",
                on_click="ignore",
            )
