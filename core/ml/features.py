"""Backbone features per image, cached on disk by the backbone's exact weights: what quick retraining fits a head
on, what label checks cross-validate, and what outlier scores and similar images measure distances in."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from core.db import Database, in_chunks
from core.ml.contract import ProgressReport
from core.ml.pixel_cache import CachedRows, RowStore
from core.schema import Image
from core.settings import Settings

ProgressFn = Callable[[ProgressReport], None]
StopFn = Callable[[], bool]


def backbone_id(model: Any, cfg: Any) -> str:
    """Id of the backbone's exact weights, pixel config and feature layout: cached features are only reused for
    identical ones. (Stage-pooled networks pooled by their blocks' means keep the ids they had before pooling could
    be chosen, so their caches stay valid.)"""
    from models.factory import backbone_fingerprint
    from models.stages import BlockPooling, stage_layout

    described = f"{cfg.image_size}|{cfg.crop_pct}|{cfg.interpolation}|{cfg.mean}|{cfg.std}"
    layout = stage_layout(model)
    if layout is not None and layout.pooling is not BlockPooling.MEAN:
        described += f"|{list(layout.blocks)}|{layout.pooling.value}"
    return f"{backbone_fingerprint(model)}-{hashlib.sha256(described.encode()).hexdigest()[:8]}"


class FeatureCache:
    """Backbone features (float32 rows) keyed by image sha256 under cache_dir/features/<backbone_id>/."""

    def __init__(self, settings: Settings, backbone_id: str, dim: int) -> None:
        self.store = RowStore(
            settings.cache_dir / "features" / backbone_id,
            dtype="float32",
            row_shape=(int(dim),),
            meta={"backbone_id": backbone_id},
        )
        self.backbone_id = backbone_id
        self.computed = 0

    def ensure(self, shas: Sequence[str], compute: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        def counted(keys: Sequence[str]) -> np.ndarray:
            self.computed += len(keys)
            return compute(keys)

        return np.asarray(self.store.get_or_compute(shas, counted, chunk=4096), dtype=np.float32)


def image_shas(db: Database, image_ids: Sequence[int]) -> list[str]:
    ids = list(image_ids)
    found: dict[int, str] = {}
    with db.read() as session:
        for part in in_chunks(ids):
            for image_id, sha in session.execute(select(Image.id, Image.sha256).where(Image.id.in_(part))):
                found[image_id] = sha
    return [found[i] for i in ids]


def split_features(
    db: Database,
    model: Any,
    cfg: Any,
    split_pixels: CachedRows,
    image_ids: list[int],
    features_cache: FeatureCache,
    config: Any,
    device: Any,
    *,
    on_progress: ProgressFn,
    should_stop: StopFn,
    phase: str,
) -> np.ndarray:
    """Backbone features of one split's images: from the cache, computing (and caching) only the missing ones."""
    from models.training import extract_features

    if not image_ids:
        return np.zeros((0, int(model.num_features)), dtype=np.float32)
    shas = image_shas(db, image_ids)
    position = {sha: pos for pos, sha in enumerate(shas)}

    def compute(keys: Sequence[str]) -> np.ndarray:
        return extract_features(
            model,
            split_pixels.subset([position[k] for k in keys]),
            cfg,
            device=device,
            batch_size=config.eval_batch_size,
            on_progress=lambda p: on_progress(ProgressReport.from_library(p, phase)),
            should_stop=should_stop,
            amp=config.amp,
        )

    return features_cache.ensure(shas, compute)


PixelsOf = Callable[[list[int]], tuple[list[int], np.ndarray]]  # ids -> (readable ids, their pixels)


def classifier_features(
    db: Database, classifier: Any, image_ids: Sequence[int], pixels_of: PixelsOf
) -> tuple[list[int], np.ndarray]:
    """(ids, backbone features) of a loaded model for these images, cached under its checkpoint's backbone id: the
    quick retrains of one lineage share it, so their predictions cost a matmul, not a backbone pass, and pixels are
    read only for images not cached yet. Images `pixels_of` cannot read are left out. A checkpoint without a
    backbone id (older files) computes features without caching."""
    bid = getattr(classifier.meta, "backbone_id", "")
    if not bid:
        ids, pixels = pixels_of(list(image_ids))
        return ids, classifier.features_pixels(pixels)
    cache = FeatureCache(db.settings, bid, int(classifier.model.num_features))
    shas = image_shas(db, image_ids)
    sha_of = dict(zip(image_ids, shas, strict=True))
    cached = cache.store.read_index()
    todo = [i for i in image_ids if sha_of[i] not in cached]
    readable, pixels = pixels_of(todo) if todo else ([], np.empty((0,)))
    if readable:
        row_of = {sha_of[i]: n for n, i in enumerate(readable)}
        cache.store.fill(
            list(row_of), lambda keys: classifier.features_pixels(pixels[[row_of[k] for k in keys]]), chunk=len(row_of)
        )
    unreadable = set(todo) - set(readable)
    kept = [i for i in image_ids if i not in unreadable]
    return kept, cache.ensure([sha_of[i] for i in kept], _never_computed)


def _never_computed(keys: Sequence[str]) -> np.ndarray:
    raise RuntimeError(f"feature rows for {len(keys)} images vanished from the cache while it was being read")
