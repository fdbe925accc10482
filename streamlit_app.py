"""prodcat's entry point: page config, navigation over pages/, and the sidebar every page shares."""

from __future__ import annotations

from pages import _sidebar

_sidebar.app_shell().run()
