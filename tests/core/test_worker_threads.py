"""The worker's CPU share: sleeping OpenMP waits, a core left to the app on big machines, a lower priority than the
app's, operators' values kept."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.db import Database
from core.jobs import queue as jobs
from core.jobs.threads import THREADS_VAR, WAIT_POLICY_VAR, usable_cores, worker_threads
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OMP_VARS = (THREADS_VAR, WAIT_POLICY_VAR, "OMP_DISPLAY_ENV", "MKL_NUM_THREADS")

# Runs the worker's real entry point (no job queued: it returns at once), then loads torch the way a job would.
HAND_STARTED_WORKER = """
import os
from core.jobs import worker
assert worker.main(["--once"]) == 0
import torch
print(f"torch.get_num_threads() = {torch.get_num_threads()}")
print(f"niceness = {os.nice(0)}")
"""


def without_omp(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in OMP_VARS}


def run_hand_started_worker(extra_env: dict[str, str]) -> str:
    """stdout + stderr of a worker started by hand, with OpenMP printing the settings it really read."""
    env = without_omp(dict(os.environ)) | {"OMP_DISPLAY_ENV": "TRUE"} | extra_env
    done = subprocess.run(
        [sys.executable, "-c", HAND_STARTED_WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def openmp_read(output: str, name: str) -> str:
    """The value OpenMP reports (OMP_DISPLAY_ENV) for `name`: what the library itself uses, not our intention."""
    match = re.search(rf"{name}\s*=\s*'([^']*)'", output)
    assert match, f"OpenMP did not display {name}:\n{output}"
    return match.group(1)


def test_a_worker_the_app_starts_sleeps_while_waiting_and_gets_its_thread_count(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in OMP_VARS:
        monkeypatch.delenv(name, raising=False)
    env = jobs.worker_environment(settings)  # what ensure_worker hands to Popen
    assert env[WAIT_POLICY_VAR] == "PASSIVE"
    cores = usable_cores()
    assert env[THREADS_VAR] == str(cores - 1 if cores > 2 else cores)
    assert env["PRODCAT_DATA_DIR"] == str(settings.data_dir)  # the settings still travel with it


def test_an_operators_own_omp_settings_reach_the_spawned_worker_unchanged(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(THREADS_VAR, "7")
    monkeypatch.setenv(WAIT_POLICY_VAR, "ACTIVE")
    env = jobs.worker_environment(settings)
    assert (env[THREADS_VAR], env[WAIT_POLICY_VAR]) == ("7", "ACTIVE")
    monkeypatch.setenv(WAIT_POLICY_VAR, "")  # set but empty means unset to OpenMP: ours applies
    assert jobs.worker_environment(settings)[WAIT_POLICY_VAR] == "PASSIVE"


@pytest.mark.parametrize(
    ("cores", "shared", "alone"), [(0, 1, 1), (1, 1, 1), (2, 2, 2), (3, 2, 3), (4, 3, 4), (16, 15, 16)]
)
def test_a_shared_machine_leaves_one_core_from_three_cores_up(cores: int, shared: int, alone: int) -> None:
    assert worker_threads(shares_machine=True, cores=cores) == shared
    assert worker_threads(shares_machine=False, cores=cores) == alone


@pytest.mark.slow
def test_a_hand_started_worker_sets_passive_waits_and_all_cores_before_torch_loads(db: Database) -> None:
    output = run_hand_started_worker({})
    assert openmp_read(output, WAIT_POLICY_VAR) == "PASSIVE"
    assert f"torch.get_num_threads() = {usable_cores()}" in output
    assert f"worker threads: threads {usable_cores()}, OMP_WAIT_POLICY PASSIVE" in output  # its log says so
    # Background work: people's clicks on the same machine get the cores first (PRODCAT_WORKER_NICE, default 10).
    assert f"niceness = {min(os.nice(0) + 10, 19)}" in output


@pytest.mark.slow
@pytest.mark.skipif(usable_cores() < 2, reason="one core: the operator's 1 thread is also the worker's own choice")
def test_a_hand_started_worker_keeps_the_operators_omp_settings(db: Database) -> None:
    # 1 thread: not what a hand-started worker picks by itself (all cores); torch caps values above the core count.
    output = run_hand_started_worker({THREADS_VAR: "1", WAIT_POLICY_VAR: "ACTIVE", "PRODCAT_WORKER_NICE": "0"})
    assert openmp_read(output, WAIT_POLICY_VAR) == "ACTIVE"
    assert "torch.get_num_threads() = 1" in output
    assert f"niceness = {os.nice(0)}" in output  # 0: the priority it was started with
