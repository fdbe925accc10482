"""Near-duplicate benchmark (issue 10): do resized, re-encoded, cropped and watermarked copies land in their original's
split, with no false group among distinct products? Old rule (equal dHash) vs new (content hashes within distance).

2,000 distinct Fashion-MNIST test-set products (the thresholds were chosen on train-set images), inverted to the white
background of the Zalando shots and upscaled to 224 px, imported through core.ingest as JPEG q=90; then one copy of
each per kind (tests/imagegen.COPY_KINDS) as a second batch. Also the hashing cost per image and the matching cost
against 100,000 stored hashes. Run: .venv/bin/python benchmarks/near_duplicates.py [--n 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `core` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from core.db import open_database
from core.demo import balanced_indices, load_fashion_mnist
from core.duplicates import HashArrays, HashIndex, group_labels
from core.imaging import content_hashes
from core.ingest import Upload, import_uploads
from core.schema import Image
from core.settings import Settings
from core.splits import split_for_hash
from tests.imagegen import COPY_KINDS, encode

SIZE = 224


def products(n: int) -> list[PILImage.Image]:
    data = load_fashion_mnist("test")
    idx = balanced_indices(data.labels, n)
    return [
        PILImage.fromarray(255 - data.images[i], "L").resize((SIZE, SIZE), PILImage.Resampling.BICUBIC).convert("RGB")
        for i in idx
    ]


def old_rule_splits(rows: list[tuple[int, str, str, int | None]], fractions: tuple[float, ...]) -> dict[int, str]:
    """The split each image would get under the old rule: that of the first earlier image with an equal dHash."""
    first: dict[int, str] = {}
    out = {}
    for image_id, sha, _split, phash in sorted(rows):
        split = str(split_for_hash(sha, fractions))
        if phash is not None:
            split = first.setdefault(phash, split)
        out[image_id] = split
    return out


def split_agreement(originals: list[PILImage.Image], workdir: Path) -> None:
    settings = Settings(data_dir=workdir)
    db = open_database(settings)
    t0 = time.perf_counter()
    uploads = [Upload(f"p{i}.jpg", encode(im, "JPEG", 90)) for i, im in enumerate(originals)]
    first = import_uploads(db, uploads, actor="b")
    copies = [Upload(f"{k}|p{i}.jpg", encode(make(im), "JPEG", 90))
              for k, make in COPY_KINDS.items() for i, im in enumerate(originals)]  # fmt: skip
    second = import_uploads(db, copies, actor="b")
    elapsed = time.perf_counter() - t0
    total = len(first.imported) + len(second.imported)
    print(f"imported {len(first.imported)} originals + {len(second.imported)} copies in {elapsed:.1f} s "
          f"({total / elapsed:.0f} images/s); refused {len(second.refused)}")  # fmt: skip
    with db.read() as session:
        rows = session.execute(select(Image.id, Image.sha256, Image.split, Image.phash, Image.original_name)).all()
    by_name = {r.original_name: r for r in rows}
    old = old_rule_splits([(r.id, r.sha256, r.split, r.phash) for r in rows], settings.split_fractions)
    print("| copy kind | old rule (equal dHash) | new rule (distance) |")
    print("|---|---|---|")
    for kind in COPY_KINDS:
        pairs = [(by_name[f"{kind}|p{i}.jpg"], by_name[f"p{i}.jpg"]) for i in range(len(originals))]
        pairs = [(c, o) for c, o in pairs if c.id != o.id]  # a copy with identical bytes is the same image
        new = np.mean([c.split == o.split for c, o in pairs])
        was = np.mean([old[c.id] == old[o.id] for c, o in pairs])
        print(f"| {kind} | {was:.1%} | {new:.1%} |")
    moved = sum(by_name[f"p{i}.jpg"].split != str(split_for_hash(by_name[f"p{i}.jpg"].sha256, settings.split_fractions))
                for i in range(len(originals)))  # fmt: skip
    print(f"distinct originals moved to another image's split at import: {moved}")
    db.dispose()


def false_groups(originals: list[PILImage.Image]) -> None:
    hashes = [content_hashes(im) for im in originals]
    rows = [(i, h.dhash_h, h.dhash_v, h.phash) for i, h in enumerate(hashes) if h is not None]
    labels = group_labels(HashArrays.from_rows(rows))
    sizes = np.bincount(labels)
    print(f"distinct products: {len(rows)} hashed, {int((sizes > 1).sum())} false group(s) "
          f"holding {int(sizes[sizes > 1].sum())} images")  # fmt: skip


def costs(originals: list[PILImage.Image], stored: int = 100_000) -> None:
    t0 = time.perf_counter()
    hashes = [content_hashes(im) for im in originals[:500]]
    per_hash = (time.perf_counter() - t0) / 500
    rng = np.random.default_rng(0)
    random = rng.integers(-(2**63), 2**63 - 1, size=(stored, 3), dtype=np.int64)
    rows = [(i + 1, int(a), int(b), int(c)) for i, (a, b, c) in enumerate(random)]
    t0 = time.perf_counter()
    index = HashIndex(HashArrays.from_rows(rows), ["train"] * stored)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, h in enumerate(hashes):
        assert h is not None
        index.earliest_match(h)
        index.add(stored + i + 1, h, "train")
    per_match = (time.perf_counter() - t0) / len(hashes)
    t0 = time.perf_counter()
    group_labels(HashArrays.from_rows(rows[:10_000]))
    grouping = time.perf_counter() - t0
    print(f"content hashes: {per_hash * 1e3:.2f} ms per {SIZE} px image; match + append at {stored:,} stored: "
          f"{per_match * 1e3:.2f} ms per imported image; index built from {stored:,} rows in {load:.2f} s "
          f"(once per import batch); grouping 10,000 images (duplicates page / scan): {grouping:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    originals = products(args.n)
    false_groups(originals)
    costs(originals)
    with tempfile.TemporaryDirectory() as workdir:
        split_agreement(originals, Path(workdir))


if __name__ == "__main__":
    main()
