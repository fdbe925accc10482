"""Duplicate commands of the CLI: `duplicates scan` fills missing content hashes and stores near-duplicate groups."""

from __future__ import annotations

import typer

from core.catalog.duplicates import duplicate_groups, scan_duplicates
from core.cli.app import JsonOpt, ProdcatTyper, app, open_db, print_json

duplicates_app = ProdcatTyper(
    help="Near-duplicate images (resized, re-encoded, cropped or watermarked copies).",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(duplicates_app, name="duplicates")
MAX_LISTED = 20  # groups listed one by one before "... and N more"


@duplicates_app.command("scan")
def scan_command(as_json: JsonOpt = False) -> None:
    """Give every image imported before the content hashes existed its hashes (decoding its stored original),
    then compare every pair of images and store each one's near-duplicate group (run it once after upgrading a
    database from before stored groups; ingest keeps them up to date afterwards). Splits are never changed: a
    group that straddles splits is reported as it stands, so every model version stays measured on the same test
    images.
    """
    db = open_db()
    scan = scan_duplicates(db)
    report = duplicate_groups(db, page=1, page_size=MAX_LISTED)
    if as_json:
        print_json({"scan": scan, "first_groups": report.groups})
        return
    typer.echo(f"Hashed {scan.hashed:,} image(s) imported before near-duplicate hashes existed.")
    for image_id, reason in scan.unreadable[:MAX_LISTED]:
        typer.echo(f"  image {image_id}: original unreadable ({reason})")
    counts = scan.counts
    typer.echo(
        f"{counts.groups:,} group(s) of near-duplicates ({counts.images:,} of {scan.images_compared:,} images), "
        "stored for the Duplicates page."
    )
    for group in report.groups:
        names = ", ".join(f"{m.image_id} {m.name!r} ({m.split})" for m in group.members)
        flag = "  [straddles splits: " + "/".join(group.splits) + "]" if group.straddles_splits else ""
        typer.echo(f"  group {group.group_id}: {names}{flag}")
    if counts.groups > len(report.groups):
        typer.echo(f"  ... and {counts.groups - len(report.groups):,} more")
    typer.echo(
        f"{counts.straddling:,} group(s) straddle splits (imported before the hashes existed). Splits are fixed so "
        "model versions stay comparable: no image was moved. Keep one image per group on the Duplicates page to "
        "resolve them."
    )
