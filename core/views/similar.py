"""Similar images as review cards: the nearest neighbours core.ml.similar finds in the active model's feature space,
with their labels and predictions, for the cards' "Similar" view and bulk relabel."""

from __future__ import annotations

from dataclasses import dataclass

from core.db import Database
from core.ml.similar import nearest_images
from core.views.review import ReviewItem, review_items

DEFAULT_NEIGHBOURS = 12


@dataclass(frozen=True)
class Similar:
    """One neighbour: its review card and its cosine similarity to the image asked about (1 = the same features)."""

    item: ReviewItem
    similarity: float


def similar_images(db: Database, image_id: int, *, k: int = DEFAULT_NEIGHBOURS) -> list[Similar]:
    """The k catalogue images most like this one to the active model (core.ml.similar.nearest_images), as review
    cards, most similar first. Raises NotFound for an unknown image or when there is no active model."""
    version_id, chosen = nearest_images(db, image_id, k=k)
    cards = {item.image_id: item for item in review_items(db, [i for i, _ in chosen], version_id=version_id)}
    return [Similar(cards[i], s) for i, s in chosen if i in cards]
