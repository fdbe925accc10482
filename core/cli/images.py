"""Image commands of the CLI: `images delete` removes images (audited, files removed once no row needs them);
`images set-sku` gives images a product SKU (audited); `images check-files` compares the stored files with the rows
(and with --fix removes what a killed import left behind)."""

from __future__ import annotations

from typing import Annotated

import typer

from core.catalog.deletion import delete_images
from core.catalog.filecheck import GRACE_SECONDS, check_files, remove_strays
from core.catalog.skus import set_sku
from core.cli.app import ActorOpt, JsonOpt, ProdcatTyper, actor_or_default, app, fail, open_db, print_json

images_app = ProdcatTyper(
    help="Catalogue images: delete, set SKUs, check the stored files.", no_args_is_help=True, add_completion=False
)
app.add_typer(images_app, name="images")


@images_app.command("delete")
def images_delete(
    image_ids: Annotated[list[int], typer.Argument(metavar="ID...", help="Ids of the images to delete.")],
    reason: Annotated[
        str, typer.Option("--reason", metavar="TEXT", help="Why, for the audit trail (image_events).")
    ] = "deleted with `images delete`",
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete images: their labels, predictions and checks go with them, an audit row each records name, hash and
    label, and their stored files are removed. Unknown ids refuse the whole command before anything changes."""
    deleted = delete_images(open_db(), image_ids, actor=actor_or_default(actor), reason=reason)
    if as_json:
        print_json(deleted)
        return
    for item in deleted:
        label = f"label {item.label!r}" if item.label is not None else "unlabelled"
        typer.echo(f"Deleted image {item.image_id} ({item.name}, {label}; {item.files_removed} files removed).")


@images_app.command("set-sku")
def images_set_sku(
    image_ids: Annotated[list[int], typer.Argument(metavar="ID...", help="Ids of the images (photos of one product).")],
    sku: Annotated[
        str | None, typer.Option("--sku", metavar="SKU", help="The product's SKU (at most 64 characters).")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the images' SKU.")] = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give images a product SKU (--sku) or remove it (--clear), with an audit row per image changed. The review
    page's search finds them by SKU. Unknown ids or a refused SKU change nothing."""
    if (sku is None) == (not clear):
        raise fail("give either --sku SKU or --clear")
    if sku is not None and not sku.strip():
        raise fail("--sku is empty: give the SKU, or --clear to remove one")
    changes = set_sku(open_db(), image_ids, None if clear else sku, actor=actor_or_default(actor))
    if as_json:
        print_json(changes)
        return
    for change in changes:
        if not change.changed:
            typer.echo(f"Image {change.image_id}: SKU already {change.new!r}.")
        elif change.new is None:
            typer.echo(f"Image {change.image_id}: SKU {change.old!r} removed.")
        else:
            typer.echo(
                f"Image {change.image_id}: SKU {change.new!r}" + (f" (was {change.old!r})." if change.old else ".")
            )


@images_app.command("check-files")
def images_check_files(
    fix: Annotated[
        bool, typer.Option("--fix", help="Remove the stray and temporary files found (an admin's action).")
    ] = False,
    grace_minutes: Annotated[
        float,
        typer.Option(
            "--grace-minutes", min=0.0, help="Leave files younger than this alone (an import may be running)."
        ),
    ] = GRACE_SECONDS / 60,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare the files under images/ and thumbs/ with the catalogue's rows: stored files no row names and temporary
    files of unfinished writes (what a killed import or worker leaves; --fix removes them), and rows whose files are
    gone (listed; re-import the photos or delete those images). Exits 1 while anything is left to look at."""
    db = open_db()
    found = check_files(db, grace_seconds=grace_minutes * 60)
    removed = remove_strays(db, found, actor=actor_or_default(actor)) if fix else 0
    if as_json:
        print_json({"check": found, "removed": removed})
    else:
        typer.echo(f"{found.files:,} files, {found.rows:,} images.")
        typer.echo(
            f"Stored files no image names: {len(found.strays):,}; temporary files left: {len(found.leftovers):,}."
        )
        if found.recent:
            typer.echo(f"Left alone, younger than {grace_minutes:g} minutes: {found.recent:,}.")
        for item in found.missing:
            typer.echo(f"Image {item.image_id}: its {item.kind} {item.path} is missing.")
        if fix:
            typer.echo(f"Removed {removed:,} file{'' if removed == 1 else 's'}.")
        elif found.strays or found.leftovers:
            typer.echo("Run again with --fix to remove them.")
    if found.missing or ((found.strays or found.leftovers) and not fix):
        raise typer.Exit(1)
