"""`make bench`: every CPU benchmark at quick settings, one after the other, then one summary table.

    .venv/bin/python benchmarks/run_cpu.py                  # all of them, ~10-15 min on 2 idle cores
    .venv/bin/python benchmarks/run_cpu.py --list           # names, settings and what each needs
    .venv/bin/python benchmarks/run_cpu.py --only bench_pages bench_loader
    .venv/bin/python benchmarks/run_cpu.py --skip load-postgres fashion_mnist

Each benchmark runs as its own process (`python benchmarks/<script>.py ARGS`) from the repository root, with the
QUICK settings listed in BENCHMARKS below: small catalogues, few rounds and epochs, so the whole run fits in about
10-15 minutes. They check that every benchmark still runs and give rough figures; they are NOT the settings behind
the figures in docs/benchmarks.md (those are in benchmarks/README.md and docs/benchmarks.md, and take hours).
Scripts that take `--out` write `results/bench/<name>.json`; every script's printed output is kept in
`results/bench/<name>.txt`. A benchmark whose data is missing (Fashion-MNIST, PostgreSQL server binaries, Chromium
with Playwright) is skipped with the reason. The GPU ones (bench_gpu.py, gpu_checks.sh) are not run here.
Exit status 1 when any benchmark failed (non-zero exit, including a benchmark's own failed check, or a timeout).
This runner imports nothing from the product: it only starts processes.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = Path("results/bench")


@dataclass(frozen=True)
class Benchmark:
    name: str  # results/bench/<name>.json; also what --only and --skip take
    script: str  # benchmarks/<script>.py
    args: tuple[str, ...]  # the quick settings
    needs: tuple[str, ...] = ()  # keys of NEEDS
    out: bool = True  # the script takes --out FILE


@dataclass
class Result:
    bench: Benchmark
    status: str  # "ok", "failed (exit N)", "skipped: why"
    seconds: float = 0.0
    table: str = ""


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("bench_quick_retrain", "bench_quick_retrain", ("--n", "2000", "--repeats", "1"), out=False),
    Benchmark("bench_inference", "bench_inference", ("--images", "64", "--rounds", "2"), out=False),
    Benchmark("bench_loader", "bench_loader",
              ("--image-size", "32", "--batch-size", "64", "--images", "1024", "--steps", "5", "--warmup", "1",
               "--devices", "cpu")),
    Benchmark("bench_pages", "bench_pages", ("--images", "10000", "--repeat", "2")),
    Benchmark("bench_page_render", "bench_page_render", ("--images", "10000", "--repeat", "1"), out=False),
    Benchmark("bench_ingest", "bench_ingest", ("--small-n", "600", "--photo-n", "100", "--rounds", "1")),
    Benchmark("bench_worker_threads", "bench_worker_threads",
              ("--models", "resnet18:32:64", "--policies", "unset", "--seconds", "2", "--max-steps", "20")),
    Benchmark("load", "load",
              ("--db", "sqlite", "--seconds", "10", "--labellers", "8", "--processes", "2", "--images", "200",
               "--import-images", "500")),
    Benchmark("load-postgres", "load",
              ("--db", "postgresql", "--seconds", "10", "--labellers", "8", "--processes", "2", "--images", "200",
               "--import-images", "500"), needs=("postgres",)),
    Benchmark("bench_api", "bench_api", ("--image-size", "64", "--files", "8", "--api-requests", "8",
                                         "--cli-runs", "1")),
    Benchmark("bench_clicks", "bench_clicks", ("--images", "1000", "--clicks", "5"), needs=("chromium",)),
    Benchmark("near_duplicates", "near_duplicates", ("--n", "300", "--images", "10000"), needs=("fashion-mnist",),
              out=False),
    Benchmark("fashion_mnist", "fashion_mnist",
              ("--preset", "cpu-short", "--train-limit", "1000", "--test-limit", "1000", "--epochs", "1"),
              needs=("fashion-mnist",)),
    Benchmark("label_checks", "label_checks", ("--quick",), needs=("fashion-mnist",)),
    Benchmark("cpu_defaults", "cpu_defaults",
              ("--labels", "200", "--sizes", "64", "--tail-epochs", "1", "--full", "64:1", "--test-limit", "200"),
              needs=("fashion-mnist",)),
    Benchmark("label_efficiency", "label_efficiency",
              ("--quick-check", "--labels", "100", "--series", "pretrained-random,random-init-random",
               "--test-limit", "300", "--plot", ""), needs=("fashion-mnist",)),
)  # fmt: skip


def fashion_mnist_missing() -> str | None:
    folder = Path(os.environ.get("PRODCAT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    if all((folder / name).is_file() for name in names):
        return None
    return f"Fashion-MNIST not in {folder} (Debian's dataset-fashion-mnist, or set PRODCAT_FASHION_MNIST_DIR)"


def postgres_missing() -> str | None:
    if (shutil.which("initdb") and shutil.which("pg_ctl")) or glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        return None
    return "PostgreSQL server binaries (initdb, pg_ctl) not on PATH or in /usr/lib/postgresql/*/bin"


def chromium_missing() -> str | None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or Path("/usr/bin/chromium").exists()):
        return "no Chromium (Debian's chromium package)"
    return None if importlib.util.find_spec("playwright") else "Playwright not installed (requirements-test.txt)"


NEEDS = {"fashion-mnist": fashion_mnist_missing, "postgres": postgres_missing, "chromium": chromium_missing}


def command(bench: Benchmark) -> list[str]:
    out = ["--out", str(OUT_DIR / f"{bench.name}.json")] if bench.out else []
    return [sys.executable, f"benchmarks/{bench.script}.py", *bench.args, *out]


def stop(pid: int) -> None:
    """Kill a benchmark's whole process group (its servers, workers and children too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def markdown_table(output: str) -> str:
    """The printed markdown table lines; the last 40 lines of the output when there are none (JSON printers)."""
    lines = output.splitlines()
    table = [line for line in lines if line.startswith("|")]
    return "\n".join(table or lines[-40:])


