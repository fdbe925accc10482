"""Nearest neighbours of one image in the active model's feature space (brute force over the feature cache,
read in chunks from its memory map; fine on a CPU up to ~100k images)."""

from __future__ import annotations

from sqlalchemy import select

from core.db import Database, in_chunks
from core.errors import NotFound
from core.ml.features import FeatureCache, classifier_features, image_shas
from core.ml.pixel_cache import PixelCache
from core.ml.versions import load_classifier
from core.schema import Image


def _image_ids_of(db: Database, shas: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    with db.read() as session:
        for part in in_chunks(shas):
            found.update(
                {
                    sha: int(i)
                    for i, sha in session.execute(select(Image.id, Image.sha256).where(Image.sha256.in_(part)))
                }
            )
    return found


def nearest_images(db: Database, image_id: int, *, k: int) -> tuple[int, list[tuple[int, float]]]:
    """The active version's id and the k catalogue images nearest this one in its feature space (itself left out),
    as (image id, cosine similarity), most similar first. Only images the active model has features for take part:
    after a retrain that is every image. Raises NotFound for an unknown image or when there is no active model."""
    from models.label_checks import nearest_neighbours

    try:
        own = image_shas(db, [int(image_id)])[0]
    except KeyError:
        raise NotFound(f"no image with id {image_id}") from None
    classifier, version = load_classifier(db)
    meta = classifier.meta
    if not meta.backbone_id:  # a checkpoint from before cached features: nothing to compare with
        return version.id, []
    pixels = PixelCache(db.settings, meta.image_size, meta.crop_pct, meta.interpolation)
    _, query = classifier_features(db, classifier, [int(image_id)], lambda ids: (ids, pixels.ensure(db, ids)))
    cache = FeatureCache(db.settings, meta.backbone_id, int(classifier.model.num_features)).store
    index = cache.read_index()
    keys = sorted(index, key=index.__getitem__)  # row order
    # Extra candidates: rows of images deleted since (features outlive them) and the image itself are skipped.
    rows, sims = nearest_neighbours(query[0], cache.view(len(index)), k=2 * k + 1)
    ids_of = _image_ids_of(db, [keys[r] for r in rows])
    chosen = [
        (ids_of[keys[r]], float(s)) for r, s in zip(rows, sims, strict=True) if keys[r] in ids_of and keys[r] != own
    ]
    return version.id, chosen[:k]
