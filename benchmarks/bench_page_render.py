"""Whole-page render time at catalogue scale: every page run by Streamlit's AppTest at 100,000 images.

    python benchmarks/bench_page_render.py --images 100000 --repeat 3

bench_pages.py times the core calls; this times what a person waits for, minus the browser: the full script run of
each page (sidebar, queries, figures, widgets) through `streamlit.testing.v1.AppTest`. The baseline, in the same
run, is the same page on an empty catalogue, so the ratio column says what 100,000 images cost a page.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `core`, `tests` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamlit.testing.v1 import AppTest

from benchmarks.common import cpu_name, markdown_table
from core import db as core_db
from core.settings import get_settings
from tests.core.factories import populate
from tests.pages.helpers import PAGE_FILES

ROOT = Path(__file__).resolve().parent.parent
PAGES = PAGE_FILES


def _use(data_dir: Path) -> None:
    os.environ["PRODCAT_DATA_DIR"] = str(data_dir)
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    os.environ["PRODCAT_PRETRAINED"] = "none"
    get_settings.cache_clear()
    core_db.close_all()


def time_pages(repeat: int) -> dict[str, float]:
    """Median seconds of a rerun of each page (the first run, which imports libraries, is not counted)."""
    results: dict[str, float] = {}
    for page in PAGES:
        at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
        if page != "pages/home.py":
            at.switch_page(page).run()
        if at.exception:
            raise SystemExit(f"{page} raised: {at.exception[0].message}")
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - start)
        results[page] = statistics.median(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        _use(Path(tmp) / "empty")
        core_db.open_database(get_settings())
        empty = time_pages(args.repeat)

        _use(Path(tmp) / "full")
        start = time.perf_counter()
        populate(core_db.open_database(get_settings()), n_images=args.images)
        print(f"populated {args.images:,} images in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        full = time_pages(args.repeat)

    big = f"{args.images:,} images ms"
    rows = [
        {
            "page": page,
            "empty catalogue ms": round(empty[page] * 1000),
            big: round(full[page] * 1000),
            "ratio": round(full[page] / empty[page], 2),
        }
        for page in PAGES
    ]
    print(f"{args.images:,} images; {cpu_name()}; AppTest rerun, median of {args.repeat}")
    print(markdown_table(["page", "empty catalogue ms", big, "ratio"], rows))
    slow = [p for p in PAGES if full[p] >= 1.0]
    print("pages at or over 1 s:", ", ".join(slow) or "none")


if __name__ == "__main__":
    main()
