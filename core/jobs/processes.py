"""Whether a worker process on this machine is still running: a tag recorded when it registers, checked via /proc.

A tag is `<boot id>/<pid namespace>/<pid>/<start time>` (Linux). Another process can judge it only when it runs under
the same boot and pid namespace (same machine, same container): then the pid either still runs the process that
started at that tick, or the worker is gone (killed, crashed; a reused pid starts at another tick). Anywhere else, and
on systems without /proc, nothing is judged and the heartbeat timeout decides, as before.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

PROC = Path("/proc")


@functools.cache
def _scope() -> str:
    """This machine's boot and pid namespace, or "" where /proc does not tell."""
    try:
        boot_id = (PROC / "sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink(PROC / "self/ns/pid")
    except OSError:
        return ""
    return f"{boot_id}/{namespace}" if boot_id and namespace else ""


def _start_tick(pid: int) -> str | None:
    """Start time of process `pid` in clock ticks since boot; None when it does not run (or is a zombie)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name in (...) may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a killed child nobody reaped yet is gone all the same
        return None
    return fields[19]


def process_tag(pid: int | None = None) -> str:
    """The tag of process `pid` (default: this one) to record in `workers.process`; "" where it cannot be told."""
    pid = os.getpid() if pid is None else int(pid)
    scope, start = _scope(), _start_tick(pid)
    return f"{scope}/{pid}/{start}" if scope and start else ""


def process_gone(tag: str | None) -> bool:
    """True when `tag` names a process of this machine (and container) that no longer runs; False when it still runs
    or cannot be judged from here (another machine, no tag)."""
    parts = (tag or "").rsplit("/", 2)  # the scope itself holds a "/"
    if len(parts) != 3:
        return False
    scope, pid, start = parts
    if not scope or scope != _scope() or not pid.isdigit():
        return False
    return _start_tick(int(pid)) != start
