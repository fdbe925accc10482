"""`python -m core.cli demo fashion-mnist`: fill the catalogue with labelled Fashion-MNIST product images."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from tqdm import tqdm

from core.catalog.demo import DEFAULT_DEMO_LIMIT, import_fashion_mnist
from core.cli.app import ActorOpt, ProdcatTyper, actor_or_default, app, fail, open_db

demo_app = ProdcatTyper(
    help="Import demo data (real product images) through the normal import path.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(demo_app, name="demo")


class DemoSplit(StrEnum):
    TRAIN = "train"
    TEST = "test"
    BOTH = "both"


@demo_app.command("fashion-mnist")
def fashion_mnist(
    limit: Annotated[
        int, typer.Option("--limit", help="Images per official split, balanced over the 10 categories.")
    ] = DEFAULT_DEMO_LIMIT,
    split: Annotated[DemoSplit, typer.Option("--split", help="Official split(s) to take images from.")] = (
        DemoSplit.TRAIN
    ),
    all_images: Annotated[bool, typer.Option("--all", help="Import every image of the chosen split(s).")] = False,
    actor: ActorOpt = None,
) -> None:
    """Import Fashion-MNIST (Zalando product photos, 10 categories) as labelled PNG files.

    The app then splits them 80/10/10 into train/val/test by hash, like any other import.
    Running it again imports nothing twice (the same files are reported as duplicates).
    """
    if limit <= 0 and not all_images:
        raise fail(f"--limit must be a positive number of images, got {limit} (use --all for every image)")
    db = open_db()
    bar = tqdm(total=None, unit="img", desc="importing", mininterval=0.5)

    def progress(done: int, total: int | None, name: str) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)  # update() honours mininterval, so a fast import does not flood the terminal

    try:
        outcome = import_fashion_mnist(
            db,
            limit=None if all_images else limit,
            split=split.value,
            actor=actor_or_default(actor),
            progress=progress,
        )
    finally:
        bar.close()
    typer.echo(outcome.summary())
