"""Near-duplicates: copies group at ingest by Hamming distance and their groups are stored, distinct pictures do not
group, scan backfills hashes and groups, keep one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw
from sqlalchemy import select, text, update
from typer.testing import CliRunner

import core.cli  # noqa: F401  (registers every command module on the app)
from core.catalog.duplicates import (
    DEFAULT_RULE,
    DuplicateCounts,
    HashArrays,
    PixelCheck,
    duplicate_counts,
    duplicate_groups,
    group_labels,
    join_group,
    keep_one,
    match_mask,
    pixel_difference,
    scan_duplicates,
)
from core.catalog.imaging import content_hashes, content_pixels, open_normalised
from core.catalog.ingest import Upload, import_uploads
from core.catalog.splits import split_for_hash
from core.catalog.store import original_path, thumbnail_path
from core.cli.app import app
from core.db import Database
from core.errors import DuplicateRefused, NotFound
from core.schema import Image, ImageEvent, LabelEvent
from tests.imagegen import COPY_KINDS, encode, make_image

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def product_photo(name: str) -> PILImage.Image:
    """A product shot: the sample photo, 240 px wide, on a plain white 320 px canvas (a crop of a full-frame photo
    moves everything in it, and is not reliably caught: see docs/benchmarks.md)."""
    img = PILImage.fromarray(getattr(skimage_data, name)()).convert("RGB")
    img = img.resize((240, round(240 * img.height / img.width)), PILImage.Resampling.LANCZOS)
    canvas = PILImage.new("RGB", (320, 320), (255, 255, 255))
    canvas.paste(img, (40, (320 - img.height) // 2))
    return canvas


def shapes_photo(seed: int, size: int = 128) -> PILImage.Image:
    """A distinct synthetic product shot: four seeded ellipses and boxes on white (none of 200 group together)."""
    rng = np.random.default_rng(seed)
    img = PILImage.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(8, size // 2, 2))
        x1, y1 = (int(v) for v in np.array([x0, y0]) + rng.integers(16, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def _copies(name: str) -> list[Upload]:
    photo = product_photo(name)
    return [Upload(f"{name}-{kind}.jpg", encode(make(photo), "JPEG", 90)) for kind, make in COPY_KINDS.items()]


def _rows(db: Database) -> dict[str, Image]:
    with db.read() as session:
        rows = {r.original_name: r for r in session.scalars(select(Image))}
        session.expunge_all()  # plain objects: the read session's rollback must not expire them
    return rows


def test_resized_reencoded_cropped_and_watermarked_copies_join_their_originals_split(db: Database) -> None:
    originals = [Upload(f"{name}.png", encode(product_photo(name))) for name in PHOTOS]
    assert not import_uploads(db, originals, actor="alice").refused
    copies = [u for name in PHOTOS for u in _copies(name)]
    assert not import_uploads(db, copies, actor="bob").refused  # a later batch
    rows, fractions = _rows(db), db.settings.split_fractions
    moved = 0
    for name in PHOTOS:
        for kind in COPY_KINDS:
            copy = rows[f"{name}-{kind}.jpg"]
            assert copy.split == rows[f"{name}.png"].split, (name, kind)
            moved += copy.split != str(split_for_hash(copy.sha256, fractions))
    assert moved > 0  # some copies would have landed elsewhere by their own bytes
    groups = duplicate_groups(db).groups
    assert sorted(len(g.members) for g in groups) == [len(COPY_KINDS) + 1] * len(PHOTOS)
    assert not any(g.straddles_splits for g in groups)


def test_copies_within_one_batch_group_with_the_first_of_them(db: Database) -> None:
    uploads = [Upload("coffee.png", encode(product_photo("coffee"))), *_copies("coffee")]
    assert not import_uploads(db, uploads, actor="alice").refused
    rows = _rows(db)
    assert {r.split for r in rows.values()} == {rows["coffee.png"].split}
    assert len(duplicate_groups(db).groups) == 1


def test_distinct_pictures_keep_their_own_split_and_form_no_group(db: Database) -> None:
    uploads = [
        Upload(f"{c}_{i}.png", encode(make_image(c, i, size=96))) for c in ("Shoes", "Bags", "Hats") for i in range(8)
    ]
    uploads += [Upload(f"{name}.png", encode(product_photo(name))) for name in PHOTOS]
    assert not import_uploads(db, uploads, actor="alice").refused
    rows = _rows(db)
    assert all(r.box_phash is not None for r in rows.values())
    assert all(r.split == str(split_for_hash(r.sha256, db.settings.split_fractions)) for r in rows.values())
    assert duplicate_groups(db).groups == []


def _as_before_stored_groups(db: Database, *, hashes: bool) -> None:
    """Make every image look imported before migration 0006 (and, with `hashes`, before 0005 too)."""
    values: dict[str, object] = {"duplicate_group_id": None, "duplicates_checked": False}
    if hashes:
        values |= {"box_dhash_h": None, "box_dhash_v": None, "box_phash": None}
    with db.write() as session:
        session.execute(update(Image).values(**values))


def test_scan_fills_missing_hashes_and_stores_straddling_groups_without_moving_images(db: Database) -> None:
    assert not import_uploads(
        db, [Upload("rocket.png", encode(product_photo("rocket"))), *_copies("rocket")], actor="a"
    ).refused
    _as_before_stored_groups(db, hashes=True)
    with db.write() as session:  # the copy got its own bytes' split back then
        session.execute(update(Image).where(Image.original_name == "rocket-half size.jpg").values(split="zzz"))
    before = {n: r.split for n, r in _rows(db).items()}
    assert duplicate_counts(db) == DuplicateCounts(0, 0, 0) and duplicate_groups(db).unchecked == len(before)
    result = CliRunner().invoke(app, ["duplicates", "scan"])
    assert result.exit_code == 0, result.output
    assert f"Hashed {len(before)} image(s)" in result.output
    assert "1 group(s) straddle splits" in result.output and "no image was moved" in result.output
    assert {n: r.split for n, r in _rows(db).items()} == before
    assert all(r.box_phash is not None and r.duplicates_checked for r in _rows(db).values())
    first = min(r.id for r in _rows(db).values())
    assert {r.duplicate_group_id for r in _rows(db).values()} == {first}  # the earliest image's id
    assert duplicate_counts(db) == DuplicateCounts(groups=1, images=len(before), straddling=1)
    report = duplicate_groups(db)
    assert report.unchecked == 0 and report.groups[0].straddles_splits
    again = json.loads(CliRunner().invoke(app, ["duplicates", "scan", "--json"]).stdout)
    assert again["scan"]["hashed"] == 0 and again["scan"]["counts"]["groups"] == 1
    assert len(again["first_groups"]) == 1


def test_scan_groups_images_hashed_before_groups_were_stored(db: Database) -> None:
    """A database upgraded from 0005: hashes present, groups never worked out until the scan."""
    uploads = [Upload("coffee.png", encode(product_photo("coffee"))), *_copies("coffee")[:2]]
    uploads.append(Upload("hat.png", encode(make_image("Hats", 1, size=96))))
    assert not import_uploads(db, uploads, actor="a").refused
    _as_before_stored_groups(db, hashes=False)
    assert duplicate_groups(db).groups == [] and duplicate_groups(db).unchecked == 4
    result = CliRunner().invoke(app, ["duplicates", "scan"])
    assert result.exit_code == 0, result.output
    assert "Hashed 0 image(s)" in result.output and "1 group(s) of near-duplicates (3 of 4 images)" in result.output
    report = duplicate_groups(db)
    assert report.unchecked == 0 and [len(g.members) for g in report.groups] == [3]


def _group_sets(labels: np.ndarray, ids: np.ndarray) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for label, image_id in zip(labels, ids, strict=True):
        groups.setdefault(int(label), set()).add(int(image_id))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_groups_stored_at_ingest_are_those_of_comparing_every_pair(db: Database) -> None:
    """A few hundred images in three batches (copies within and across batches): the stored group ids, read back
    page by page in SQL, give exactly the groups the all-pairs comparison finds, with the earliest id as group id."""
    distinct, photos = [shapes_photo(i) for i in range(200)], [product_photo(name) for name in PHOTOS]
    kinds = list(COPY_KINDS.items())

    def copies(images: list[PILImage.Image], tag: str, picks: range, chosen: list) -> list[Upload]:
        return [Upload(f"{tag}{i} {k}.jpg", encode(make(images[i]), "JPEG", 90)) for i in picks for k, make in chosen]

    first = [Upload(f"s{i}.png", encode(im)) for i, im in enumerate(distinct)]
    first += [Upload(f"p{i}.png", encode(im)) for i, im in enumerate(photos)]
    first += copies(distinct, "s", range(10), kinds[1:2])  # copies within the batch of their originals
    second = copies(distinct, "s", range(0, 80, 2), kinds[:2]) + copies(photos, "p", range(5), kinds[:3])
    third = copies(distinct, "s", range(0, 80, 4), kinds[2:]) + copies(photos, "p", range(5), kinds[3:])
    for batch in (first, second, third):
        assert not import_uploads(db, batch, actor="a").refused
    rows = sorted(_rows(db).values(), key=lambda r: r.id)
    assert len(rows) > 300
    hashed = [r for r in rows if r.box_phash is not None]
    hashes = HashArrays.from_rows([(r.id, r.box_dhash_h, r.box_dhash_v, r.box_phash) for r in hashed])
    expected = _group_sets(group_labels(hashes, check=PixelCheck(db.settings).pair_check(db, hashes.ids)), hashes.ids)
    assert len(expected) >= 40 and max(len(g) for g in expected) >= 6  # most copies group, some groups are big

    stored: dict[int, set[int]] = {}
    for r in rows:
        if r.duplicate_group_id is not None:
            stored.setdefault(r.duplicate_group_id, set()).add(r.id)
    assert {frozenset(g) for g in stored.values()} == expected
    assert all(group_id == min(members) for group_id, members in stored.items())

    counts = duplicate_counts(db)
    # A copy that matched no earlier image took its own split; a later copy matching it and its original bridges
    # the two into one group spanning splits (splits never move): such groups are counted and listed first.
    split_of = {r.id: r.split for r in rows}
    straddling = sum(len({split_of[i] for i in g}) > 1 for g in expected)
    counts = duplicate_counts(db)
    assert counts == DuplicateCounts(len(expected), sum(len(g) for g in expected), straddling)
    pages = duplicate_groups(db, page_size=4).pages
    paged = [g for page in range(1, pages + 1) for g in duplicate_groups(db, page=page, page_size=4).groups]
    assert {frozenset(m.image_id for m in g.members) for g in paged} == expected and len(paged) == len(expected)
    order = [(g.straddles_splits, len(g.members), max(m.image_id for m in g.members)) for g in paged]
    assert order == sorted(order, reverse=True)  # spanning splits first, then the biggest, then the newest
    assert duplicate_groups(db, page=999, page_size=4).page == pages  # past the end: the last page


def pullover(neck: str) -> PILImage.Image:
    """A shaded long-sleeve pullover on white, 240 px, with a crew or a deep V neck: two distinct products whose
    perceptual hashes are within the match rule (like Fashion-MNIST's test products 55 and 781) but whose pixels
    are not."""
    yy, xx = np.mgrid[0:240, 0:240]
    shade = 50 + 0.35 * xx + 0.15 * yy + 12 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    mask = PILImage.new("L", (240, 240), 0)
    draw = ImageDraw.Draw(mask)
    body = [(70, 40), (170, 40), (200, 70), (215, 200), (185, 205), (175, 110)]
    draw.polygon([*body, (175, 210), (65, 210), (65, 110), (55, 205), (25, 200), (40, 70)], fill=255)
    if neck == "crew":
        draw.ellipse([100, 28, 140, 55], fill=0)
    else:
        draw.polygon([(105, 40), (135, 40), (120, 130)], fill=0)
    white = PILImage.new("L", (240, 240), 255)
    return PILImage.composite(PILImage.fromarray(shade.clip(0, 255).astype(np.uint8)), white, mask).convert("RGB")


def test_lookalike_products_whose_hashes_match_stay_apart_while_copies_still_group(db: Database) -> None:
    crew, vneck = pullover("crew"), pullover("v")
    uploads = [Upload("crew.png", encode(crew)), Upload("vneck.png", encode(vneck))]
    uploads += [Upload(f"crew {kind}.jpg", encode(COPY_KINDS[kind](crew), "JPEG", 90)) for kind in COPY_KINDS]
    assert not import_uploads(db, uploads, actor="a").refused
    rows = _rows(db)
    # The premise: by their hashes alone the two pullovers are near-duplicates; pixel for pixel they are not.
    crew_hashes, vneck_hashes = (
        content_hashes(open_normalised(original_path(db.settings, rows[name]))) for name in ("crew.png", "vneck.png")
    )
    assert crew_hashes is not None and vneck_hashes is not None
    stored = HashArrays.from_rows([(1, crew_hashes.dhash_h, crew_hashes.dhash_v, crew_hashes.phash)])
    assert match_mask(stored, vneck_hashes)[0]
    assert pixel_difference(crew_hashes.pixels, vneck_hashes.pixels) > DEFAULT_RULE.max_pixel_difference

    def outcome() -> tuple[list[set[str]], dict[str, str]]:
        groups = [{m.name for m in g.members} for g in duplicate_groups(db).groups]
        return groups, {name: r.split for name, r in _rows(db).items()}

    copies = {f"crew {kind}.jpg" for kind in COPY_KINDS}
    groups, splits = outcome()
    assert groups == [{"crew.png", *copies}]  # every copy still joins; the V-neck does not
    assert {splits[name] for name in copies} == {splits["crew.png"]}
    assert splits["vneck.png"] == str(split_for_hash(rows["vneck.png"].sha256, db.settings.split_fractions))

    # A false group stored before the pixel check: `duplicates scan` takes the V-neck out (its split stays).
    with db.write() as session:
        session.execute(
            update(Image).where(Image.original_name == "vneck.png").values(duplicate_group_id=rows["crew.png"].id)
        )
    assert scan_duplicates(db).counts == DuplicateCounts(groups=1, images=len(copies) + 1, straddling=0)
    assert outcome() == (groups, splits)


def test_pixel_check_reads_forgotten_thumbnails_again_and_lets_an_unreadable_one_pass(db: Database) -> None:
    uploads = [Upload(f"p{i}.png", encode(pullover(neck))) for i, neck in enumerate(("crew", "v"))]
    uploads.append(Upload("coffee.png", encode(product_photo("coffee"))))
    assert not import_uploads(db, uploads, actor="a").refused
    rows = sorted(_rows(db).values(), key=lambda r: r.id)
    ids = [r.id for r in rows]
    from_files = np.stack([content_pixels(open_normalised(thumbnail_path(db.settings, r))) for r in rows])
    check = PixelCheck(db.settings, cache_size=2)  # keeps two of the three
    with db.read() as session:
        for _ in range(2):
            np.testing.assert_array_equal(check.pixels(session, [*ids, ids[0]]), [*from_files, from_files[0]])
        thumbnail_path(db.settings, rows[2]).unlink()
        check = PixelCheck(db.settings)
        unreadable = check.pixels(session, ids[2:])
    assert np.isnan(unreadable).all()
    assert check.agree(unreadable, from_files[:1]).tolist() == [True]  # the hash match stands, as before the check
    assert check.agree(from_files[1:2], from_files[:1]).tolist() == [False]  # the two pullovers


def test_a_new_image_matching_two_groups_merges_them_under_the_older_id(db: Database) -> None:
    with db.write() as session:
        images = [
            Image(
                sha256=f"{i:064x}",
                stored_path=f"o{i}",
                thumb_path=f"t{i}",
                width=1,
                height=1,
                format="PNG",
                file_size=1,
                original_name=f"{i}.png",
                split="train",
                uploaded_by="a",
                duplicates_checked=True,
            )
            for i in range(6)
        ]
        session.add_all(images)
        session.flush()
        ids = [image.id for image in images]
        # ids[0] is alone; ids[1..2] form group ids[1]; ids[3..5] form group ids[3]
        session.execute(update(Image).where(Image.id.in_(ids[1:3])).values(duplicate_group_id=ids[1]))
        session.execute(update(Image).where(Image.id.in_(ids[3:6])).values(duplicate_group_id=ids[3]))
    with db.write() as session:
        assert join_group(session, [ids[4], ids[2]]) == ids[1]  # bridges both groups: the older id wins
    assert {r.id: r.duplicate_group_id for r in _rows(db).values()} == {ids[0]: None, **dict.fromkeys(ids[1:], ids[1])}
    with db.write() as session:
        assert join_group(session, [ids[5], ids[0]]) == ids[0]  # a lone older image joins and gives its id
    assert {r.duplicate_group_id for r in _rows(db).values()} == {ids[0]}
    assert duplicate_counts(db) == DuplicateCounts(groups=1, images=6, straddling=0)
    with db.write() as session:
        assert join_group(session, [999]) is None  # the match was deleted meanwhile


def test_keep_one_deletes_the_others_with_audit_rows_and_their_files(db: Database) -> None:
    uploads = [Upload("chelsea.png", encode(product_photo("chelsea"))), *_copies("chelsea")[:2]]
    assert not import_uploads(db, uploads, category="Cats", actor="alice").refused
    group = duplicate_groups(db).groups[0]
    keep, others = group.members[1], [m for m in group.members if m.image_id != group.members[1].image_id]
    files = {m.image_id: (db.settings.data_dir / _rows(db)[m.name].stored_path, m.thumb_path) for m in group.members}
    deleted = keep_one(db, [m.image_id for m in group.members], keep.image_id, actor="carol")
    assert sorted(d.image_id for d in deleted) == sorted(m.image_id for m in others)
    assert set(_rows(db)) == {keep.name}
    with db.read() as session:
        events = session.scalars(select(ImageEvent).order_by(ImageEvent.image_id)).all()
        label_events = session.scalars(select(LabelEvent.image_id)).all()
        session.expunge_all()
    assert [(e.image_id, e.action, e.actor) for e in events] == [(m.image_id, "delete", "carol") for m in others]
    assert all(f"duplicate of image {keep.image_id} (kept); label was 'Cats'" in e.note for e in events)
    assert label_events == [keep.image_id]  # the deleted images' label history went with them; the note keeps it
    for m in group.members:
        assert all(p.exists() == (m.image_id == keep.image_id) for p in files[m.image_id])
    assert _rows(db)[keep.name].duplicate_group_id is None  # alone now: in no group
    assert duplicate_counts(db) == DuplicateCounts(0, 0, 0) and duplicate_groups(db).groups == []


def test_keep_one_of_a_stale_group_leaves_a_later_copy_grouped_under_the_next_earliest_id(db: Database) -> None:
    uploads = [Upload("coffee.png", encode(product_photo("coffee"))), *_copies("coffee")[:1]]
    assert not import_uploads(db, uploads, actor="a").refused
    shown = [m.image_id for m in duplicate_groups(db).groups[0].members]  # the page as a person saw it
    assert not import_uploads(db, _copies("coffee")[1:2], actor="b").refused  # a copy arrives meanwhile
    keep_one(db, shown, shown[1], actor="carol")  # the earliest image is deleted
    groups = duplicate_groups(db).groups
    assert len(groups) == 1 and groups[0].group_id == shown[1] and len(groups[0].members) == 2
    assert {r.duplicate_group_id for r in _rows(db).values()} == {shown[1]}


def test_keep_one_refuses_a_keep_id_outside_the_group_and_unknown_ids(db: Database) -> None:
    assert not import_uploads(
        db, [Upload("coffee.png", encode(product_photo("coffee"))), *_copies("coffee")[:1]], actor="a"
    ).refused
    ids = [m.image_id for m in duplicate_groups(db).groups[0].members]
    with pytest.raises(DuplicateRefused, match="not in this group"):
        keep_one(db, ids, 999, actor="carol")
    with pytest.raises(DuplicateRefused, match="at least two"):
        keep_one(db, ids[:1], ids[0], actor="carol")
    with pytest.raises(NotFound, match="no longer exist"):
        keep_one(db, [*ids, 998], ids[0], actor="carol")
    assert len(_rows(db)) == 2
    with db.read() as session:
        assert session.execute(text("SELECT COUNT(*) FROM image_events")).scalar_one() == 0
