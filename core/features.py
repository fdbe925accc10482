"""Backbone features per image, cached on disk by the backbone's exact weights: what quick retraining fits a head
on, what label checks cross-validate, and what outlier scores and similar images measure distances in."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from core.db import Database, in_chunks
from core.jobs import ProgressReport
from core.pixel_cache import CachedRows, RowStore
from core.schema import Image
from core.settings import Settings

ProgressFn = Callable[[ProgressReport], None]
StopFn = Callable[[], bool]


def backbone_id(model: Any, cfg: Any) -> str:
    """Id of the backbone's exact weights and pixel config: cached features are only reused for identical ones."""
    from models.factory import backbone_fingerprint

    pixel = hashlib.sha256(f"{cfg.image_size}|{cfg.crop_pct}|{cfg.interpolation}|{cfg.mean}|{cfg.std}".encode())
    return f"{backbone_fingerprint(model)}-{pixel.hexdigest()[:8]}"


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


