"""Label commands of the CLI that work on many images at once: `labels accept-predictions`."""

from __future__ import annotations

from typing import Annotated

import typer

from core.cli.app import ActorOpt, JsonOpt, ProdcatTyper, actor_or_default, app, open_db, print_json
from core.schema import Split
from core.views.accept import accept_predictions

labels_app = ProdcatTyper(
    help="Labels in bulk: accept the model's confident predictions.", no_args_is_help=True, add_completion=False
)
app.add_typer(labels_app, name="labels")


@labels_app.command("accept-predictions")
def accept_predictions_command(
    min_confidence: Annotated[
        float,
        typer.Option("--min-confidence", min=0.0, max=1.0, help="Least confidence to accept (0.9 = 90%)."),
    ],
    category: Annotated[
        str | None, typer.Option("--category", metavar="NAME", help="Only images predicted as NAME.")
    ] = None,
    split: Annotated[Split | None, typer.Option("--split", help="Only this split.", case_sensitive=False)] = None,
    search: Annotated[
        str | None, typer.Option("--search", metavar="TEXT", help="Image id or part of the file name.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say how many would be labelled.")] = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Label every unlabelled image whose active-model prediction is at least --min-confidence with its predicted
    category, as one batch that `undo` takes back in one step. --dry-run previews."""
    result = accept_predictions(
        open_db(),
        min_confidence=min_confidence,
        actor=actor_or_default(actor),
        dry_run=dry_run,
        category=category,
        split=split,
        search=search,
    )
    if as_json:
        print_json(result)
        return
    typer.echo(f"{result.describe()} (model v{result.version_id}).")
    if not dry_run and result.count:
        typer.echo("`undo` takes this batch back in one step.")
