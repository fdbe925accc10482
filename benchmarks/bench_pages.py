"""How long does each core call a page makes take at catalogue scale? Milliseconds per call at 100,000 images.

    python benchmarks/bench_pages.py --images 100000 --repeat 5 --out results/pages-100k.json

Fills a fresh temporary data directory with `tests.core.factories.populate` (bulk INSERTs: images, 60 % labelled
with import events, one active model version with a prediction for every image, 15 % of them wrong), then times
every core function a page calls: the sidebar overview, catalogue stats, the review queue in every order on its
first and last page and with the usual filters, and the dashboard (all of it, and each part). Each call is run
once to warm up (the first suspected-mislabel call imports cleanlab, ~1 s, once per process) and then `--repeat`
times; the table shows the median and the worst. The baseline is `SELECT count(*) FROM images` through the same
session machinery, so the ratio column says how many trivial queries a call costs. `--analyze` runs SQLite's
ANALYZE first (query-planner statistics), to compare. A page renders in under a second including Streamlit
when each of its core calls stays well under ~300 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `tests` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select, text

from benchmarks.common import cpu_name, markdown_table, write_json

COLUMNS = ("call", "median ms", "max ms", "first ms", "x baseline", "result")
TARGET_MS = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="catalogue size (default 100,000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per function after one warm-up")
    parser.add_argument("--analyze", action="store_true", help="run ANALYZE after filling (planner statistics)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    return parser.parse_args(argv)


def _time(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any, float]:
    started = time.perf_counter()
    result = fn()
    first = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return times, result, first


def _describe(result: Any) -> str:
    if hasattr(result, "total") and hasattr(result, "items"):
        return f"{result.total} match, page {result.page}/{result.pages}, {len(result.items)} shown"
    if hasattr(result, "shape"):
        return f"{result.shape[0]} rows"
    if hasattr(result, "images") and hasattr(result, "labelled"):
        return f"{result.images} images, {result.labelled} labelled"
    if hasattr(result, "total_images"):
        return f"{result.total_images} images, {len(result.rows)} rows"
    if hasattr(result, "open_issues") and hasattr(result, "checked"):
        return f"{result.open_issues} open label issues of {result.checked} checked"
    if hasattr(result, "findings"):
        return f"{len(result.findings())} findings"
    if hasattr(result, "scores") and hasattr(result, "confusion"):
        return f"accuracy {result.scores['accuracy']:.3f} on {result.scores['n_images']} test images"
    if isinstance(result, dict):
        return f"{len(result)} figures: {', '.join(result)}"
    if hasattr(result, "n_images"):
        return f"{result.n_images} test images"
    return str(result)[:60]


def _recent_label_changes(db: Any, info: Any, *, n: int) -> None:
    """`n` people's label changes spread over the last 90 days (a third of them corrections), so the
    corrections-per-day chart has something to count."""
    from datetime import UTC, datetime, timedelta

    import numpy as np
    from sqlalchemy import insert

    from core.schema import LabelEvent

    rng = np.random.default_rng(1)
    cats = list(info.category_ids.values())
    now = datetime.now(UTC)
    rows = []
    for k in range(n):
        new = int(rng.choice(cats))
        rows.append(
            {
                "image_id": int(rng.choice(info.image_ids)),
                "old_category_id": None,
                "new_category_id": new,
                "actor": "bench",
                "action": "set",
                "created_at": now - timedelta(minutes=int(rng.integers(0, 90 * 24 * 60))),
                "note": "",
                "model_version_id": info.version_id,
                "predicted_category_id": new if k % 3 else int(rng.choice([c for c in cats if c != new])),
                "predicted_confidence": 0.5,
            }
        )
    with db.write() as session:
        session.execute(insert(LabelEvent), rows)


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    import os

    os.environ["PRODCAT_DATA_DIR"] = str(data_dir)
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    from core.db import open_database
    from core.settings import get_settings

    get_settings.cache_clear()
    db = open_database(get_settings())

    from core.catalog.stats import catalogue_stats
    from core.ml.label_checks import label_health
    from core.schema import Image
    from core.views import dashboard as dash
    from core.views.figures import dashboard_figures
    from core.views.health import data_health
    from core.views.overview import home_overview
    from core.views.review import LabelState, ReviewOrder, review_queue
    from tests.core.factories import populate

    started = time.perf_counter()
    info = populate(db, n_images=args.images, seed=0)
    fill_s = time.perf_counter() - started
    print(f"populated {args.images:,} images in {fill_s:.1f} s", file=sys.stderr)
    _recent_label_changes(db, info, n=args.images // 20)
    if args.analyze:
        with db.write_engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()

    def baseline() -> int:
        with db.read() as session:
            return int(session.scalar(select(func.count()).select_from(Image)) or 0)

    last = 10**9  # review_queue shows the last page for any page past the end
    calls: list[tuple[str, Callable[[], Any]]] = [("baseline: SELECT count(*) FROM images", baseline)]
    calls += [
        ("home_overview (sidebar, every page)", lambda: home_overview(db)),
        ("catalogue_stats", lambda: catalogue_stats(db)),
    ]
    for order in ReviewOrder:
        for name, page in (("first", 1), ("last", last)):
            calls.append(
                (f"review_queue {order.value}, {name} page", partial(review_queue, db, order=order, page=page))
            )
    calls += [
        ("review_queue unlabelled, lowest-confidence", lambda: review_queue(db, label_state=LabelState.UNLABELLED)),
        ("review_queue disagrees, lowest-confidence", lambda: review_queue(db, label_state=LabelState.DISAGREES)),
        (
            "review_queue disagrees, last page",
            lambda: review_queue(db, label_state=LabelState.DISAGREES, page=last),
        ),
        ("review_queue category Shoes, test split", lambda: review_queue(db, category="Shoes", split="test")),
        (
            "review_queue label-issues, suspected-mislabel",
            lambda: review_queue(db, label_state=LabelState.LABEL_ISSUES, order=ReviewOrder.SUSPECTED_MISLABEL),
        ),
        ("label_health (dashboard, review)", lambda: label_health(db)),
        ("data_health (Data health page)", lambda: data_health(db)),
        (
            "review_queue confusion cell Shoes->Bags",
            lambda: review_queue(db, **dash.cell_review_filters("Shoes", "Bags").as_kwargs()),
        ),
        ("dashboard (everything, one call)", lambda: dash.dashboard(db)),
        ("dashboard figures (plotly objects)", lambda: dashboard_figures(dash.dashboard(db))),
        ("  evaluation (test split)", lambda: dash.evaluation(db)),
        ("  confusion_matrix_data", lambda: dash.confusion_matrix_data(db)),
        ("  version_history", lambda: dash.version_history(db)),
        ("  class_balance", lambda: dash.class_balance(db)),
        ("  corrections_per_day", lambda: dash.corrections_per_day(db)),
    ]
    rows = []
    base_ms = None
    for name, fn in calls:
        times, result, first = _time(fn, args.repeat)
        median = statistics.median(times)
        if base_ms is None:
            base_ms = median
        rows.append(
            {
                "call": name,
                "median ms": round(median, 2),
                "max ms": round(max(times), 2),
                "first ms": round(first, 2),
                "x baseline": round(median / base_ms, 1) if base_ms else None,
                "result": _describe(result),
            }
        )
    return {
        "images": args.images,
        "labelled": int((info.labels >= 0).sum()),
        "populate_s": round(fill_s, 2),
        "repeat": args.repeat,
        "analyze": args.analyze,
        "cpu": cpu_name(),
        "sqlite": db.engine.dialect.dbapi.sqlite_version if db.is_sqlite else None,  # type: ignore[union-attr]
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data_dir is not None:
        results = run(args, args.data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="prodcat-bench-pages-") as tmp:
            results = run(args, Path(tmp) / "data")
    print(
        f"{results['images']:,} images ({results['labelled']:,} labelled), one active version with a prediction per "
        f"image; {results['cpu']}; SQLite {results['sqlite']}; ANALYZE {'yes' if args.analyze else 'no'}; "
        f"median of {args.repeat} after one warm-up"
    )
    print(markdown_table(COLUMNS, results["rows"]))
    slow = [r["call"] for r in results["rows"] if r["median ms"] > TARGET_MS]
    print(f"\nover {TARGET_MS:.0f} ms: {', '.join(slow) if slow else 'none'}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
