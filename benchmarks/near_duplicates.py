"""Near-duplicate benchmark (issue 10): do resized, re-encoded, cropped and watermarked copies land in their original's
split, with no false group among distinct products? Old rule (equal dHash) vs new (content hashes within distance,
confirmed by the pixel check).

2,000 distinct Fashion-MNIST test-set products (the thresholds were chosen on train-set images: `pixels` prints how),
inverted to the white background of the Zalando shots and upscaled to 224 px, imported through core.catalog.ingest as
JPEG
q=90; then one copy of each per kind (tests/imagegen.COPY_KINDS) as a second batch. Also the hashing cost per image,
the matching cost against 100,000 stored hashes and the pixel check's per-thumbnail cost, and the stored groups at
100,000 rows: the Duplicates page's SQL (counts, first and last page), the whole page through AppTest, and what
joining a group costs a matching new image at ingest, against the old all-pairs grouping at 10,000.
Run: .venv/bin/python benchmarks/near_duplicates.py [--n 2000] [--parts groups,costs,pixels,false-groups,splits]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as a script: make `core` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import Table, bindparam, select, text

from core import db as core_db
from core.catalog.demo import balanced_indices, load_fashion_mnist
from core.catalog.duplicates import (
    DEFAULT_RULE,
    HashArrays,
    HashIndex,
    MatchRule,
    PixelCheck,
    duplicate_counts,
    duplicate_groups,
    group_labels,
    hash_pairs,
    join_group,
    match_mask,
    pixel_difference,
    unchecked_images,
)
from core.catalog.imaging import (
    ContentHashes,
    _content_grey,
    _normalised_pixels,
    content_hashes,
    content_pixels,
    open_normalised,
)
from core.catalog.ingest import Upload, import_uploads
from core.catalog.splits import split_for_hash
from core.catalog.store import THUMBNAIL_QUALITY, make_thumbnail
from core.db import open_database
from core.schema import Image
from core.settings import Settings, get_settings
from tests.core.factories import populate
from tests.imagegen import COPY_KINDS, encode

SIZE = 224
IMAGES = cast(Table, Image.__table__)  # a declarative class maps one Table
update_by_id = (
    IMAGES.update()
    .where(IMAGES.c.id == bindparam("b_id"))
    .values(duplicate_group_id=bindparam("b_group"), split=bindparam("b_split"))
)


def products(n: int, split: str = "test") -> list[PILImage.Image]:
    data = load_fashion_mnist(split)  # type: ignore[arg-type]
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
    settings = Settings(data_dir=workdir, auth="none")
    db = open_database(settings)
    t0 = time.perf_counter()
    uploads = [Upload(f"p{i}.jpg", encode(im, "JPEG", 90)) for i, im in enumerate(originals)]
    first = import_uploads(db, uploads, actor="b")
    copies = [Upload(f"{k}|p{i}.jpg", encode(make(im), "JPEG", 90))
              for k, make in COPY_KINDS.items() for i, im in enumerate(originals)]  # fmt: skip
    counts = duplicate_counts(db)
    print(f"after importing the {len(first.imported)} distinct originals: {counts.groups} false group(s) holding "
          f"{counts.images} images")  # fmt: skip
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


def as_stored(img: PILImage.Image, quality: int = 90) -> PILImage.Image:
    """`img` as ingest sees it (JPEG at `quality`), or as its stored thumbnail is read back (THUMBNAIL_QUALITY)."""
    return PILImage.open(io.BytesIO(encode(img, "JPEG", quality))).convert("RGB")


def as_thumbnail(img: PILImage.Image) -> PILImage.Image:
    return as_stored(make_thumbnail(img, Settings().thumbnail_size), THUMBNAIL_QUALITY)


def _hash_rows(hashes: list[ContentHashes | None]) -> list[tuple[int, int, int, int]]:
    return [(i, h.dhash_h, h.dhash_v, h.phash) for i, h in enumerate(hashes) if h is not None]


def false_groups(originals: list[PILImage.Image]) -> None:
    """Groups among distinct products by the hashes alone and with the pixel check (pixels from their thumbnails)."""
    stored = [as_stored(im) for im in originals]
    hashes = HashArrays.from_rows(_hash_rows([content_hashes(im) for im in stored]))
    pixels = np.stack([content_pixels(as_thumbnail(stored[int(i)])) for i in hashes.ids])
    check = PixelCheck(Settings())
    for name, labels in (
        ("hashes only", group_labels(hashes)),
        ("hashes + pixel check", group_labels(hashes, check=lambda a, b: check.agree(pixels[a], pixels[b]))),
    ):
        sizes = np.bincount(labels)
        groups = [hashes.ids[labels == g].tolist() for g in np.flatnonzero(sizes > 1)]
        print(f"distinct products, {name}: {len(hashes)} hashed, {len(groups)} false group(s) "
              f"holding {int(sizes[sizes > 1].sum())} images {groups}")  # fmt: skip
    a, b = hash_pairs(hashes)
    pairs = zip(hashes.ids[a], hashes.ids[b], pixel_difference(pixels[a], pixels[b]), strict=True)
    differences = ", ".join(f"{x} and {y}: {d:.3f}" for x, y, d in pairs)
    print(f"pixel difference of the distinct pairs whose hashes match: {differences or 'none'}")


def pixel_distributions(n: int, looser: tuple[int, int] = (24, 12)) -> None:
    """How the pixel check's threshold was chosen: on *train-set* products (the checks run on the test set), the
    pixel difference of every copy whose hashes match its original (the original's pixels from its thumbnail, as
    ingest reads a stored image's) against that of distinct lookalikes: pairs of distinct products whose hashes are
    within a looser distance (dHash <= looser[0], pHash <= looser[1]), since the rule itself lets no pair through
    there. The threshold keeps 99.5% of the hash-matched copies of every kind."""
    stored = [as_stored(im) for im in products(n, "train")]
    hashes = [content_hashes(im) for im in stored]
    thumbs = np.stack([content_pixels(as_thumbnail(im)) for im in stored])
    rows = HashArrays.from_rows(_hash_rows(hashes))
    rule = DEFAULT_RULE
    print(f"train-set products: {len(rows)} hashed; pixel difference of hash-matched copies to their originals "
          f"(rule: dHash <= {rule.max_dhash_bits}, pHash <= {rule.max_phash_bits})")  # fmt: skip
    print("| copy kind | hash-matched | median | 99th pct | 99.5th pct | max | lost at the threshold |")
    print("|---|---|---|---|---|---|---|")
    per_kind: dict[str, np.ndarray] = {}
    for kind, make in COPY_KINDS.items():
        differences = []
        for i, im in enumerate(stored):
            copy, original = content_hashes(as_stored(make(im))), hashes[i]
            if copy is None or original is None:
                continue
            if match_mask(HashArrays.from_rows(_hash_rows([original])), copy, rule=rule)[0]:
                differences.append(float(pixel_difference(copy.pixels, thumbs[i])))
        per_kind[kind] = np.array(differences)
    threshold = max(float(np.percentile(d, 99.5)) for d in per_kind.values())
    for kind, d in per_kind.items():
        lost = np.mean(d > rule.max_pixel_difference)
        print(f"| {kind} | {len(d):,} of {len(stored):,} | {np.median(d):.3f} | {np.percentile(d, 99):.3f} "
              f"| {np.percentile(d, 99.5):.3f} | {d.max():.3f} | {lost:.2%} |")  # fmt: skip
    loose = hash_pairs(rows, rule=MatchRule(max_dhash_bits=looser[0], max_phash_bits=looser[1]))
    lookalikes = pixel_difference(thumbs[rows.ids[loose[0]]], thumbs[rows.ids[loose[1]]])
    print(f"99.5th percentile of the worst kind: {threshold:.3f} (MatchRule.max_pixel_difference = "
          f"{rule.max_pixel_difference}); distinct lookalikes within dHash <= {looser[0]}, pHash <= {looser[1]}: "
          f"{len(lookalikes)} pairs, pixel difference min {lookalikes.min():.3f}, median {np.median(lookalikes):.3f}; "
          f"turned away at the rule's threshold: {np.mean(lookalikes > rule.max_pixel_difference):.0%}")  # fmt: skip


def costs(originals: list[PILImage.Image], stored: int = 100_000) -> None:
    t0 = time.perf_counter()
    hashes = [content_hashes(im) for im in originals[:500]]
    per_hash = (time.perf_counter() - t0) / 500
    boxes = [_content_grey(im) for im in originals[:500]]
    t0 = time.perf_counter()
    for box in boxes:
        _normalised_pixels(box)
    per_pixels = (time.perf_counter() - t0) / 500
    rng = np.random.default_rng(0)
    random = rng.integers(-(2**63), 2**63 - 1, size=(stored, 3), dtype=np.int64)
    rows = [(i + 1, int(a), int(b), int(c)) for i, (a, b, c) in enumerate(random)]
    t0 = time.perf_counter()
    index = HashIndex(HashArrays.from_rows(rows), ["train"] * stored)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, h in enumerate(hashes):
        assert h is not None
        index.matches(h)
        index.add(stored + i + 1, h, "train")
    per_match = (time.perf_counter() - t0) / len(hashes)
    t0 = time.perf_counter()
    group_labels(HashArrays.from_rows(rows[:10_000]))
    grouping = time.perf_counter() - t0
    print(f"content hashes: {per_hash * 1e3:.2f} ms per {SIZE} px image, of which their pixels (for the pixel check) "
          f"{per_pixels * 1e3:.3f} ms; match + append at "
          f"{stored:,} stored: {per_match * 1e3:.2f} ms per imported image; index built from {stored:,} rows in "
          f"{load:.2f} s (once per import batch); grouping 10,000 images (scan): {grouping:.1f} s")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for size in (SIZE, 1000):
            path = Path(folder) / f"{size}.jpg"
            thumb = make_thumbnail(originals[0].resize((size, size), PILImage.Resampling.BICUBIC), 256)
            thumb.save(path, "JPEG", quality=THUMBNAIL_QUALITY)
            t0 = time.perf_counter()
            for _ in range(200):
                content_pixels(open_normalised(path))  # what PixelCheck reads for a stored image
            print(f"pixel check: a stored {size} px image's pixels from its {thumb.width} px thumbnail "
                  f"{(time.perf_counter() - t0) / 200 * 1e3:.2f} ms (once per stored image a new one's hashes match, "
                  f"per import)")  # fmt: skip


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _store_groups(db: core_db.Database, fraction: float, rng: np.random.Generator) -> None:
    """Put `fraction` of the images in stored groups of 2 to 6 sharing the earliest member's split (2% of groups
    keep their own splits: imported before the hashes), every image checked."""
    with db.read() as session:
        rows = session.execute(select(Image.id, Image.split).order_by(Image.id)).all()
    chosen = rng.permutation(len(rows))[: int(fraction * len(rows))]
    updates, start = [], 0
    while start < len(chosen) - 1:
        members = sorted(int(i) for i in chosen[start : start + int(rng.integers(2, 7))])
        start += len(members)
        if len(members) < 2:
            break
        first_id, first_split = rows[members[0]]
        straddles = rng.random() < 0.02
        updates += [{"b_id": rows[m][0], "b_group": first_id,
                     "b_split": rows[m][1] if straddles else first_split} for m in members]  # fmt: skip
    with db.write() as session:
        session.execute(IMAGES.update().values(duplicate_group_id=None, duplicates_checked=True))
        session.execute(update_by_id, updates)


def stored_groups(workdir: Path, images: int = 100_000, repeat: int = 5) -> None:
    """The Duplicates page and Data health counts read the stored group ids: time them at `images` rows."""
    from streamlit.testing.v1 import AppTest

    os.environ["PRODCAT_DATA_DIR"] = str(workdir / "groups")
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    os.environ["PRODCAT_PRETRAINED"] = "none"
    get_settings.cache_clear()
    core_db.close_all()
    db = core_db.open_database(get_settings())
    t0 = time.perf_counter()
    populate(db, n_images=images, with_version=False)
    print(f"populated {images:,} images in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    print("| grouped images | counts ms | first page ms | last page ms | unchecked count ms | whole page ms "
          "| joining a group ms (later copy / first copy) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for fraction in (0.1, 0.5):
        _store_groups(db, fraction, rng)
        counts = duplicate_counts(db)
        last = duplicate_groups(db, page_size=10).pages
        counts_ms = _median_ms(lambda: duplicate_counts(db), repeat)
        first_ms = _median_ms(lambda: duplicate_groups(db, page=1, page_size=10), repeat)
        last_ms = _median_ms(partial(duplicate_groups, db, page=last, page_size=10), repeat)
        unchecked_ms = _median_ms(lambda: unchecked_images(db), repeat)
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "streamlit_app.py"), default_timeout=120)
        at.run().switch_page("pages/duplicates.py").run()
        assert not at.exception, at.exception
        page_ms = _median_ms(at.run, 3)
        later_ms, first_copy_ms = _join_cost(db, rng)
        print(f"| {counts.images:,} ({fraction:.0%}) in {counts.groups:,} groups, {counts.straddling:,} spanning "
              f"splits | {counts_ms:.1f} | {first_ms:.1f} | {last_ms:.1f} (page {last:,}) | {unchecked_ms:.1f} "
              f"| {page_ms:.0f} | {later_ms:.2f} / {first_copy_ms:.2f} |")  # fmt: skip
    db.dispose()
    core_db.close_all()
    random = rng.integers(-(2**63), 2**63 - 1, size=(10_000, 3), dtype=np.int64)
    t0 = time.perf_counter()
    group_labels(HashArrays.from_rows([(i + 1, int(a), int(b), int(c)) for i, (a, b, c) in enumerate(random)]))
    print(f"before: every Duplicates page load compared every pair; 10,000 images: {time.perf_counter() - t0:.2f} s")


def _join_cost(db: core_db.Database, rng: np.random.Generator, calls: int = 200) -> tuple[float, float]:
    """Median ms that joining a group adds to a matching new image's write transaction at ingest, for a later copy
    (matches two images of one group: a SELECT only) and a first copy (matches one image in no group: a SELECT and
    an UPDATE), against the same begun transaction without it. Rolled back, so the groups stay as they are."""
    with db.read() as session:
        grouped = session.execute(
            select(Image.duplicate_group_id, Image.id).where(Image.duplicate_group_id.is_not(None))
        ).all()
        loners = list(session.scalars(select(Image.id).where(Image.duplicate_group_id.is_(None))))
    by_group: dict[int, list[int]] = {}
    for group_id, image_id in grouped:
        assert group_id is not None  # selected where not null
        by_group.setdefault(group_id, []).append(image_id)
    groups = list(by_group.values())

    def one(matched: list[int] | None) -> float:
        t0 = time.perf_counter()
        with db.write() as session:
            session.execute(text("SELECT 1"))  # the insert's transaction has begun already
            if matched is not None:
                join_group(session, matched)
            session.rollback()
        return time.perf_counter() - t0

    base = statistics.median(one(None) for _ in range(calls))
    later = statistics.median(one(groups[int(rng.integers(len(groups)))][:2]) for _ in range(calls))
    first = statistics.median(one([loners[int(rng.integers(len(loners)))]]) for _ in range(calls))
    return (later - base) * 1e3, (first - base) * 1e3


def check_cost(originals: list[PILImage.Image], workdir: Path, n: int = 500, rounds: int = 3) -> None:
    """What the pixel check costs a copy-heavy import: `n` originals, then one copy of each per kind (every copy's
    hashes match, so every copy reads its original's thumbnail once), with the check and with it switched off
    (`PixelCheck.confirmed` returning the hash match), alternating round by round in one process. CPU ms per file."""
    uploads = [Upload(f"p{i}.jpg", encode(im, "JPEG", 90)) for i, im in enumerate(originals[:n])]
    copies = [Upload(f"{k}|p{i}.jpg", encode(make(im), "JPEG", 90))
              for k, make in COPY_KINDS.items() for i, im in enumerate(originals[:n])]  # fmt: skip
    confirmed = PixelCheck.confirmed

    def hashes_only(self: PixelCheck, session: object, match: object, query: object) -> object:
        return match

    results: dict[str, list[tuple[float, float]]] = {"with the pixel check": [], "hashes only": []}
    for r in range(rounds):
        for name in results if r % 2 == 0 else reversed(results):
            PixelCheck.confirmed = confirmed if name == "with the pixel check" else hashes_only  # type: ignore[method-assign,assignment]
            db = open_database(Settings(data_dir=workdir / f"cost{r}{name[0]}", auth="none"))
            import_uploads(db, uploads, actor="b")
            wall, cpu = time.perf_counter(), time.process_time()
            import_uploads(db, copies, actor="b")
            results[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            db.dispose()
    PixelCheck.confirmed = confirmed  # type: ignore[method-assign]
    for name, times in results.items():
        cpu = statistics.median(c for _, c in times) / len(copies) * 1e3
        walls = ", ".join(f"{w / len(copies) * 1e3:.1f}" for w, _ in times)
        print(f"{len(copies):,} copies after {n} originals, {name}: CPU {cpu:.2f} ms per file (median of "
              f"{rounds} rounds); wall {walls} ms per file")  # fmt: skip


PARTS = ("groups", "costs", "check-cost", "pixels", "false-groups", "splits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--images", type=int, default=100_000, help="catalogue size for the stored-groups part")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as workdir:
        if "groups" in parts:
            stored_groups(Path(workdir), args.images)
        if "pixels" in parts:
            pixel_distributions(args.n)
        if parts - {"groups", "pixels"}:
            originals = products(args.n)
            if "false-groups" in parts:
                false_groups(originals)
            if "costs" in parts:
                costs(originals)
            if "check-cost" in parts:
                check_cost(originals, Path(workdir))
            if "splits" in parts:
                split_agreement(originals, Path(workdir))


if __name__ == "__main__":
    main()
