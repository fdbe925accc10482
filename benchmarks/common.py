"""Helpers shared by the benchmark scripts: device names, timing, markdown rows, peak memory, JSON results."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def ensure_repo_on_path() -> None:
    """Let `python benchmarks/x.py` import `core` and `models` like `python -m benchmarks.x` does."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux) or platform, with the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def device_name(device: Any) -> str:
    """A readable name for a torch device: the GPU model for CUDA, the CPU model otherwise."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}"


def synchronize(device: Any) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timer:
    """Elapsed wall-clock seconds of a `with timed() as t:` block."""

    seconds: float = 0.0


@contextmanager
def timed(device: Any = None) -> Iterator[Timer]:
    """Time a block with perf_counter, synchronising `device` before and after when given."""
    timer = Timer()
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    try:
        yield timer
    finally:
        if device is not None:
            synchronize(device)
        timer.seconds = time.perf_counter() - start


def rate(count: float, seconds: float) -> float:
    """Items per second, 0 when nothing was timed."""
    return float(count) / seconds if seconds > 0 else 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return max(own, children) / scale


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process in MiB, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def fmt(value: Any) -> str:
    """A compact cell: floats with sensible precision, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table (header, separator, one line per row) over `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, results: Any) -> None:
    """Write results as indented JSON (parents created); nothing when no path was given."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")


def library_versions() -> dict[str, str]:
    """Versions that change the numbers: python, torch, torchvision, timm."""
    import timm
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": str(torch.version.cuda),
    }
