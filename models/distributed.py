"""Full fine-tuning on several devices at once: DistributedDataParallel, one process per device, started by torch's
elastic launcher (the engine behind `torchrun`).

`train_full_distributed` is `models.training.train_full` for a worker given several devices (PRODCAT_TRAIN_DEVICES).

How it is launched, and why this way. `torchrun` is the command-line face of `torch.distributed.run`, which fills
a `LaunchConfig` and calls `torch.distributed.launcher.api.elastic_launch`: a local elastic agent that holds the c10d
rendezvous (on a free localhost port, as `torchrun --standalone` does), gives each process its RANK, LOCAL_RANK,
WORLD_SIZE and MASTER_ADDR, records each rank's exception in an error file (`@record`), and watches the group all or
nothing: when one rank raises or is killed, it stops the others and raises ChildFailedError. We call that launcher
inside the worker's process instead of running the `torchrun` command, because the job lives in the worker: progress
goes to the database through the worker's callback, a cancel comes from it, the starting network (pretrained or the
parent version) and the pixel cache are already in hand, and the trained weights come back to be measured and
registered. A `torchrun` subprocess would need a second entry script that re-reads the job from the database, plus a
side channel for progress and cancel; `torch.multiprocessing.spawn` starts processes but has no agent (rendezvous,
error files, stopping the group when one rank fails), which we would then write ourselves.

Processes start with "forkserver" (torchrun's default is "spawn"): as with spawn, no rank inherits the worker's CUDA
context or threads, but torch and timm are imported once, by the fork server, instead of by every rank of every job
(on a shared 2-core machine, 2 ranks: 5.5 CPU seconds for two launches against 16 with spawn).

What crosses between processes: the settings, labels and class names; the pixels as the *name* of their
memory-mapped cache file (`SharedRows`), never a copy; the starting and trained weights as safetensors files in the
run's folder; rank 0's progress reports and any rank's failure over a queue; the cancel as an Event. Nothing is read
back by unpickling a file.

What every rank keeps to, so that all see the same epochs and stop together:
- one step plan: `batch_size` is the batch of one optimiser step over the whole group, each of N ranks taking
  `batch_size // N` images of it, so steps per epoch, warm-up, the lr schedule and the epochs are those of one
  process. `DistributedSampler` deals each epoch's images out to the ranks (the class-balanced draws, made with the
  same seed on every rank, or a shuffle); BatchNorm is frozen when a rank's share is below 16 images (`freeze_bn`).
- a collective stop check every step (an all-reduce on a gloo group, so CUDA streams are not synchronised): a cancel
  seen by the worker stops every rank at the same step. A rank whose worker is gone (killed) exits at once.
- rank 0 alone validates after each epoch (evaluation as in one process), keeps the best weights, reports progress,
  decides early stopping for all (a broadcast), and writes the trained checkpoint, atomically (`save_checkpoint`).
- collectives time out (`timeout_s`): a rank that hangs fails the group with a timeout instead of blocking it.
NCCL serves CUDA devices, gloo CPU processes (tests run 2 CPU processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from models.checkpoint import CheckpointMeta, save_checkpoint
from models.devices import describe_devices
from models.errors import NotEnoughData, TrainingStopped
from models.factory import PreprocessConfig, create_network
from models.preprocess import PixelRows
from models.stages import StageLayout, StagePooledNet, stage_layout
from models.training import (
    _FREEZE_BN_BELOW,
    EpochRecord,
    ProgressCallback,
    StopCheck,
    TrainConfig,
    TrainData,
    TrainResult,
    _epoch_indices,
    _FullRun,
    _Validation,
)

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 30 * 60.0  # a rank waiting longer than this on the others fails the run
START_METHOD = "forkserver"
TRAINED_FILE = "trained.safetensors"  # rank 0's checkpoint of the best epoch, in the run's folder
INITIAL_FILE = "initial-weights.safetensors"  # the starting network's weights, for every rank to load
_RELAY_POLL_S = 0.2
_TRACEBACK_LINES = 12
# What gloo and NCCL say when the other end of a collective is gone: that rank failed first, not this one.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "communicator was aborted",
              "remote process exited")  # fmt: skip
# How long a rank that lost a peer waits before exiting, so the agent records the peer's end (say, SIGKILL) first.
_PEER_LOST_GRACE_S = 10.0  # the agent stops this rank meanwhile: no run lasts longer for it


class DistributedTrainingFailed(RuntimeError):
    """A rank raised, was killed or timed out; the message names it, its device and why. The other ranks were
    stopped, and nothing was written."""


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for a device type: NCCL between CUDA GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


class SharedRows:
    """Rows of a memory-mapped pixel file that another process maps again by name.

    Pickled (to reach a rank) it is the file's name, dtype, shape and the chosen row positions, never the pixels:
    a whole split is not copied into every rank. Indexing reads just the rows asked for (a `PixelRows`).
    """

    def __init__(self, mapped: np.memmap, positions: np.ndarray) -> None:
        self.path = str(mapped.filename)
        self.offset = int(mapped.offset)
        self.file_shape = tuple(int(n) for n in mapped.shape)
        self.file_dtype = mapped.dtype.str
        self.positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        self._mapped: np.ndarray | None = mapped

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mapped": None}

    def _rows(self) -> np.ndarray:
        if self._mapped is None:
            self._mapped = np.memmap(
                self.path, dtype=np.dtype(self.file_dtype), mode="r", offset=self.offset, shape=self.file_shape
            )
        return self._mapped

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.file_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.file_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.file_dtype)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: Any) -> np.ndarray:
        picked = self.positions[key]
        return np.array(self._rows()[picked])


def shareable(pixels: PixelRows) -> PixelRows:
    """Pixels ready to send to a rank: a whole-file memmap, or a lazy view of one (`.mapped` and `.positions`, as
    core's pixel cache hands out), becomes a `SharedRows` by file name; anything else is sent as it is."""
    mapped: object = pixels
    positions: np.ndarray | None = None
    if not isinstance(pixels, np.memmap):
        mapped, positions = getattr(pixels, "mapped", None), getattr(pixels, "positions", None)
    if not (
        isinstance(mapped, np.memmap)
        and isinstance(mapped.base, mmap.mmap)
        and mapped.flags.c_contiguous
        and mapped.filename is not None
    ):  # not a whole-file memmap
        return pixels
    return SharedRows(mapped, np.arange(len(mapped)) if positions is None else positions)


@dataclass(frozen=True)
class _RankJob:
    """Everything a rank needs, sent to each when it starts."""

    config: TrainConfig
    data: TrainData
    cfg: PreprocessConfig
    devices: list[str]
    folder: str
    timeout_s: float
    feature_layout: StageLayout | None = None  # the network is a StagePooledNet of this layout (models.stages)


@dataclass(frozen=True)
class _RankFailure:
    """A rank's exception, put on the report queue before the rank exits: the first one is the root cause."""

    rank: int
    device: str
    message: str
    traceback: str
    lost_peer: bool  # the error says another rank went away first


@dataclass(frozen=True)
class _Outcome:
    """What rank 0 hands back besides the weights file: the run's numbers, or where a requested stop happened."""

    history: list[EpochRecord]
    best_epoch: int = 0
    best_val_acc: float | None = None
    val_logits: np.ndarray | None = None
    stopped_early: bool = False
    temperature: float = 1.0
    stopped: str | None = None  # TrainingStopped's message when every rank stopped on request


def train_full_distributed(
    config: TrainConfig,
    data: TrainData,
    *,
    model: nn.Module,
    cfg: PreprocessConfig,
    devices: Sequence[str | torch.device],
    folder: str | os.PathLike[str],
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> TrainResult:
    """`train_full` on several devices together: one process per device under DistributedDataParallel.

    `folder` is this run's own folder (the starting weights, rank 0's checkpoint, the ranks' error files). Returns
    a TrainResult like `train_full`'s, with `model` (on the CPU, in eval mode) holding the best epoch's weights read
    back from rank 0's checkpoint and `extra` naming the devices and backend. `on_progress` gets rank 0's reports
    (from a thread of this process); `should_stop` is polled here and stops every rank at the same step.
    Raises TrainingStopped on request, DistributedTrainingFailed when a rank raised, was killed or timed out (the
    others are stopped), ValueError for fewer than 2 devices or devices of two kinds.
    """
    chosen = [torch.device(d) for d in devices]
    if len(chosen) < 2 or len({d.type for d in chosen}) != 1:
        raise ValueError(f"distributed training needs 2 or more devices of one kind, got {[str(d) for d in chosen]}")
    if len(data.train_labels) < 2:
        raise NotEnoughData(f"full training needs at least 2 training images, got {len(data.train_labels)}")
    run_folder = Path(folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    _write_weights(run_folder / INITIAL_FILE, model)
    shared = dataclasses.replace(data, train_pixels=shareable(data.train_pixels), val_pixels=shareable(data.val_pixels))
    job = _RankJob(
        config, shared, cfg, [str(d) for d in chosen], str(run_folder), float(timeout_s), stage_layout(model)
    )
    context = torch_mp.get_context(START_METHOD)
    context.set_forkserver_preload([__name__])  # takes effect when the fork server starts (once per process)
    relay = _Relay(context.Queue(), context.Event(), on_progress, should_stop)
    relay.start()
    try:
        outcomes = _launch(job, relay, len(chosen))
    except ChildFailedError as exc:
        relay.finish()
        raise DistributedTrainingFailed(_failure_text(exc, relay.failures, job)) from None
    finally:
        relay.finish()
    outcome: _Outcome = outcomes[0]
    if outcome.stopped is not None:
        raise TrainingStopped(outcome.stopped)
    model.load_state_dict(load_file(str(run_folder / TRAINED_FILE), device="cpu"), strict=True)
    model.to("cpu").eval()
    return TrainResult(
        model=model,
        temperature=outcome.temperature,
        history=outcome.history,
        best_epoch=outcome.best_epoch,
        best_val_acc=outcome.best_val_acc,
        val_logits=outcome.val_logits,
        stopped_early=outcome.stopped_early,
        extra={"devices": job.devices, "backend": backend_for(chosen[0]), "processes": len(chosen)},
    )


def _write_weights(path: Path, model: nn.Module) -> None:
    """The starting network's weights for the ranks (temporary name, then moved: a rank never reads half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _launch(job: _RankJob, relay: _Relay, processes: int) -> dict[int, Any]:
    """Run `_rank_main` on every device under the elastic agent; returns each rank's return value.

    The agent installs its own SIGTERM/SIGINT handlers while it runs (to stop the ranks before exiting); ours are put
    back afterwards, and a signal that stopped the run is raised again for them (the worker's fails the job).
    """
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"prodcat-{uuid.uuid4().hex}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        rdzv_configs={"join_timeout": int(min(job.timeout_s, 600))},
        max_restarts=0,  # a failed rank fails the job: a retry is a new job, with its own progress and history
        monitor_interval=0.1,
        start_method=START_METHOD,
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(job.folder) / "ranks")),
        signals_to_handle="SIGTERM,SIGINT",
    )
    stopped_by: int | None = None
    with _signal_handlers_kept():
        try:
            return elastic_launch(launch, _rank_main)(job, relay.reports, relay.stop)
        except SignalException as exc:
            stopped_by = int(exc.sigval)
    assert stopped_by is not None
    signal.raise_signal(stopped_by)  # our handler's turn: the worker's raises and fails the job
    raise DistributedTrainingFailed(f"distributed training stopped by signal {signal.Signals(stopped_by).name}")


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    signals = (signal.SIGTERM, signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    saved = [signal.getsignal(s) for s in signals] if in_main else []
    try:
        yield
    finally:
        for sig, handler in zip(signals, saved, strict=False):
            signal.signal(sig, handler)


def _failure_text(error: ChildFailedError, reported: list[_RankFailure], job: _RankJob) -> str:
    """Which rank failed first and why: a rank killed by a signal (its peers only see a closed connection), else
    the first exception a rank reported that was not about losing a peer, else a rank that ended without a word,
    else the agent's record."""
    killed = sorted((rank, f) for rank, f in error.failures.items() if f.exitcode < 0)
    own = [f for f in reported if not f.lost_peer]
    silent = sorted(set(range(len(job.devices))) - {f.rank for f in reported})
    detail = ""
    if killed:
        rank, failure = killed[0]
        what = f"was killed by {failure.signal_name()}"
        if failure.signal_name() == "SIGKILL":
            what += " (by hand, or by the system when memory ran out)"
    elif own or reported:
        first = (own or reported)[0]
        rank, what = first.rank, f"failed: {first.message}"
        detail = _traceback_tail(first)
        if first.lost_peer and silent:
            rank, what = silent[0], "ended without reporting an error (killed by hand or by the system?)"
            detail = ""
    else:
        rank, failure = error.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        what = f"exited with code {failure.exitcode}: {message}"
    if "timed out" in what.lower() or "timeout" in what.lower():
        what += f" (it waited over {job.timeout_s:g} s for another rank)"
    device = job.devices[rank] if 0 <= rank < len(job.devices) else "?"
    text = (
        f"distributed training on {len(job.devices)} devices ({', '.join(job.devices)}) failed: rank {rank} "
        f"({device}) {what}; the other ranks were stopped"
    )
    return f"{text}\n{detail}" if detail else text


def _traceback_tail(failure: _RankFailure) -> str:
    """The last lines of a rank's traceback, from a `File` line on."""
    tail = failure.traceback.rstrip().splitlines()[-_TRACEBACK_LINES:]
    while tail and not tail[0].lstrip().startswith("File "):
        tail.pop(0)
    return f"rank {failure.rank}'s traceback, last lines:\n" + "\n".join(tail)


class _Relay(threading.Thread):
    """In the worker's process while the ranks run: hands rank 0's progress reports to `on_progress`, keeps the
    ranks' failure reports, and turns `should_stop()` into the ranks' stop Event."""

    def __init__(
        self, reports: Any, stop: Any, on_progress: ProgressCallback | None, should_stop: StopCheck | None
    ) -> None:
        super().__init__(name="prodcat-ddp-relay", daemon=True)
        self.reports, self.stop = reports, stop
        self.on_progress, self.should_stop = on_progress, should_stop
        self.failures: list[_RankFailure] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self._poll_stop()
            try:
                item = self.reports.get(timeout=_RELAY_POLL_S)
            except queue.Empty:
                continue
            self._handle(item)
        while True:  # what the ranks put just before they exited
            try:
                item = self.reports.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def finish(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()

    def _poll_stop(self) -> None:
        if self.should_stop is None or self.stop.is_set():
            return
        try:
            if self.should_stop():
                self.stop.set()
        except Exception:  # a failing check must not leave the ranks without a relay
            log.exception("distributed training: the stop check failed")

    def _handle(self, item: Any) -> None:
        if isinstance(item, _RankFailure):
            self.failures.append(item)
        elif self.on_progress is not None:
            try:
                self.on_progress(item)
            except Exception:  # progress is best effort; the run goes on
                log.exception("distributed training: a progress report failed")


# --- in each rank -----------------------------------------------------------------------------------------------


@record
def _rank_main(job: _RankJob, reports: Any, stop: Any) -> _Outcome | None:
    """One rank: join the group, train its share, and (rank 0) write the trained checkpoint. Any exception is put on
    the report queue first, so the worker can tell the rank that failed from the ones that lost it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(job.devices[int(os.environ["LOCAL_RANK"])])
    threading.Thread(target=_exit_with_worker, name="prodcat-rank-watch", daemon=True).start()
    try:
        return _train_rank(job, rank, world, device, reports, stop)
    except Exception as exc:
        lost_peer = any(words in str(exc).lower() for words in _PEER_LOST)
        message = f"{type(exc).__name__}: {exc}"
        reports.put(_RankFailure(rank, str(device), message, traceback.format_exc(), lost_peer))
        if lost_peer:
            time.sleep(_PEER_LOST_GRACE_S)
        raise


def _exit_with_worker() -> None:
    """A rank whose worker is gone (kill -9) has no one to report to: it exits at once rather than train, or wait in
    a collective or for the launcher, for nobody while holding a GPU. The worker is multiprocessing's parent process
    of the rank (the one that asked the fork server for it), watched through the pipe it holds open while alive."""
    worker = multiprocessing.parent_process()
    if worker is None:
        return
    worker.join()
    os._exit(1)


def _train_rank(job: _RankJob, rank: int, world: int, device: torch.device, reports: Any, stop: Any) -> _Outcome | None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    timeout = timedelta(seconds=job.timeout_s)
    dist.init_process_group(backend_for(device), timeout=timeout)
    try:
        # Stop flags, epoch totals and the early-stop verdict are CPU tensors: gloo, also beside NCCL.
        control = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD
        model, _ = create_network(job.config.arch, len(job.data.class_names), pretrained="none")
        if job.feature_layout is not None:
            model = StagePooledNet(model, job.feature_layout, len(job.data.class_names))
        model.load_state_dict(load_file(str(Path(job.folder) / INITIAL_FILE), device="cpu"), strict=True)
        run = _DistributedRun(job, model, device, rank=rank, world=world, control=control, reports=reports, stop=stop)
        try:
            result = run.run()
        except TrainingStopped as exc:
            return _Outcome(history=[], stopped=str(exc)) if rank == 0 else None
        if rank != 0:
            return None
        meta = CheckpointMeta.from_preprocess(
            job.config.arch,
            job.data.class_names,
            job.cfg,
            temperature=result.temperature,
            train_config=job.config.to_dict(),
            seed=job.config.seed,
            **CheckpointMeta.layout_fields(job.feature_layout),
        )
        save_checkpoint(Path(job.folder) / TRAINED_FILE, result.model, meta)
        return _Outcome(
            history=result.history,
            best_epoch=result.best_epoch,
            best_val_acc=result.best_val_acc,
            val_logits=result.val_logits,
            stopped_early=result.stopped_early,
            temperature=result.temperature,
        )
    finally:
        dist.destroy_process_group()


class _DistributedRun(_FullRun):
    """`_FullRun` as one rank of a DDP group (see the module docstring for what every rank keeps to)."""

    def __init__(
        self,
        job: _RankJob,
        model: nn.Module,
        device: torch.device,
        *,
        rank: int,
        world: int,
        control: Any,
        reports: Any,
        stop: Any,
    ) -> None:
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.control, self.stop = control, stop
        on_progress = reports.put if rank == 0 else None
        super().__init__(job.config, job.data, model, job.cfg, device, on_progress, None)
        self.augment_gen = torch.Generator().manual_seed(job.config.seed + 1 + 1000 * rank)  # each its own crops
        self.local_batch = max(1, self.plan.batch_size // world)
        freeze = job.config.freeze_bn
        self.plan = dataclasses.replace(
            self.plan, freeze_bn=freeze if freeze is not None else self.local_batch < _FREEZE_BN_BELOW
        )
        self.device_text = describe_devices([torch.device(d) for d in job.devices])

    def _training_model(self, model: nn.Module) -> nn.Module:
        wrapped = DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None)
        return cast(nn.Module, torch.compile(wrapped)) if self.config.compile else wrapped

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's share of the epoch, dealt by DistributedSampler: of the class-balanced draws (the same on every
        rank: same seed), or of a shuffle of the train split."""
        local, steps = self.local_batch, self._epoch_steps()
        if self.config.balance == "sampler":
            num = self.plan.steps_per_epoch * local * self.world
            draws = _epoch_indices("sampler", self.data.train_labels, self.counts, num, self.sample_gen)
            dealt: DistributedSampler[int] = DistributedSampler(
                draws,  # type: ignore[arg-type]  # only len() is used; the stub asks for a Dataset
                num_replicas=self.world,
                rank=self.rank,
                shuffle=False,
            )
            mine = draws[np.fromiter(iter(dealt), dtype=np.int64)]
        else:
            dealt = DistributedSampler(
                self.data.train_labels,  # type: ignore[arg-type]  # only len() is used; the stub asks for a Dataset
                num_replicas=self.world,
                rank=self.rank,
                shuffle=True,
                seed=self.config.seed,
            )
            dealt.set_epoch(epoch)
            mine = np.fromiter(iter(dealt), dtype=np.int64)
        return [np.sort(mine[i * local : (i + 1) * local]) for i in range(steps)]

    def _stop_point(self, where: str) -> None:
        flag = torch.tensor([int(self.stop.is_set())], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if int(flag.item()):
            raise TrainingStopped(f"training stopped on request ({where})")

    def _epoch_totals(self, loss_sum: float, correct: float, seen: int) -> tuple[float, float, int]:
        totals = torch.tensor([loss_sum, correct, float(seen)], dtype=torch.float64)
        dist.all_reduce(totals, group=self.control)
        return float(totals[0]), float(totals[1]), int(totals[2])

    def _agreed(self, stop_early: bool) -> bool:
        verdict = torch.tensor([int(stop_early)], dtype=torch.int32)
        dist.broadcast(verdict, src=0, group=self.control)
        return bool(verdict.item())

    def _validate(self, epoch: int) -> _Validation | None:
        return super()._validate(epoch) if self.is_main else None
