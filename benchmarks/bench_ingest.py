"""Ingest throughput: import small PNGs and photo-sized JPEGs from a folder tree (labels from the folders,
~10% byte-identical duplicates), against the same code with an earlier revision's import code, in the same run.

Usage: .venv/bin/python -m benchmarks.bench_ingest [--kinds small,photo] [--small-n 6000] [--small-size 64]
       [--photo-n 1000] [--photo-size 1000] [--before REV] [--rounds 2] [--batch-rows 64,1024] [--threads N]
       [--thread-counts 1] [--postgres] [--out FILE] [--keep DIR]

Every import runs in a fresh process and data directory (`core.catalog.ingest.import_paths`, timed from the call to its
return; the database is opened and migrated before). `--before REV` imports the same files with this checkout's code
but `core/catalog` as it was at REV (from `git archive`), alternating with this checkout round by round, so both see the
same machine load: read the ratio, not the absolute rates, on a shared machine. The baseline is plain Pillow open + load
of the same files (what any pipeline pays to decode them). `--batch-rows` also imports with other batch sizes
(`core.catalog.ingest.importer.BATCH_ROWS`) to show that memory does not grow with the batch, `--thread-counts` with
other numbers of decode threads. `--postgres` runs every import on a throw-away PostgreSQL cluster (tests/postgres.py;
fsync off, so its absolute rates flatter a real server). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CATEGORIES = ["Shoes", "Bags", "Hats", "Shirts"]


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
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-4, 5, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make_files(folder: Path, kind: str, n: int, size: int, seed: int = 0) -> list[Path]:
    """N photo-like files in folder/<category>/: PNGs ("small") or JPEGs of quality 90 ("photo"); about 10% are
    byte-identical copies of earlier ones. Distinct files are distinct pictures (no near-duplicates among them)."""
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    ext = "png" if kind == "small" else "jpg"
    for i in range(n):
        path = folder / CATEGORIES[i % len(CATEGORIES)] / f"img_{i:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if files and rng.random() < 0.10:
            shutil.copyfile(files[int(rng.integers(0, len(files)))], path)
        else:
            buf = io.BytesIO()
            if kind == "small":
                photo_like(rng, size).save(buf, "PNG")
            else:
                photo_like(rng, size).save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue())
        files.append(path)
    return files


def baseline_s(files: list[Path]) -> float:
    """Seconds for plain Pillow open + full decode of every file (what any image pipeline must pay)."""
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.load()
    return time.perf_counter() - start


# --- one import, in a child process --------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _machine_busy_s() -> tuple[float, float]:
    """Seconds of CPU time the whole machine spent busy and in all, from /proc/stat (Linux; zeros elsewhere): counts
    the worker processes and a local database server, which this process's own CPU time does not."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz  # idle and iowait are not busy


