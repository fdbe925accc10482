"""Image commands of the CLI: `images delete` removes images (audited, files removed once no row needs them)."""

from __future__ import annotations

from typing import Annotated

import typer

from core.cli_app import ActorOpt, JsonOpt, ProdcatTyper, actor_or_default, app, open_db, print_json
from core.deletion import delete_images

images_app = ProdcatTyper(help="Catalogue images: delete.", no_args_is_help=True, add_completion=False)
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
