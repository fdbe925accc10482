"""Train & models: what a retrain would use, THE retrain button, live progress, candidate vs active, all versions."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.jobs import cancel_job, current_job, enqueue_training, ensure_worker, list_jobs
from core.training import suggested_mode, training_plan
from core.versions import activate_version, active_version, list_versions
from pages import _ui

AUTO = "auto"
SEEN_LIVE_KEY = "train_seen_live_job"

db = _ui.get_db()
_ui.show_flash()
st.title("Train & models")

# --- what would be trained ------------------------------------------------------------------------------------------
suggested = suggested_mode(db.settings)
choice = st.radio(
    "Mode",
    [AUTO, "quick", "full"],
    horizontal=True,
    key="train_mode",
    format_func=lambda m: f"picked by hardware ({suggested})" if m == AUTO else m,
    help="quick: refit only the classifier head on cached features (seconds, fine on a CPU). "
    "full: fine-tune every layer (minutes on a GPU).",
)
mode = suggested if choice == AUTO else choice
plan = training_plan(db, mode=mode)
st.text(
    f"{plan.labelled} labelled images in {len(plan.trainable)} categories; "
    f"{plan.corrections_since_active} corrections since the active model."
)
if plan.categories:
    st.dataframe(
        [
            {"category": c.name, "train": c.train, "val": c.val, "test": c.test, "total": c.total}
            for c in plan.categories
        ],
        hide_index=True,
    )
for problem in plan.problems:
    st.warning(_ui.md_escape(problem))
for note in plan.notes:
    st.caption(_ui.md_escape(note))

if st.button(f"Retrain ({mode})", type="primary", disabled=not plan.ok):
    ok, job_id = _ui.attempt(enqueue_training, db, mode, {}, _ui.actor())
    if ok:
        _ui.attempt(ensure_worker, db)  # no live worker on any machine: start one here
        st.session_state[SEEN_LIVE_KEY] = job_id
        st.success(f"Training job #{job_id} queued.")


# --- live progress --------------------------------------------------------------------------------------------------
def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{int(seconds) // 60} min {int(seconds) % 60} s" if seconds >= 60 else f"{seconds:.0f} s"


@st.fragment(run_every="2s")
def live_progress() -> None:
    """Reads the job from the database every 2 s, so it survives reloads and shows jobs started elsewhere."""
    job = current_job(db)
    if job is None:
        recent = list_jobs(db, limit=1)
        if st.session_state.get(SEEN_LIVE_KEY) is not None and recent:
            # The job this session watched has just finished: redraw the whole page (versions, comparison).
            st.session_state[SEEN_LIVE_KEY] = None
            st.rerun(scope="app")
        if recent:
            last = recent[0]
            text = f"Last training job #{last.id} ({last.mode}) {last.status}"
            if last.error:
                text += f": {last.error}"
            if last.status == "failed":
                st.error(_ui.md_escape(text))
            else:
                st.text(text)
        return
    st.session_state[SEEN_LIVE_KEY] = job.id
    if job.status == "queued":
        # Its worker may have died before claiming it (or none was ever started): start one here. ensure_worker
        # does nothing while any worker is alive, and starts at most one per heartbeat timeout.
        _ui.attempt(ensure_worker, db)
    p = job.progress
    st.subheader(f"Training job #{job.id}: {job.status}")
    epoch, epochs = p.get("epoch"), p.get("epochs")
    if epoch is not None and epochs:
        st.progress(min(float(epoch) / float(epochs), 1.0), text=f"epoch {epoch}/{epochs} ({p.get('phase') or ''})")
    else:
        st.text(f"phase: {p.get('phase') or 'waiting for a worker'}")
    a, b, c, d = st.columns(4)
    a.metric("Loss", "n/a" if p.get("loss") is None else f"{p['loss']:.3f}")
    b.metric("Images/s", "n/a" if p.get("images_per_s") is None else f"{p['images_per_s']:.0f}")
    c.metric("ETA", _eta(p.get("eta_s")))
    d.metric("Device", p.get("device") or "n/a")
    if job.history:
        frame = pd.DataFrame(job.history).set_index("epoch")
        left, right = st.columns(2)
        left.line_chart(frame[["loss"]] if "loss" in frame else frame)
        accuracy = [k for k in ("train_acc", "val_acc") if k in frame]
        if accuracy:
            right.line_chart(frame[accuracy])
    if job.cancel_requested:
        st.text("Cancel requested: the worker stops after the current step.")
    elif st.button("Cancel training", key=f"cancel_{job.id}"):
        _ui.attempt(cancel_job, db, job.id, actor=_ui.actor())


live_progress()

# --- candidate vs active, promote / roll back ---------------------------------------------------------------------
versions = list_versions(db)
active = active_version(db)
if not versions:
    st.info("No model versions yet.")
    st.stop()

newest = versions[0]
if active is not None and newest.id != active.id:
    st.subheader(f"Candidate v{newest.id} against active v{active.id}")
    promotion = newest.metrics.get("promotion") or {}
    if promotion.get("reason"):
        st.text(f"Not promoted automatically: {promotion['reason']}")
    rows = []
    cand_classes = (newest.metrics.get("test") or {}).get("per_class") or {}
    act_classes = (active.metrics.get("test") or {}).get("per_class") or {}
    for name in dict.fromkeys([*act_classes, *cand_classes]):
        rows.append(
            {
                "category": name,
                f"v{active.id} recall": (act_classes.get(name) or {}).get("recall"),
                f"v{newest.id} recall": (cand_classes.get(name) or {}).get("recall"),
                f"v{active.id} F1": (act_classes.get(name) or {}).get("f1"),
                f"v{newest.id} F1": (cand_classes.get(name) or {}).get("f1"),
            }
        )
    rows.append(
        {
            "category": "overall accuracy",
            f"v{active.id} recall": active.test_accuracy,
            f"v{newest.id} recall": newest.test_accuracy,
            f"v{active.id} F1": active.macro_f1,
            f"v{newest.id} F1": newest.macro_f1,
        }
    )
    st.dataframe(rows, hide_index=True)

st.subheader("All versions")
st.dataframe(
    [
        {
            "version": f"v{v.id}",
            "status": v.status,
            "mode": v.mode,
            "arch": v.arch,
            "image px": v.image_size,
            "test accuracy": v.test_accuracy,
            "macro F1": v.macro_f1,
            "ECE": v.ece,
            "pretrained": v.pretrained_source,
            "created (UTC)": v.created_at.strftime("%Y-%m-%d %H:%M"),
        }
        for v in versions
    ],
    hide_index=True,
    column_config={
        "test accuracy": st.column_config.NumberColumn(format="percent"),
        "macro F1": st.column_config.NumberColumn(format="%.3f"),
        "ECE": st.column_config.NumberColumn(format="%.3f"),
    },
)
labels = {v.id: v.label for v in versions if active is None or v.id != active.id}
if labels:
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    pick = left.selectbox(
        "Serve another version (promote a candidate or roll back)", labels, format_func=labels.get, key="activate_pick"
    )
    if right.button("Activate", width="stretch"):
        ok, view = _ui.attempt(activate_version, db, pick, actor=_ui.actor())
        if ok:
            # Images imported since this version last served lack its predictions: a worker fills them in.
            _ui.attempt(ensure_worker, db)
            _ui.flash("success", f"Now serving {view.label}")
            _ui.flash(
                "caption", "Predictions for images added since this version are being refreshed in the background."
            )
            st.rerun()