def tee(stream: IO[str], sink: IO[str], lines: list[str]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()
        lines.append(line)


def run(bench: Benchmark, timeout: float) -> Result:
    for need in bench.needs:
        if why := NEEDS[need]():
            return Result(bench, f"skipped: {why}")
    print(f"\n=== {bench.name}: {shlex.join(command(bench)[1:])}", flush=True)
    start, out, err = time.monotonic(), list[str](), list[str]()
    proc = subprocess.Popen(command(bench), cwd=ROOT, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    readers = [threading.Thread(target=tee, args=args, daemon=True)
               for args in ((proc.stdout, sys.stdout, out), (proc.stderr, sys.stderr, err))]  # fmt: skip
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:  # timed out or Ctrl-C: it runs in its own session, so stop it and its children
            stop(proc.pid)
    for reader in readers:
        reader.join(5)  # a child the benchmark left running may hold its pipes open
    seconds, output = time.monotonic() - start, "".join(out)
    (ROOT / OUT_DIR / f"{bench.name}.txt").write_text(output + "".join(err))
    if code == 0:
        return Result(bench, "ok", seconds, markdown_table(output))
    status = f"failed ({'timed out' if code is None else f'exit {code}'})"
    table = "\n".join(filter(None, (markdown_table(output), "".join(err[-10:]).rstrip())))  # why it failed
    return Result(bench, status, seconds, table)


def summary(results: list[Result]) -> str:
    rows = ["| benchmark | status | wall time |", "|---|---|---|"]
    rows += [f"| {r.bench.name} | {r.status} | {f'{r.seconds:.0f} s' if r.seconds else '-'} |" for r in results]
    tables = [f"### {r.bench.name} ({r.status})\n\n{r.table}\n" for r in results if r.table]
    return "\n".join(["\n## make bench: quick settings, not docs/benchmarks.md's\n", *rows, "", *tables])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help="run only these")
    parser.add_argument("--skip", nargs="+", choices=names, metavar="NAME", default=[], help="leave these out")
    parser.add_argument("--list", action="store_true", help="print each benchmark, its settings and needs; run none")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per benchmark before it is stopped")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [b for b in BENCHMARKS if (args.only is None or b.name in args.only) and b.name not in args.skip]
    if args.list:
        for b in chosen:
            why = "; ".join(w for n in b.needs if (w := NEEDS[n]())) or "ready"
            print(f"{b.name}: {shlex.join(command(b)[1:])}\n    needs: {', '.join(b.needs) or 'nothing'} ({why})")
        return 0
    (ROOT / OUT_DIR).mkdir(parents=True, exist_ok=True)
    results = [run(b, args.timeout) for b in chosen]
    print(summary(results))
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
