"""prodcat's entry point: page config, navigation over pages/, and the sidebar every page shares."""

from __future__ import annotations

import streamlit as st

from pages import _ui

st.set_page_config(page_title="prodcat", page_icon=":material/category:", layout="wide")

navigation = st.navigation(
    [
        st.Page(path, title=title, url_path=url or None, default=key == "home")
        for key, (path, title, url) in _ui.PAGES.items()
    ]
)
_ui.render_sidebar(_ui.get_db())
navigation.run()
