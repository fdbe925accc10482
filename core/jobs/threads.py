"""CPU share of the training worker: how many torch threads, an OpenMP wait policy that yields to a busy core, and a
lower CPU priority than the app server's."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

THREADS_VAR = "OMP_NUM_THREADS"
WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
# With libgomp's default policy, torch threads spin while they wait for each other, so any other busy process (the
# app server rendering a page, an inference, other programs) leaves every parallel region waiting for a descheduled
# thread. benchmarks/bench_worker_threads.py (docs/benchmarks.md, "Worker threads under load"), 2 threads on 2 shared
# cores: resnet18 at 32 px trained 6-7x slower, efficientnet_lite0 at 224 px 2-3x slower, than with PASSIVE, where
# waiting threads sleep. OpenMP reads the variable once, when torch loads it: it must be in the environment first.
WAIT_POLICY = "PASSIVE"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_threads(*, shares_machine: bool, cores: int | None = None) -> int:
    """torch threads for a training worker: every core, less one left to the app server on a shared machine with
    more than 2 cores.

    On 2 cores (measured) 1 thread was no faster than 2 PASSIVE threads while the other core was busy, and gives up
    half of an idle machine unused. From 3 cores up, leaving one costs at most a third of the training speed and
    keeps the app's page loads from queueing behind training (not measured: the development machines have 2 cores).
    """
    cores = max(1, usable_cores() if cores is None else cores)
    return cores - 1 if shares_machine and cores > 2 else cores


def worker_thread_env(
    *, shares_machine: bool, environ: Mapping[str, str] | None = None, cores: int | None = None
) -> dict[str, str]:
    """The OpenMP variables a worker should start with, except those `environ` (default: os.environ) already sets.

    An operator's OMP_NUM_THREADS or OMP_WAIT_POLICY always wins. `core.jobs.queue.ensure_worker` passes these to the
    worker it spawns (`shares_machine=True`: the app server runs here); `python -m core.jobs.worker` applies them at
    start.
    """
    environ = os.environ if environ is None else environ
    wanted = {
        THREADS_VAR: str(worker_threads(shares_machine=shares_machine, cores=cores)),
        WAIT_POLICY_VAR: WAIT_POLICY,
    }
    return {name: value for name, value in wanted.items() if not environ.get(name, "").strip()}


@dataclass(frozen=True)
class WorkerThreads:
    """What a worker process runs with: torch threads (None: torch's own choice) and the OpenMP wait policy."""

    threads: int | None
    wait_policy: str | None  # None: OpenMP's default (spinning), because torch was loaded before we could say
    added: tuple[str, ...]  # the variables this process set itself (the rest came from its environment)

    def describe(self) -> str:
        threads = "torch's default" if self.threads is None else str(self.threads)
        policy = self.wait_policy or "OpenMP's default (torch was loaded before the worker could set PASSIVE)"
        return f"threads {threads}, {WAIT_POLICY_VAR} {policy}"


def apply_worker_threads(*, shares_machine: bool = False) -> WorkerThreads:
    """Set this worker process's thread count and wait policy, keeping whatever its environment already says.

    Before torch is loaded (the normal case for `python -m core.jobs.worker`) the variables go into os.environ, where
    OpenMP and torch read them on import. If torch is already loaded (a worker run inside another command), the
    thread count is set with `torch.set_num_threads`, but the wait policy can no longer change.
    """
    added = worker_thread_env(shares_machine=shares_machine)
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ.update(added)
        return WorkerThreads(_int_or_none(os.environ.get(THREADS_VAR)), os.environ.get(WAIT_POLICY_VAR), tuple(added))
    if THREADS_VAR in added:
        torch.set_num_threads(int(added[THREADS_VAR]))
    policy = None if WAIT_POLICY_VAR in added else os.environ.get(WAIT_POLICY_VAR)
    if policy is None:
        log.warning(
            "torch was loaded before the worker started, so %s=%s cannot take effect: training slows down badly "
            "while another process is busy. Set it in the environment that starts this command.",
            WAIT_POLICY_VAR,
            WAIT_POLICY,
        )
    added_now = (THREADS_VAR,) if THREADS_VAR in added else ()
    return WorkerThreads(torch.get_num_threads(), policy, added_now)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def lower_worker_priority(increment: int) -> int:
    """Lower this process's CPU priority by `increment` (`Settings.worker_nice`); returns its niceness after.

    Training is background work: on a shared machine the scheduler then runs the app server's request threads (and
    people's label writes, which wait for no one else's turn) first, and training takes what they leave, which on an
    idle machine is everything. A platform without `os.nice` (Windows) keeps its priority.
    """
    if not hasattr(os, "nice"):
        return 0
    try:
        return os.nice(max(0, increment))
    except OSError as exc:  # a sandbox that forbids it: run at the priority given
        log.warning("could not lower the worker's CPU priority: %s", exc)
        return os.nice(0)