def child(spec: dict[str, Any]) -> dict[str, object]:
    """Import spec["files"] with the code under spec["code"] into a fresh data directory; returns the figures."""
    sys.path.insert(0, str(spec["code"]))
    # The fork server of the worker processes is a fresh interpreter that finds `core` from its working directory.
    os.chdir(str(spec["code"]))
    os.environ["PRODCAT_DATA_DIR"] = str(spec["data"])
    os.environ["PRODCAT_AUTH"] = "none"  # a benchmark acts alone: no sign-in
    if spec.get("database_url"):
        os.environ["PRODCAT_DATABASE_URL"] = str(spec["database_url"])
    else:
        os.environ.pop("PRODCAT_DATABASE_URL", None)
    import importlib
    import resource

    from core.catalog.ingest import import_paths
    from core.db import open_database

    try:  # this checkout: a package whose importer holds the settings; before the split: the module itself
        tunables = importlib.import_module("core.catalog.ingest.importer")
    except ImportError:
        tunables = importlib.import_module("core.catalog.ingest")
    decoding = importlib.import_module("core.catalog.ingest.decoding")
    threads_at = decoding if hasattr(decoding, "DECODE_THREADS") else tunables  # moved to decoding on 2026-11-30
    if spec.get("threads"):
        setattr(threads_at, "DECODE_THREADS", int(spec["threads"]))  # noqa: B010  # a module's setting
    if spec.get("batch_rows"):
        setattr(tunables, "BATCH_ROWS", int(spec["batch_rows"]))  # noqa: B010
    db = open_database()
    rss_before = _status_kib("VmRSS")
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        exact_peak = True
    except OSError:
        exact_peak = False
    usage = resource.getrusage(resource.RUSAGE_SELF)
    machine = _machine_busy_s()
    start = time.perf_counter()
    result = import_paths(db, [Path(str(spec["files"]))], labels_from_folders=True, actor="bench")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    machine_after = _machine_busy_s()
    assert db.integrity_ok()
    from sqlalchemy import func, select

    from core.schema import Image as ImageRow

    with db.read() as session:
        grouped = session.scalar(select(func.count()).where(ImageRow.duplicate_group_id.is_not(None)))
    return {
        "grouped": grouped,
        "seconds": seconds,
        "imported": len(result.imported),
        "duplicates": len(result.duplicates),
        "refused": len(result.refused),
        "user_s": after.ru_utime - usage.ru_utime,
        "sys_s": after.ru_stime - usage.ru_stime,
        "machine_busy_s": machine_after[0] - machine[0],
        "machine_total_s": machine_after[1] - machine[1],
        "peak_growth_mib": (_status_kib("VmHWM") - rss_before) / 1024,
        "exact_peak": exact_peak,
        "threads": min(int(threads_at.DECODE_THREADS), os.cpu_count() or 1),
        "load": os.getloadavg()[0],
    }


