"""The shell every page shares: sign-in, navigation, and the sidebar (who you are, the active model and the training
job, a polling fragment)."""

from __future__ import annotations

import streamlit as st
from streamlit.navigation.page import StreamlitPage

from core.db import Database
from core.schema import JobStatus
from core.views.overview import Overview, error_headline, home_overview, job_progress
from pages import _auth
from pages._ui import PAGES, database


def app_shell() -> StreamlitPage:
    """Page config, the navigation over PAGES and the sidebar: what streamlit_app.py draws around every page.
    Returns the page st.navigation picked from the url."""
    # An emoji, not a Material icon: Streamlit fetches a Material favicon from Google's font CDN, failing offline.
    st.set_page_config(page_title="prodcat", page_icon="🏷️", layout="wide")
    db = database()
    if _auth.resolve(db) is None:
        _auth.sign_in_screen(db)
    page = st.navigation(
        [
            st.Page(path, title=title, url_path=url or None, default=key == "home")
            for key, (path, title, url) in PAGES.items()
        ]
    )
    render_sidebar(db)
    return page


def job_line(overview: Overview) -> str:
    """One line on the training job: live state with its progress, or how the last one ended (first line of an
    error only: a traceback belongs on the Train page)."""
    job = overview.job
    if job is None:
        return "No training job yet."
    if job.status == JobStatus.RUNNING:
        at = job_progress(job.progress or {}).text or "training"
        return f"Training job #{job.id} running ({job.mode}, {at})."
    if job.status == JobStatus.QUEUED:
        return f"Training job #{job.id} queued ({job.mode}), waiting for a worker."
    if job.status == JobStatus.SUCCEEDED:
        made = f": model v{job.model_version_id}" if job.model_version_id else ""
        return f"Last training job #{job.id} succeeded{made}."
    return f"Last training job #{job.id} {job.status}: {error_headline(job.error)}".strip().rstrip(":")


def render_sidebar(db: Database) -> Overview:
    """Who you are, the active model and the training job, on every page.

    The model and job lines are a fragment that re-reads them every few seconds while a job is queued or running
    (so every page follows a training), and does not poll at all otherwise.
    """
    overview = home_overview(db)
    with st.sidebar:
        _auth.sidebar_identity(db)
        st.fragment(_sidebar_status, run_every=overview.refresh_every_s)(db, [overview])
    return overview


def _sidebar_status(db: Database, first: list[Overview]) -> None:
    """The sidebar's model and training lines. `first` holds the overview this page run already read: it is used
    once, and each timed rerun of the fragment reads a fresh one. The fragment only reruns while a job is live, so
    when a rerun finds it ended, the whole app reruns: the page shows the new model and the polling stops."""
    timed_rerun = not first
    overview = first.pop() if first else home_overview(db)
    st.subheader("Model")
    if overview.has_model:
        st.text(f"Active: {overview.active_version_label}")
        st.text(overview.accuracy_label or "")
    else:
        st.text("No model yet: label images, then retrain.")
    st.subheader("Training")
    st.text(job_line(overview))
    if timed_rerun and overview.refresh_every_s is None:
        st.rerun(scope="app")
