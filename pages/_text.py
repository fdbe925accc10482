"""User text (file and zip entry names, category and account names, notes, error messages) made safe for the
elements that render Markdown: st.markdown, st.write, st.success/info/warning/error, st.caption, st.toast, progress
text, widget labels and help. The one escape every page uses (pages/_ui.py re-exports it as `_ui.md_escape`)."""

from __future__ import annotations

import re
import string

_MARKDOWN_SPECIALS = frozenset(string.punctuation)
WORD_JOINER = "\u2060"  # zero width, neither space nor punctuation: invisible, and no link pattern runs across it
# Streamlit's Markdown turns plain text into links after escapes are resolved (GFM autolink literals: `http://`,
# `https://`, `www.` and e-mail addresses, found in the text nodes), so escaping alone leaves them live. A word joiner
# inside each such pattern breaks it.
_AUTOLINK_SPOTS = re.compile(r"(?=://)|(?<=www)(?=\.)|(?=@)", re.IGNORECASE)


def md_escape(text: object) -> str:
    """`text` shown exactly as written by Markdown-rendering elements: every ASCII punctuation character is
    backslash-escaped (CommonMark allows it for all of them), so `*sale*`, `![p](http://x/y.png)`, `[x](y)`, `:red[x]`
    or `$x$` show literally instead of as formatting, an image, a link, a colour or maths; a word joiner breaks
    bare `http://`, `www.` and e-mail autolinks; line breaks become spaces."""
    joined = _AUTOLINK_SPOTS.sub(WORD_JOINER, str(text))
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIALS else ch for ch in joined).replace("\n", " ")
