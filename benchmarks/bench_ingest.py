"""Ingest throughput: import N photo-like 1000x1000 JPEGs (~10% duplicates) and compare with plain Pillow decoding.

Usage: .venv/bin/python -m benchmarks.bench_ingest [--n 1000] [--size 1000] [--keep DIR]
Prints images/s for import_paths and for a Pillow open+load baseline over the same files, their ratio, and the
peak resident memory growth during the import (flat memory means it does not grow with N).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth lit backdrop, a few soft-edged coloured shapes and sensor noise: compresses like a photo.

    Drawn at 1/8 scale and enlarged (cheap to make), then fine noise at full size so it does not compress
    unrealistically well.
    """
    small = max(8, size // 8)
    yy, xx = np.mgrid[0:small, 0:small].astype(np.float32) / small
    base = rng.uniform(120, 230, 3).astype(np.float32)
    light = 1.0 - 0.35 * ((xx - rng.uniform(0, 1)) ** 2 + (yy - rng.uniform(0, 1)) ** 2)
    pixels = base[None, None, :] * light[..., None]
    for _ in range(int(rng.integers(2, 5))):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
        edge = np.clip((r - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) * small / 3, 0, 1)
        pixels = pixels * (1 - edge[..., None]) + rng.uniform(0, 255, 3)[None, None, :] * edge[..., None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-4, 5, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make_files(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """N JPEG files (quality 90) in folder/<category>/; about 10% are byte-identical copies of earlier ones."""
    rng = np.random.default_rng(seed)
    categories = ["Shoes", "Bags", "Hats", "Shirts"]
    files: list[Path] = []
    for i in range(n):
        category = categories[i % len(categories)]
        path = folder / category / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if files and rng.random() < 0.10:
            shutil.copyfile(files[int(rng.integers(0, len(files)))], path)
        else:
            buf = io.BytesIO()
            photo_like(rng, size).save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue())
        files.append(path)
    return files


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def baseline(files: list[Path]) -> float:
    """Seconds for plain Pillow open + full decode of every file (what any image pipeline must pay)."""
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.load()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: core.ingest's)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PRODCAT_DATA_DIR"] = str(work / "data")
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    os.environ.pop("PRODCAT_DATABASE_URL", None)
    import core.ingest.importer
    from core.db import open_database
    from core.ingest import import_paths

    if args.threads:
        core.ingest.importer.DECODE_THREADS = args.threads
    from core.settings import get_settings

    try:
        t0 = time.perf_counter()
        files = make_files(work / "photos", args.n, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        made_s = time.perf_counter() - t0
        print(f"made {len(files)} {args.size}x{args.size} JPEGs ({megabytes:.0f} MB) in {made_s:.1f}s")

        base_s = baseline(files)  # also warms the page cache so both runs read from memory
        get_settings.cache_clear()
        db = open_database(get_settings())
        rss_before = _rss_kib()
        exact_peak = _reset_peak_rss()
        start = time.perf_counter()
        result = import_paths(db, [work / "photos"], labels_from_folders=True, actor="bench")
        import_s = time.perf_counter() - start
        peak_growth = _peak_rss_kib() - rss_before

        print(
            f"import: {result.summary()} in {import_s:.2f}s = {len(files) / import_s:.0f} files/s "
            f"({len(result.imported) / import_s:.0f} new images/s)"
        )
        print(f"baseline Pillow open+load: {base_s:.2f}s = {len(files) / base_s:.0f} images/s")
        print(f"ratio import/baseline time: {import_s / base_s:.2f}x")
        note = "" if exact_peak else " (process peak, could not reset)"
        print(f"peak RSS growth during import: {peak_growth / 1024:.1f} MiB{note}")
        threads = min(core.ingest.importer.DECODE_THREADS, os.cpu_count() or 1)
        print(f"cpu count: {os.cpu_count()}, decode threads: {threads}, load average: {os.getloadavg()[0]:.2f}")
        assert db.integrity_ok()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
