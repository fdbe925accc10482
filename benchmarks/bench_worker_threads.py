"""Training images/s per torch thread count and OpenMP wait policy, alone and with one CPU core kept busy.

    python benchmarks/bench_worker_threads.py
    python benchmarks/bench_worker_threads.py --models resnet18:32:64 --threads 1,all --policies unset,PASSIVE

The training worker shares its machine with the app server: a page load or an inference keeps a core busy for a
while. OpenMP threads that spin while waiting for each other (libgomp's default) lose their time slices to such a
process and stall one another. Each configuration runs in a fresh child process, because OpenMP reads
OMP_WAIT_POLICY (and KMP_BLOCKTIME, Intel OpenMP only) once, when torch loads it. The child trains every model with
the real loop, `models.training.train_full` in full mode on synthetic uint8 images (gather, augmentation, forward,
backward, AdamW, schedule) and reports each step's end time. Per model: `--warmup` untimed steps, then the "alone"
window, then the parent starts one extra Python process spinning `while True: pass` (no pinning: what the Streamlit
server rendering a page does to the worker) and the child trains the "one core busy" window, then the spinner
stops. A window lasts `--seconds` and at least `--min-steps` steps. Reported: images/s alone, images/s with one
core busy, their ratio. A child still running after `--child-timeout` seconds is stopped; a figure it did not
finish is marked as an upper bound ("<").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, cpu_name, library_versions, markdown_table, rate, write_json

COLUMNS = (
    "model",
    "torch threads",
    "OMP_WAIT_POLICY",
    "alone img/s",
    "busy img/s",
    "busy/alone",
    "s/step alone",
    "s/step busy",
)
SPINNER = "while True: pass"
UNSET = "unset"
ALONE, BUSY = "alone", "busy"


@dataclass(frozen=True)
class ModelSpec:
    """One network to train: timm architecture, square image size, batch size."""

    arch: str
    image_size: int
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.arch} {self.image_size} px b{self.batch_size}"


@dataclass
class Window:
    """A timed window of one model in one child: when it started and when each of its steps ended (monotonic s)."""

    start: float | None = None
    ends: list[float] = field(default_factory=list)
    done: bool = False


def parse_models(text: str) -> list[ModelSpec]:
    """`arch:px:batch,arch:px:batch` -> specs."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        arch, px, batch = part.split(":")
        specs.append(ModelSpec(arch, int(px), int(batch)))
    return specs


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_threads(text: str) -> list[int]:
    """`1,all` -> [1, cores]; duplicates dropped, order kept."""
    values = [cores() if p.strip() == "all" else int(p) for p in text.split(",") if p.strip()]
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default="resnet18:32:64,efficientnet_lite0:224:32",
        help="Comma-separated arch:image_size:batch_size, trained one after the other in each child.",
    )
    parser.add_argument("--threads", default="1,all", help="torch thread counts to try; 'all' = every usable core.")
    parser.add_argument(
        "--policies",
        default=f"{UNSET},PASSIVE",
        help=f"OMP_WAIT_POLICY values ('{UNSET}' leaves it out); KMP_BLOCKTIME=0 is added for Intel OpenMP builds.",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="Untimed steps per model, at least 1 (allocator, first kernels)."
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="Length of each timed window, after --min-steps.")
    parser.add_argument("--min-steps", type=int, default=1, help="Steps per timed window at least.")
    parser.add_argument("--max-steps", type=int, default=40, help="Steps per timed window at most.")
    parser.add_argument("--child-timeout", type=float, default=120.0, help="Stop a child running longer than this.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON job for a child process
    return parser.parse_args(argv)


# --- child: train, ask for the busy core, report step times ---------------------------------------------------


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def ask_parent(busy: bool) -> float:
    """Have the parent start (or stop) the spinning process; returns the time it confirmed."""
    emit(event="spinner", busy=busy)
    if not sys.stdin.readline():
        raise SystemExit("parent went away")
    return time.monotonic()


def child_main(job: dict[str, Any]) -> int:
    """Train each model: warm-up, alone window, busy window; one JSON line per finished step on stdout."""
    import numpy as np
    import timm
    import torch

    from models.errors import TrainingStopped
    from models.factory import preprocessing_config
    from models.modes import TrainMode
    from models.training import TrainConfig, TrainData, train_full

    torch.set_num_threads(int(job["threads"]))
    emit(
        event="child",
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        kmp_blocktime=os.environ.get("KMP_BLOCKTIME"),
    )
    warmup, min_steps, max_steps, seconds = job["warmup"], job["min_steps"], job["max_steps"], job["seconds"]
    for spec in (ModelSpec(**m) for m in job["models"]):
        model = timm.create_model(spec.arch, pretrained=False, num_classes=10)
        cfg = preprocessing_config(model, spec.image_size)
        rng = np.random.default_rng(0)
        # Eight batches of images, cycled as epochs: pixel content does not change the cost of a step.
        n = spec.batch_size * 8
        pixels = rng.integers(0, 256, size=(n, spec.image_size, spec.image_size, 3), dtype=np.uint8)
        classes = [str(i) for i in range(10)]
        data = TrainData(pixels, np.arange(n) % 10, pixels[:0], np.zeros(0, dtype=np.int64), classes)
        config = TrainConfig(
            arch=spec.arch,
            image_size=spec.image_size,
            mode=TrainMode.FULL,
            epochs=10_000,
            batch_size=spec.batch_size,
            device="cpu",
            max_steps=warmup + 2 * max_steps,
            progress_every_s=0.0,
        )
        state: dict[str, Any] = {"window": None, "start": 0.0, "steps": 0, "last": 0.0, "warm": 0}

        def on_progress(progress: Any, state: dict[str, Any] = state, spec: ModelSpec = spec) -> None:
            if progress.phase != "train":  # progress_every_s=0: one "train" report after every step
                return
            state["last"] = time.monotonic()
            if state["window"] is None:
                state["warm"] += 1
                if state["warm"] == warmup:
                    state.update(window=ALONE, start=state["last"], steps=0)
                    emit(event="window", model=spec.label, window=ALONE, t=state["last"])
                return
            state["steps"] += 1
            emit(event="step", model=spec.label, window=state["window"], t=state["last"])

        def should_stop(state: dict[str, Any] = state, spec: ModelSpec = spec) -> bool:
            full = state["steps"] >= max_steps or (
                state["steps"] >= min_steps and state["last"] - state["start"] >= seconds
            )
            if state["window"] is None or not full:
                return False
            if state["window"] == BUSY:
                return True
            start = ask_parent(busy=True)
            state.update(window=BUSY, start=start, steps=0)
            emit(event="window", model=spec.label, window=BUSY, t=start)
            return False

        try:
            train_full(config, data, model=model, cfg=cfg, on_progress=on_progress, should_stop=should_stop)
        except TrainingStopped:
            pass
        emit(event="done", model=spec.label)
        if state["window"] == BUSY:
            ask_parent(busy=False)
    return 0


# --- parent: run the children, start and stop the busy core on request ----------------------------------------


def omp_is_intel() -> bool:
    """True when torch's parallel backend is Intel OpenMP (then KMP_BLOCKTIME matters too)."""
    import torch

    info = torch.__config__.parallel_info()
    return "Intel(R) OpenMP" in info or "libiomp" in info


def child_env(threads: int, policy: str, intel_omp: bool) -> dict[str, str]:
    """The child's environment: OpenMP variables must be there before torch loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if policy != UNSET:
        env["OMP_WAIT_POLICY"] = policy
        if intel_omp and policy.upper() == "PASSIVE":
            env["KMP_BLOCKTIME"] = "0"
    return env


def run_child(job: dict[str, Any], env: dict[str, str], timeout: float) -> tuple[dict[str, dict[str, Window]], dict]:
    """One child process: its windows per model label and window name, and its own report."""
    windows: dict[str, dict[str, Window]] = {}
    info: dict[str, Any] = {}
    spinner: subprocess.Popen[bytes] | None = None
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_worker_threads", "--child", json.dumps(job)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def stop_spinner() -> None:
        nonlocal spinner
        if spinner is not None:
            spinner.kill()
            spinner.wait()
            spinner = None

    def serve() -> None:
        nonlocal spinner
        assert child.stdout is not None and child.stdin is not None
        for line in child.stdout:
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            event = record["event"]
            if event == "child":
                info.update(record)
            elif event == "spinner":
                stop_spinner()
                if record["busy"]:
                    spinner = subprocess.Popen([sys.executable, "-c", SPINNER])
                    time.sleep(0.05)  # let it get past interpreter start-up and spin
                child.stdin.write("ok\n")
                child.stdin.flush()
            elif event == "window":
                windows.setdefault(record["model"], {})[record["window"]] = Window(start=record["t"])
            elif event == "step":
                windows[record["model"]][record["window"]].ends.append(record["t"])
            elif event == "done":
                for window in windows.get(record["model"], {}).values():
                    window.done = True

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        info["timed_out_at"] = time.monotonic()
    finally:
        server.join(timeout=10)
        stop_spinner()
    info["returncode"] = child.returncode
    return windows, info


def window_rate(window: Window | None, spec: ModelSpec, stopped_at: float | None) -> tuple[float | None, bool]:
    """Images/s over a window, and whether that is only an upper bound (the child was stopped before it ended)."""
    if window is None or window.start is None or not window.ends:
        if window is None or window.start is None or stopped_at is None:
            return None, True  # never reached: no figure
        return rate(spec.batch_size, stopped_at - window.start), True  # not one step in all that time
    return rate(len(window.ends) * spec.batch_size, window.ends[-1] - window.start), not window.done


def cpu_pressure() -> str | None:
    try:
        return Path("/proc/pressure/cpu").read_text(encoding="utf-8").splitlines()[0]
    except OSError:
        return None


def cell(value: float | None, capped: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return f"< {text}" if capped else text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup < 1 or args.min_steps < 1:
        raise SystemExit("--warmup and --min-steps must be at least 1")
    if args.child:
        return child_main(json.loads(args.child))
    models = parse_models(args.models)
    threads = parse_threads(args.threads)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    intel_omp = omp_is_intel()
    job_base = {
        "models": [vars(m) for m in models],
        "warmup": args.warmup,
        "seconds": args.seconds,
        "min_steps": args.min_steps,
        "max_steps": args.max_steps,
    }
    load_before, pressure_before = os.getloadavg(), cpu_pressure()
    print(
        f"CPU: {cpu_name()}; OpenMP: {'Intel' if intel_omp else 'GNU (libgomp)'}; "
        f"load average {load_before[0]:.2f}; CPU pressure {pressure_before or 'n/a'}",
        flush=True,
    )
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for n_threads in threads:
        for policy in policies:
            shown = policy if policy == UNSET or not intel_omp else f"{policy} + KMP_BLOCKTIME=0"
            windows, info = run_child(
                dict(job_base, threads=n_threads), child_env(n_threads, policy, intel_omp), args.child_timeout
            )
            for spec in models:
                own = windows.get(spec.label, {})
                alone, alone_cap = window_rate(own.get(ALONE), spec, info.get("timed_out_at"))
                loaded, loaded_cap = window_rate(own.get(BUSY), spec, info.get("timed_out_at"))
                ratio = loaded / alone if alone and loaded is not None and not (alone_cap or loaded_cap) else None
                row = {
                    "model": spec.label,
                    "torch threads": info.get("torch_threads", n_threads),
                    "OMP_WAIT_POLICY": shown,
                    "alone img/s": cell(alone, alone_cap),
                    "busy img/s": cell(loaded, loaded_cap),
                    "busy/alone": f"{ratio:.2f}" if ratio is not None else "-",
                    "s/step alone": spec.batch_size / alone if alone else None,
                    "s/step busy": spec.batch_size / loaded if loaded else None,
                }
                rows.append(row)
                steps = {name: len(own[name].ends) if name in own else 0 for name in (ALONE, BUSY)}
                raw.append(
                    {
                        "model": vars(spec),
                        "threads": n_threads,
                        "policy": policy,
                        "kmp_blocktime_0": intel_omp,
                        "alone_images_per_s": alone,
                        "alone_upper_bound": alone_cap,
                        "alone_steps": steps[ALONE],
                        "busy_images_per_s": loaded,
                        "busy_upper_bound": loaded_cap,
                        "busy_steps": steps[BUSY],
                        "busy_over_alone": ratio,
                        "child": info,
                    }
                )
                print(
                    f"{spec.label}, {n_threads} threads, {shown}: alone {row['alone img/s']} img/s, "
                    f"one core busy {row['busy img/s']} img/s, ratio {row['busy/alone']}",
                    flush=True,
                )
    elapsed = time.monotonic() - started
    load_after, pressure_after = os.getloadavg(), cpu_pressure()
    write_json(
        args.out,
        {
            "benchmark": "bench_worker_threads",
            "settings": vars(args) | {"out": str(args.out)},
            "cpu": cpu_name(),
            "openmp": "intel" if intel_omp else "gnu",
            "rows": raw,
            "seconds": elapsed,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "cpu_pressure_before": pressure_before,
            "cpu_pressure_after": pressure_after,
            "versions": library_versions(),
        },
    )
    print()
    print(markdown_table(COLUMNS, rows))
    print(
        f"\n{elapsed:.0f} s; load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"CPU pressure after: {pressure_after or 'n/a'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
