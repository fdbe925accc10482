"""The `review` command: print a review queue (which images to look at next) as a table or JSON."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from core.cli.app import JsonOpt, app, open_db, print_json
from core.ml.label_checks import label_health
from core.schema import Split
from core.views.review import MAX_PAGE_SIZE, LabelState, ReviewItem, ReviewOrder, review_queue


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@app.command("review")
def review_command(
    order: Annotated[
        ReviewOrder, typer.Option("--order", help="How to sort the queue.", case_sensitive=False)
    ] = ReviewOrder.LOWEST_CONFIDENCE,
    category: Annotated[
        str | None,
        typer.Option(
            "--category", metavar="NAME", help="Images labelled NAME, or (when unlabelled) predicted as NAME."
        ),
    ] = None,
    label_state: Annotated[
        LabelState, typer.Option("--label-state", help="Which images by label.", case_sensitive=False)
    ] = LabelState.ALL,
    split: Annotated[Split | None, typer.Option("--split", help="Only this split.", case_sensitive=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE_SIZE, help="How many images to show.")] = 20,
    page: Annotated[int, typer.Option("--page", min=1, help="Page of --limit images.")] = 1,
    version: Annotated[
        int | None, typer.Option("--version", metavar="ID", help="Model version (default: the active one).")
    ] = None,
    search: Annotated[
        str | None,
        typer.Option(
            "--search", metavar="TEXT", help='Image id ("#123" or "123") or part of the file name (any case).'
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the images to review next: id, file name, label, prediction, confidence, the ranking score and, where the
    label check doubts a label, the category the image probably should have."""
    db = open_db()
    result = review_queue(
        db,
        order=order,
        category=category,
        label_state=label_state,
        split=split,
        page=page,
        page_size=limit,
        version_id=version,
        search=search,
    )
    health = label_health(db, version_id=result.version_id) if result.version_id is not None else None
    if as_json:
        print_json(
            {
                "total": result.total,
                "label_health": dataclasses.asdict(health) if health is not None else None,
                "page": result.page,
                "pages": result.pages,
                "order": result.order,
                "version_id": result.version_id,
                "items": [
                    {
                        "image_id": item.image_id,
                        "file": item.original_name,
                        "label": item.label,
                        "predicted": item.predicted,
                        "confidence": item.confidence,
                        "score": item.score,
                        "split": item.split,
                        "top3": item.top3,
                        "label_issue": item.suggestion.issue if item.suggestion else None,
                        "suggested": item.suggestion.category if item.suggests_change and item.suggestion else None,
                        "outlier_score": item.outlier_score,
                    }
                    for item in result.items
                ],
            }
        )
        return
    model = f"model v{result.version_id}" if result.version_id is not None else "no model yet"
    typer.echo(f"{result.total} images match ({order.value}, {model}); page {result.page} of {result.pages}")
    if health is not None and (order is ReviewOrder.SUSPECTED_MISLABEL or label_state is LabelState.LABEL_ISSUES):
        typer.echo(health.describe())
    if not result.items:
        return
    name_width = min(40, max(len("file"), *(len(item.original_name) for item in result.items)))
    typer.echo(
        f"{'id':>8}  {'file':<{name_width}}  {'label':<16}  {'predicted':<16}  {'conf':>6}  {'score':>8}  probably"
    )
    for item in result.items:
        name = (
            item.original_name if len(item.original_name) <= name_width else item.original_name[: name_width - 1] + "…"
        )
        typer.echo(
            f"{item.image_id:>8}  {name:<{name_width}}  {(item.label or '-'):<16.16}  "
            f"{(item.predicted or '-'):<16.16}  {_fmt(item.confidence, 3):>6}  {_fmt(item.score, 4):>8}  "
            f"{_probably(item)}"
        )


def _probably(item: ReviewItem) -> str:
    """The category the label check would give a doubted label ("-" where it agrees or did not check)."""
    if not item.suggests_change or item.suggestion is None:
        return "-"
    return f"{item.suggestion.category} ({item.suggestion.probability:.0%})"
