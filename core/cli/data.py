"""Data commands of the CLI: import, categories, label/unlabel/undo/history, stats, export."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from core.catalog import export as export_mod
from core.catalog import labels as labels_mod
from core.catalog.ingest import ImportResult, RefusedItem, import_paths, stored_before
from core.catalog.stats import catalogue_stats
from core.cli.app import (
    ActorOpt,
    JsonOpt,
    actor_or_default,
    app,
    categories_app,
    export_app,
    fail,
    open_db,
    print_json,
)

MAX_LISTED = 20  # duplicates listed one by one before "... and N more"

CategoryArg = Annotated[str, typer.Argument(help="Category name (or its numeric id).", show_default=False)]


# --- import --------------------------------------------------------------------------------------------------


@app.command("import")
def import_command(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Image files, folders (searched recursively) and .zip archives.", show_default=False),
    ],
    labels_from_folders: Annotated[
        bool,
        typer.Option(
            "--labels-from-folders",
            help="ImageFolder layout: each image's parent folder (below the PATH given) is its category.",
        ),
    ] = False,
    labels_csv: Annotated[
        Path | None,
        typer.Option(
            "--labels-csv",
            metavar="FILE",
            help="A `filename,category` CSV giving each image's label, with an optional `sku` column.",
        ),
    ] = None,
    category: Annotated[
        str | None, typer.Option("--category", metavar="NAME", help="Label every imported image with NAME.")
    ] = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import product photos into the catalogue, optionally with labels.

    Duplicates (same bytes) are stored once. Files that are not acceptable images are refused with the
    reason and everything else still goes in. Exit code 1 only when nothing could be imported and
    something was refused.
    """
    chosen = [flag for flag, on in (("--labels-from-folders", labels_from_folders),
                                     ("--labels-csv", labels_csv is not None),
                                     ("--category", category is not None)) if on]  # fmt: skip
    if len(chosen) > 1:
        raise fail(f"choose one way to label: {' and '.join(chosen)} were both given")
    if labels_csv is not None and not labels_csv.is_file():
        raise fail(f"labels CSV {labels_csv} does not exist or is not a file")

    missing = [RefusedItem(str(p), "no such file or folder") for p in paths if not p.exists()]
    existing = [p for p in paths if p.exists()]
    db = open_db()
    result = ImportResult()
    if existing:
        with tqdm(desc="Importing", unit="file", file=sys.stderr, disable=as_json, dynamic_ncols=True) as bar:

            def progress(done: int, total: int | None, name: str) -> None:
                if total is not None and bar.total != total:
                    bar.total = total
                bar.set_postfix_str(name[-40:], refresh=False)
                bar.update(max(0, done - bar.n))

            try:
                result = import_paths(
                    db,
                    existing,
                    labels_from_folders=labels_from_folders,
                    labels_csv=labels_csv,
                    category=category,
                    actor=actor_or_default(actor),
                    progress=progress,
                )
            except Exception as exc:  # the error is reported by the CLI's handler; first what was stored before it
                if (partial := stored_before(exc)) is not None and not as_json:
                    bar.close()
                    partial.refused[:0] = missing
                    typer.secho("The import stopped on an error. Stored before it:", bold=True)
                    _print_import_summary(partial)
                raise
    result.refused[:0] = missing

    if as_json:
        print_json({"summary": result.summary(), **vars(result)})
    else:
        _print_import_summary(result)
    if not result.imported and result.refused:
        raise typer.Exit(1)


def _print_import_summary(result: ImportResult) -> None:
    typer.secho(result.summary(), bold=True)
    labelled = Counter(item.category for item in result.imported if item.category)
    if labelled:
        typer.echo("Labelled: " + ", ".join(f"{name} {n}" for name, n in sorted(labelled.items())))
    if result.duplicates:
        typer.echo("Already in the catalogue (same bytes):")
        for dup in result.duplicates[:MAX_LISTED]:
            typer.echo(f"  {dup.name} = image {dup.image_id} ({dup.existing_name})")
        if len(result.duplicates) > MAX_LISTED:
            typer.echo(f"  ... and {len(result.duplicates) - MAX_LISTED} more")
    for note in result.notes:
        typer.secho(f"Note: {note}", fg=typer.colors.YELLOW, err=True)
    if result.refused:
        # Every refusal is listed: each is a file the user has to look at.
        typer.secho("Refused:", fg=typer.colors.RED, err=True)
        for item in result.refused:
            typer.secho(f"  {item.name}: {item.reason}", fg=typer.colors.RED, err=True)


