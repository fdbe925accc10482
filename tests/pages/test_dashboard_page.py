"""The dashboard's confusion matrix keeps its shape with long and HTML-like category names (AppTest, real SQLite)."""

from __future__ import annotations

import html
import json

from core.db import Database
from tests.core.factories import FakeImage, build
from tests.pages.helpers import run_page

LONG = "Waterproof hiking boots with reinforced toe caps (men)"  # 55 characters
HTML_LIKE = 'Shoes "Pro" <b>sale</b>'


def test_b9_long_and_html_like_names_are_cut_on_the_axes_in_full_on_hover_with_a_fixed_margin(db: Database) -> None:
    names = ["Bags", LONG, HTML_LIKE]
    right = [(0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8)]
    images = [FakeImage(split="test", label=name, probs=right[k % 3]) for k, name in enumerate(names * 2)]
    build(db, images, categories=names)
    at = run_page("pages/dashboard.py")
    assert not at.exception
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    layout, heat = figure["layout"], figure["data"][0]

    shown = layout["yaxis"]["ticktext"]
    assert all(len(html.unescape(text)) <= 22 for text in shown) and shown[1].endswith("…")  # the long name is cut...
    assert LONG in heat["y"] and layout["yaxis"]["tickvals"] == heat["y"]  # ...but the cell (and hover) has it all
    assert layout["margin"]["l"] == layout["margin"]["b"] == 170 and layout["yaxis"]["automargin"] is False
    spec = at.get("plotly_chart")[0].proto.spec
    assert "&quot;" not in spec  # plotly would show it literally
    assert 'Shoes "Pro" &lt;b&gt;sale&lt;/b&gt;' in heat["y"]  # markup stays text, quotes stay quotes