def run_child(spec: dict[str, Any]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"import failed ({spec['label']}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the run --------------------------------------------------------------------------------------------------------


def export_revision(rev: str, into: Path) -> Path:
    """This checkout's core/ and models/ with the import code as it was at `rev`, in a folder of its own: the two
    sides of a comparison then differ in that code alone. The import code is core/catalog/ (the importer, the store,
    decoding and hashing) since the package split, core/ingest or core/ingest.py before it. The repository is not
    touched."""
    shutil.rmtree(into, ignore_errors=True)  # an earlier run's export (--keep)
    into.mkdir(parents=True)
    for package in ("core", "models"):
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "core/catalog", "core/ingest", "core/ingest.py"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for path in listed:
        target = into / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *listed], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="small,photo", help="small (PNGs), photo (JPEGs)")
    parser.add_argument("--small-n", type=int, default=6000)
    parser.add_argument("--small-size", type=int, default=64)
    parser.add_argument("--photo-n", type=int, default=1000)
    parser.add_argument("--photo-size", type=int, default=1000)
    parser.add_argument("--before", default=None, help="a git revision whose import code to measure against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-rows", default="", help="other BATCH_ROWS to try with this checkout, e.g. 64,1024")
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: the importer's)")
    parser.add_argument("--thread-counts", default="", help="other decode threads to try with this checkout, e.g. 1")
    parser.add_argument("--postgres", action="store_true", help="a throw-away PostgreSQL cluster (tests/postgres.py)")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = None
    if args.postgres:
        from tests.postgres import start_cluster

        cluster = start_cluster()
    codes = {"after": ROOT}
    if args.before:
        codes = {"before": export_revision(args.before, work / "before"), **codes}
    report: dict[str, object] = {"settings": vars(args) | {"out": str(args.out), "keep": str(args.keep)}, "kinds": {}}
    datas = Path(tempfile.mkdtemp(prefix="data-", dir=work))  # this run's data directories, removed at its end
    try:
        for kind in args.kinds.split(","):
            n, size = (args.small_n, args.small_size) if kind == "small" else (args.photo_n, args.photo_size)
            started = time.perf_counter()
            files = make_files(work / f"files-{kind}", kind, n, size)
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            print(f"{kind}: made {n} {size}x{size} files ({megabytes:.1f} MB) in {time.perf_counter() - started:.0f}s")
            base = min(baseline_s(files) for _ in range(2))  # also warms the page cache for every import
            runs: list[dict[str, object]] = []
            plan: list[tuple[str, int | None, int | None]] = [
                (code, None, args.threads) for _ in range(args.rounds) for code in codes
            ]
            plan += [("after", int(rows), args.threads) for rows in args.batch_rows.split(",") if rows]
            plan += [("after", None, int(threads)) for threads in args.thread_counts.split(",") if threads]
            for index, (code, rows, threads) in enumerate(plan):
                database = cluster.create_database(template=None) if cluster is not None else None
                spec = {
                    "label": f"{kind} {code} {rows or ''} {threads or ''}",
                    "code": str(codes[code]),
                    "files": str(work / f"files-{kind}"),
                    "data": str(datas / f"{kind}-{index}"),
                    "threads": threads,
                    "batch_rows": rows,
                    "database_url": cluster.url(database) if cluster is not None and database else None,
                }
                figures = run_child(spec) | {"code": code, "batch_rows": rows, "threads_asked": threads}
                runs.append(figures)
                # Each data directory is removed only at the end: on an ext4 without a journal (as on the machines
                # these figures came from), creating a file skips every inode freed in the last 30 s, one buffer
                # lookup each, so an import right after deleting another one's 12,000 files paid several times the
                # kernel time per file (perf: 35 % of all samples in ext4's recently_deleted).
                if cluster is not None and database:
                    cluster.drop_database(database)
                rate = n / float(figures["seconds"])  # type: ignore[arg-type]
                print(
                    f"  {code:6} rows={rows or 'default':7} threads={figures['threads']} {figures['seconds']:.2f}s "
                    f"{rate:,.0f} files/s, peak +{figures['peak_growth_mib']:.1f} MiB, load {figures['load']:.1f}"
                )
            kinds: dict[str, object] = report["kinds"]  # type: ignore[assignment]
            kinds[kind] = {"n": n, "size": size, "megabytes": megabytes, "baseline_s": base, "runs": runs}
        print_table(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(datas, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def print_table(report: dict[str, object]) -> None:
    print()
    print(
        "| files | code | batch rows | decode threads | files/s (median) | new images/s | import / Pillow decode time "
        "| CPU ms per file: importing process / whole machine (busy %) | peak RSS growth |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, data in report["kinds"].items():  # type: ignore[attr-defined]
        n, base = data["n"], data["baseline_s"]
        groups: dict[tuple[str, object, object], list[dict[str, Any]]] = {}
        for run in data["runs"]:
            groups.setdefault((run["code"], run["batch_rows"], run["threads"]), []).append(run)
        for (code, rows, threads), runs in groups.items():
            seconds = statistics.median(float(r["seconds"]) for r in runs)
            new = statistics.median(float(r["imported"]) / float(r["seconds"]) for r in runs)
            cpu = statistics.median((float(r["user_s"]) + float(r["sys_s"])) / n * 1000 for r in runs)
            machine = statistics.median(float(r.get("machine_busy_s", 0)) / n * 1000 for r in runs)
            busy = statistics.median(
                float(r.get("machine_busy_s", 0)) / max(float(r.get("machine_total_s", 0)), 1e-9) * 100 for r in runs
            )
            peak = max(float(r["peak_growth_mib"]) for r in runs)
            print(
                f"| {n:,} {kind} {data['size']}px | {code} | {rows or 'default'} | {threads} | {n / seconds:,.0f} "
                f"| {new:,.0f} | {seconds / base:.2f}x | {cpu:.2f} / {machine:.2f} ({busy:.0f} %) | {peak:.1f} MiB |"
            )
        print(f"| {n:,} {kind} | Pillow open+load | | 1 | {n / base:,.0f} | | 1.00x | | |")


if __name__ == "__main__":
    main()