# --- categories ----------------------------------------------------------------------------------------------


@categories_app.command("list")
def categories_list(
    include_archived: Annotated[
        bool, typer.Option("--all", "-a", help="Also show archived and merged categories.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List categories with how many images are labelled with each."""
    rows = labels_mod.list_categories(open_db(), include_archived=include_archived)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("No categories yet: `categories add NAME` or import with --labels-from-folders.")
        return
    width = max(len(r.name) for r in rows)
    typer.echo(f"{'id':>5}  {'name':<{width}}  {'labelled':>8}  status")
    for r in rows:
        status = f"merged into {r.merged_into}" if r.merged_into else ("archived" if r.archived else "")
        typer.echo(f"{r.id:>5}  {r.name:<{width}}  {r.labelled:>8}  {status}".rstrip())


@categories_app.command("add")
def categories_add(
    name: Annotated[str, typer.Argument(help="The new category's name.", show_default=False)],
    actor: ActorOpt = None,
) -> None:
    """Add a new, empty category."""
    row = labels_mod.add_category(open_db(), name, actor=actor_or_default(actor))
    typer.echo(f"Added category {row.name!r} (id {row.id}).")


@categories_app.command("rename")
def categories_rename(
    old: CategoryArg,
    new: Annotated[str, typer.Argument(help="The new name.", show_default=False)],
    actor: ActorOpt = None,
) -> None:
    """Rename a category. Its labels and history stay attached (same id)."""
    db = open_db()
    with db.read() as session:
        before = labels_mod.resolve_category(session, old).name
    row = labels_mod.rename_category(db, old, new, actor=actor_or_default(actor))
    typer.echo(f"Renamed {before!r} to {row.name!r} ({row.labelled} labelled images keep their label).")


@categories_app.command("merge")
def categories_merge(
    source: Annotated[str, typer.Argument(help="Category whose labels move (it is then archived).")],
    target: Annotated[str, typer.Argument(help="Category that receives them.")],
    actor: ActorOpt = None,
) -> None:
    """Move every label of SOURCE to TARGET (audited per image) and archive SOURCE."""
    moved = labels_mod.merge_categories(open_db(), source, target, actor=actor_or_default(actor))
    typer.echo(f"Merged {source!r} into {target!r}: {moved} labels moved; {source!r} is archived.")


@categories_app.command("archive")
def categories_archive(name: CategoryArg, actor: ActorOpt = None) -> None:
    """Archive a category: it takes no new labels; images already labelled keep their label."""
    row = labels_mod.archive_category(open_db(), name, actor=actor_or_default(actor))
    typer.echo(f"Archived {row.name!r} ({row.labelled} labelled images keep their label).")


@categories_app.command("unarchive")
def categories_unarchive(name: CategoryArg, actor: ActorOpt = None) -> None:
    """Let an archived (not merged) category receive labels again."""
    row = labels_mod.unarchive_category(open_db(), name, actor=actor_or_default(actor))
    typer.echo(f"{row.name!r} is live again.")


@categories_app.command("delete")
def categories_delete(
    name: CategoryArg,
    move_to: Annotated[
        str | None,
        typer.Option("--move-to", metavar="OTHER", help="Move its labelled images to OTHER first (audited per image)."),
    ] = None,
    actor: ActorOpt = None,
) -> None:
    """Delete a category. One with labelled images needs --move-to; rows that audit rows or models still name are
    kept as "NAME (deleted #ID)" so history reads right."""
    done = labels_mod.delete_category(open_db(), name, actor=actor_or_default(actor), move_to=move_to)
    moved = f"; {done.moved} labels moved to {done.moved_to!r}" if done.moved_to is not None else ""
    kept = " (kept in the history as deleted)" if done.kept_for_history else ""
    typer.echo(f"Deleted category {done.name!r}{kept}{moved}.")


# --- labels --------------------------------------------------------------------------------------------------

ImageIdArg = Annotated[int, typer.Argument(help="The image's id (see `stats`, the app, or `export labels`).")]


@app.command("label")
def label_command(
    image_id: ImageIdArg, category: CategoryArg, actor: ActorOpt = None, as_json: JsonOpt = False
) -> None:
    """Set or change the label of one image (recorded in its audit trail)."""
    change = labels_mod.set_label(open_db(), image_id, category, actor=actor_or_default(actor))
    if as_json:
        print_json(change)
    elif change.changed:
        typer.echo(f"Image {image_id}: {change.old_category or '(unlabelled)'} -> {change.new_category}")
    else:
        typer.echo(f"Image {image_id} is already labelled {change.new_category!r}; nothing changed.")


@app.command("unlabel")
def unlabel_command(image_id: ImageIdArg, actor: ActorOpt = None) -> None:
    """Remove the label of one image (the old label stays in its audit trail)."""
    change = labels_mod.clear_label(open_db(), image_id, actor=actor_or_default(actor))
    if change.changed:
        typer.echo(f"Image {image_id}: {change.old_category} -> (unlabelled)")
    else:
        typer.echo(f"Image {image_id} was not labelled; nothing changed.")


@app.command("undo")
def undo_command(actor: ActorOpt = None, as_json: JsonOpt = False) -> None:
    """Undo your most recent label change (a whole bulk relabel at once). Repeat to step further back."""
    changes = labels_mod.undo_last_change(open_db(), actor=actor_or_default(actor))
    if as_json:
        print_json(changes)
        return
    for change in changes:
        typer.echo(
            f"Image {change.image_id}: {change.old_category or '(unlabelled)'} -> "
            f"{change.new_category or '(unlabelled)'}"
        )


@app.command("history")
def history_command(image_id: ImageIdArg, as_json: JsonOpt = False) -> None:
    """Show the label history (audit trail) of one image, newest first."""
    rows = labels_mod.audit_trail(open_db(), image_id)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo(f"Image {image_id} has never been labelled.")
    for r in rows:
        seen = f"  model said {r.predicted_category} ({r.predicted_confidence:.0%})" if r.predicted_category else ""
        note = f"  [{r.note}]" if r.note else ""
        typer.echo(
            f"{r.time:%Y-%m-%d %H:%M:%S}  {r.actor:<12} {r.action:<7} "
            f"{r.old_category or '-'} -> {r.new_category or '-'}{seen}{note}"
        )


# --- stats and export ----------------------------------------------------------------------------------------


@app.command("stats")
def stats_command(as_json: JsonOpt = False) -> None:
    """Catalogue counts: images, labelled and unlabelled, and images per category and split."""
    stats = catalogue_stats(open_db())
    if as_json:
        print_json(stats.as_dict())
        return
    typer.echo(
        f"{stats.total_images} images: {stats.labelled} labelled, {stats.unlabelled} unlabelled; "
        f"{stats.categories} categories"
    )
    frame = stats.to_frame()
    if frame["archived"].any():
        frame["archived"] = frame["archived"].map({True: "archived", False: ""})
    else:
        frame = frame.drop(columns="archived")
    typer.echo(frame.to_string())


@export_app.command("labels")
def export_labels(
    path: Annotated[Path, typer.Argument(help="CSV file to write (replaced if it exists).", show_default=False)],
    with_ids: Annotated[
        bool,
        typer.Option(
            "--with-ids",
            help="Add image_id, sha256, split and sku columns; such a file re-imports too, matched by content hash.",
        ),
    ] = False,
    actor: ActorOpt = None,
) -> None:
    """Write `filename,category` (and `sku` when images have SKUs) for every labelled image; the file re-imports
    with `import --labels-csv`, SKUs included."""
    count = export_mod.export_labels_csv(open_db(), path, with_ids=with_ids, actor=actor_or_default(actor))
    typer.echo(f"Wrote {count} labels to {path}.")


@export_app.command("imagefolder")
def export_imagefolder(
    directory: Annotated[Path, typer.Argument(help="New or empty folder to fill.", show_default=False)],
    actor: ActorOpt = None,
) -> None:
    """Copy the original of every labelled image into DIR/<category>/<file name> (torchvision ImageFolder)."""
    result = export_mod.export_imagefolder(open_db(), directory, actor=actor_or_default(actor))
    typer.echo(f"Wrote {result.written} images in {len(result.per_category)} category folders under {directory}.")
    if result.unlabelled_skipped:
        typer.echo(f"{result.unlabelled_skipped} unlabelled images were not exported.")
    for line in result.missing:
        typer.secho(f"  not exported: {line}", fg=typer.colors.RED, err=True)
    if result.missing and not result.written:
        raise typer.Exit(1)
