"""The real-server and browser fixtures of test_browser.py, shared by every browser test module."""

from tests.e2e.test_browser import chromium, server  # noqa: F401
