"""Duplicate commands of the CLI: `duplicates scan` fills missing content hashes and reports near-duplicate groups."""

from __future__ import annotations

import typer

from core.cli_app import JsonOpt, ProdcatTyper, app, open_db, print_json
from core.duplicates import DuplicateReport, backfill_hashes, duplicate_groups

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
    then report the near-duplicate groups. Splits are never changed: a group that straddles splits is reported
    as it stands, so every model version stays measured on the same test images.
    """
    db = open_db()
    filled = backfill_hashes(db)
    report = duplicate_groups(db)
    if as_json:
        print_json({"hashed": filled.hashed, "unreadable": filled.unreadable, "report": report})
        return
    typer.echo(f"Hashed {filled.hashed:,} image(s) imported before near-duplicate hashes existed.")
    for image_id, reason in filled.unreadable[:MAX_LISTED]:
        typer.echo(f"  image {image_id}: original unreadable ({reason})")
    _print_report(report)


def _print_report(report: DuplicateReport) -> None:
    grouped = sum(len(g.members) for g in report.groups)
    compared = report.images_compared
    typer.echo(f"{len(report.groups):,} group(s) of near-duplicates ({grouped:,} of {compared:,} images).")
    for group in report.groups[:MAX_LISTED]:
        names = ", ".join(f"{m.image_id} {m.name!r} ({m.split})" for m in group.members)
        flag = "  [straddles splits: " + "/".join(group.splits) + "]" if group.straddles_splits else ""
        typer.echo(f"  group {group.group_id}: {names}{flag}")
    if len(report.groups) > MAX_LISTED:
        typer.echo(f"  ... and {len(report.groups) - MAX_LISTED:,} more")
    straddling = len(report.straddling)
    typer.echo(
        f"{straddling:,} group(s) straddle splits (imported before the hashes existed). Splits are fixed so model "
        "versions stay comparable: no image was moved. Keep one image per group on the Duplicates page to resolve them."
    )
