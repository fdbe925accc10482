"""The Data health page: findings with counts, each one click from the review queue of its images (AppTest)."""

from __future__ import annotations

from core.db import Database
from tests.core.factories import catalogue_with_findings
from tests.pages.helpers import card_ids, errors_of, run_page


def test_each_finding_opens_its_images_on_the_review_page(db: Database) -> None:
    ids = catalogue_with_findings(db)
    at = run_page("pages/health.py")
    assert not at.exception and errors_of(at) == []
    shown = [m.value for m in at.markdown]
    assert any("1 likely wrong labels" in text for text in shown) and any(
        "3 unlabelled photos" in text for text in shown
    )
    assert {m.label: m.value for m in at.metric}["Likely wrong labels"] == "1"

    at.button(key="health_review_0").click().run()  # the first finding: the likely wrong labels
    assert not at.exception and at.selectbox(key="review_state").value == "label-issues"
    assert card_ids(at) == [ids[0]]

    at.switch_page("pages/health.py").run()
    unlabelled = next(n for n, text in enumerate(t for t in shown if "**" in t) if "unlabelled" in text)
    at.button(key=f"health_review_{unlabelled}").click().run()
    assert at.selectbox(key="review_state").value == "unlabelled" and sorted(card_ids(at)) == ids[-3:]
