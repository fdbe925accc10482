"""Load and fault check, the long version (issue 13 point 5): N labellers relabel through `core.catalog.labels` for a
bounded time while an import (`python -m core.cli import`) and a quick training job (a real `python -m core.jobs.worker
--once`) run, on SQLite, on a throw-away PostgreSQL cluster, or both.

Usage: .venv/bin/python benchmarks/load.py [--db sqlite|postgresql|both] [--labellers 20] [--processes 4]
       [--seconds 60] [--images 600] [--import-images 3000] [--view-s 2] [--think-s 0] [--import-nice 0] [--alone]
       [--train-params JSON] [--out FILE] [--keep DIR]

Each run starts from a fresh data directory (and, on PostgreSQL, a fresh database of a cluster started by
tests/postgres.py as a non-root user, fsync off): `--images` labelled photos in four categories are imported first.
Then `--labellers` threads, spread over `--processes` processes (how app servers serve people: several sessions per
process), relabel those photos flat out for `--seconds`, the way the review page does: `set_label` of one photo
(80 %), `bulk_relabel` of five (15 %) and `undo_last_change` of their own changes (5 %), each giving the label they
last saw (their view of the labels is read again every `--view-s` seconds), so a photo someone changed meanwhile is
refused as a conflict, as in the app. `--think-s` pauses each labeller that long on average after each change (a
person's pace; the default 0 is flat out). At the same moment a CLI import of `--import-images` new photos (a fifth,
new category among them) and a worker process with one queued quick training job start (`--alone`: neither, to
see what they add).

Checks (the exit status is 1 when one fails): the label_events rows the labellers wrote equal the events their
successful operations reported; every image's label equals its last event, and every event starts from the label
the one before left; no operation was refused for a lock (DatabaseBusy, a busy or deadlocked database); no
operation failed with anything but a typed error (core.errors.ProdcatError: a conflict, nothing to undo), so
nothing would reach a person as a traceback; label-write latency p99 under 500 ms; the import finished with every
file imported and no traceback; the training job succeeded. Prints a markdown table; `--out` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import ROOT, cpu_name, markdown_table, write_json

CATEGORIES = ("Shoes", "Bags", "Hats", "Shirts")
NEW_CATEGORY = "Scarves"  # only in the concurrent import: a category created while people label
P99_TARGET_MS = 500.0
BULK_SIZE = 5


class OpKind(StrEnum):
    SET = "set_label"
    BULK = "bulk_relabel"
    UNDO = "undo_last_change"


class Outcome(StrEnum):
    """What one labelling operation came to, as the person doing it would see it."""

    CHANGED = "changed"  # events written
    UNCHANGED = "unchanged"  # the label already was that: nothing to write
    CONFLICT = "conflict"  # LabelConflict: changed by someone since it was seen; nothing written
    NOTHING_TO_UNDO = "nothing to undo"  # NotFound from undo
    UNDO_REFUSED = "undo refused"  # CategoryError from undo: someone changed the image since
    LOCK = "refused for a lock"  # DatabaseBusy, or a database that said busy, locked or deadlocked
    OTHER_REFUSAL = "other refusal"  # any other typed refusal (ProdcatError)
    UNTYPED = "untyped error"  # anything else: a traceback for whoever called


@dataclass(frozen=True)
class Op:
    kind: OpKind
    outcome: Outcome
    events: int  # label_events rows the operation reported writing
    ms: float


@dataclass(frozen=True)
class LabellerSpec:
    """What one labeller process runs (written as JSON for it)."""

    indices: list[int]  # labeller numbers, one thread each
    image_ids: list[int]
    ready_file: str
    go_file: str
    out_file: str
    view_s: float
    think_s: float


# --- the labellers (child processes) ------------------------------------------------------------------------------


def classify(exc: BaseException) -> Outcome:
    """The outcome of an operation that raised `exc`."""
    from core.errors import CategoryError, DatabaseBusy, LabelConflict, NotFound, ProdcatError, as_storage_error

    if isinstance(exc, DatabaseBusy):
        return Outcome.LOCK
    if isinstance(exc, LabelConflict):
        return Outcome.CONFLICT
    if isinstance(exc, NotFound) and "nothing to undo" in str(exc):
        return Outcome.NOTHING_TO_UNDO
    if isinstance(exc, CategoryError) and "cannot undo" in str(exc):
        return Outcome.UNDO_REFUSED
    storage = as_storage_error(exc)
    if storage is not None and "the database is busy" in str(storage):
        return Outcome.LOCK  # typed or not, a lock refused the change
    return Outcome.OTHER_REFUSAL if isinstance(exc, ProdcatError) else Outcome.UNTYPED


class Labeller:
    """One person relabelling flat out, with a view of the labels that is up to `view_s` seconds old."""

    def __init__(self, db: Any, number: int, image_ids: list[int], view_s: float, think_s: float) -> None:
        self.db, self.actor, self.ids, self.view_s, self.think_s = (
            db,
            f"labeller-{number:02}",
            image_ids,
            view_s,
            think_s,
        )
        self.rng = random.Random(number)
        self.view: dict[int, str | None] = {}
        self.viewed_at = 0.0
        self.my_events: list[int] = []
        self.ops: list[Op] = []
        self.refusals: Counter[str] = Counter()  # "outcome (exception type)" -> how many
        self.examples: dict[str, str] = {}  # its first message (the traceback's last line for an untyped error)

    def refresh_view(self) -> None:
        from sqlalchemy import select

        from core.schema import Category, Label

        with self.db.read() as session:
            rows = session.execute(
                select(Label.image_id, Category.name).join(Category, Category.id == Label.category_id)
            )
            labelled = dict(rows.all())
        self.view = {i: labelled.get(i) for i in self.ids}
        self.viewed_at = time.monotonic()

    def run(self, deadline: float) -> None:
        while time.time() < deadline:
            if time.monotonic() - self.viewed_at > self.view_s:
                self.refresh_view()
            roll = self.rng.random()
            kind = OpKind.SET if roll < 0.80 else OpKind.BULK if roll < 0.95 else OpKind.UNDO
            self.ops.append(self.one(kind))
            if self.think_s > 0:  # a person looking at the next photo: 0.5x to 1.5x the mean pause
                time.sleep(min(self.think_s * self.rng.uniform(0.5, 1.5), max(0.0, deadline - time.time())))

    def one(self, kind: OpKind) -> Op:
        from core.catalog import labels

        begin = time.perf_counter()
        try:
            if kind is OpKind.SET:
                image_id = self.rng.choice(self.ids)
                seen = self.view[image_id]
                target = self.rng.choice([c for c in CATEGORIES if c != seen])
                changes = [labels.set_label(self.db, image_id, target, actor=self.actor, expected_label=seen)]
            elif kind is OpKind.BULK:
                chosen = self.rng.sample(self.ids, BULK_SIZE)
                expected = {i: self.view[i] for i in chosen}
                changes = labels.bulk_relabel(
                    self.db, chosen, self.rng.choice(CATEGORIES), actor=self.actor, expected_labels=expected
                )
            else:
                changes = labels.undo_last_change(self.db, actor=self.actor, only_event_ids=self.my_events)
        except Exception as exc:
            ms = (time.perf_counter() - begin) * 1000
            outcome = classify(exc)
            key = f"{outcome} ({type(exc).__name__})"
            self.refusals[key] += 1
            if outcome is Outcome.UNTYPED:
                self.examples.setdefault(key, traceback.format_exception(exc)[-1].strip())
            else:
                self.examples.setdefault(key, str(exc)[:300])
            return Op(kind, outcome, 0, ms)
        ms = (time.perf_counter() - begin) * 1000
        written = [c for c in changes if c.changed]
        for change in written:
            self.my_events.append(int(change.event_id or 0))
            self.view[change.image_id] = change.new_category
        return Op(kind, Outcome.CHANGED if written else Outcome.UNCHANGED, len(written), ms)


def run_labellers(spec: LabellerSpec) -> None:
    """Child process: open the database, say ready, wait for the go (it holds the deadline), relabel, write results."""
    from core.db import close_all, open_database

    db = open_database()
    people = [Labeller(db, number, spec.image_ids, spec.view_s, spec.think_s) for number in spec.indices]
    for person in people:
        person.refresh_view()
    Path(spec.ready_file).write_text("ready")
    go = Path(spec.go_file)
    while not go.exists():
        time.sleep(0.02)
    deadline = float(json.loads(go.read_text())["deadline"])
    threads = [threading.Thread(target=p.run, args=(deadline,)) for p in people]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    close_all()
    result = {
        "ops": [[op.kind.value, op.outcome.value, op.events, round(op.ms, 3)] for p in people for op in p.ops],
        "refusals": sum((p.refusals for p in people), Counter()),
        "examples": {k: v for p in people for k, v in p.examples.items()},
    }
    Path(spec.out_file).write_text(json.dumps(result))


# --- the run (parent) ---------------------------------------------------------------------------------------------


@dataclass
class Background:
    """A process started at the go: its command's outcome, and when it ended (seconds after the go)."""

    name: str
    process: subprocess.Popen[str]
    log: Path
    started: float
    ended_s: float | None = None
    returncode: int | None = None

    def wait(self, timeout: float) -> None:
        try:
            self.returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.returncode = self.process.wait()
        self.ended_s = time.time() - self.started

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class RunFigures:
    """Every figure and check of one database's run."""

    database: str
    labellers: int
    processes: int
    seconds: float
    ops: int = 0
    ops_per_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    events_reported: int = 0
    events_in_table: int = 0
    chain_breaks: int = 0
    label_mismatches: int = 0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)  # "outcome (exception type)" -> how many
    examples: dict[str, str] = field(default_factory=dict)  # one message of each
    import_summary: str = ""
    import_ok: bool = False
    import_s: float | None = None
    training_status: str = ""
    training_error: str = ""
    training_s: float | None = None
    load_average: list[float] = field(default_factory=list)  # 1-minute load average at the go and at the deadline
    checks: dict[str, bool] = field(default_factory=dict)


def photo(rng: np.random.Generator, category: int) -> PILImage.Image:
    """A distinct 48 px product-like picture: a category colour with random 6x6 blocks of shade."""
    base = np.array([(200, 60, 60), (60, 160, 60), (60, 60, 200), (200, 180, 40), (150, 60, 170)][category])
    blocks = rng.integers(-60, 60, size=(8, 8, 3))
    pixels = np.clip(base + blocks.repeat(6, axis=0).repeat(6, axis=1), 0, 255).astype(np.uint8)
    return PILImage.fromarray(pixels)


def make_folder(root: Path, count: int, categories: tuple[str, ...], seed: int) -> Path:
    """root/<category>/<n>.png, `count` distinct pictures spread over `categories`."""
    rng = np.random.default_rng(seed)
    for n in range(count):
        category = n % len(categories)
        folder = root / categories[category]
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, CATEGORIES.index(categories[category]) if categories[category] in CATEGORIES else 4).save(
            folder / f"{seed}-{n:05}.png"
        )
    return root


def environment(data_dir: Path, database_url: str | None) -> dict[str, str]:
    """The settings every process of the run shares (also set in this process)."""
    env = {
        "PRODCAT_DATA_DIR": str(data_dir),
        "PRODCAT_AUTH": "none",
        "PRODCAT_PRETRAINED": "none",
        "PRODCAT_DEVICE": "cpu",
        "PRODCAT_WORKER_IDLE_EXIT_S": "5",
    }
    os.environ.pop("PRODCAT_DATABASE_URL", None)
    if database_url:
        env["PRODCAT_DATABASE_URL"] = database_url
    os.environ.update(env)
    return dict(os.environ)


def start(name: str, command: list[str], work: Path, env: dict[str, str]) -> Background:
    log = work / f"{name}.log"
    with open(log, "w") as handle:  # the child keeps its own handle
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    return Background(name, process, log, time.time())


def spawn_labellers(args: argparse.Namespace, work: Path, env: dict[str, str], ids: list[int]) -> list[Background]:
    """The labeller processes, each ready (database open, view read) when this returns."""
    spread = [list(range(args.labellers))[p :: args.processes] for p in range(args.processes)]
    children = []
    for p, indices in enumerate(s for s in spread if s):
        spec = LabellerSpec(indices, ids, str(work / f"ready-{p}"), str(work / "go"), str(work / f"ops-{p}.json"),
                            args.view_s, args.think_s)  # fmt: skip
        spec_file = work / f"spec-{p}.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        children.append(start(f"labellers-{p}", [sys.executable, __file__, "--child", str(spec_file)], work, env))
    deadline = time.monotonic() + 300
    while not all(Path(work / f"ready-{p}").exists() for p in range(len(children))):
        dead = [c for c in children if c.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise SystemExit(f"a labeller process did not start:\n{(dead or children)[0].output()[-3000:]}")
        time.sleep(0.1)
    return children


def seed_catalogue(args: argparse.Namespace, work: Path) -> tuple[Any, list[int]]:
    """Open (migrate) the run's database and import the labelled photos the labellers work on."""
    from core.catalog.ingest import import_paths
    from core.db import open_database
    from core.settings import get_settings

    get_settings.cache_clear()
    db = open_database()
    folder = make_folder(work / "seed", args.images, CATEGORIES, seed=1)
    result = import_paths(db, [folder], labels_from_folders=True, actor="seeder")
    if result.refused or len(result.imported) != args.images:
        raise SystemExit(f"seeding the catalogue went wrong: {result.summary()}: {result.refused[:3]}")
    return db, [item.image_id for item in result.imported]


def start_import_and_worker(folder: Path, work: Path, env: dict[str, str], *, import_nice: int = 0) -> list[Background]:
    """The CLI import of `folder` (at `import_nice` lower CPU priority) and a worker that runs the queued job, then
    exits (at its own `PRODCAT_WORKER_NICE`)."""
    command = [sys.executable, "-m", "core.cli", "import", str(folder), "--labels-from-folders", "--actor", "importer"]
    if import_nice:
        command = ["nice", "-n", str(import_nice), *command]
    return [
        start("import", command, work, env),
        start("worker", [sys.executable, "-m", "core.jobs.worker", "--once"], work, env),
    ]


def run_once(args: argparse.Namespace, database: str, cluster: Any) -> RunFigures:
    """One database's run: seed, start everything at one go, wait, check."""
    from core.db import close_all
    from core.jobs import queue as jobs

    work = Path(tempfile.mkdtemp(prefix=f"load-{database}-", dir=args.keep))
    name = cluster.create_database(template=None) if cluster is not None else ""
    env = environment(work / "data", cluster.url(name) if cluster is not None else None)
    db, ids = seed_catalogue(args, work)
    # New photos for the import, a new category among them.
    folder = None if args.alone else make_folder(work / "import", args.import_images, (*CATEGORIES, NEW_CATEGORY), 2)
    print(f"[{database}] seeded {len(ids)} labelled photos; starting {args.labellers} labellers", flush=True)
    children = spawn_labellers(args, work, env, ids)
    job_id = None if args.alone else jobs.enqueue_training(db, "quick", json.loads(args.train_params), "trainer")
    go = time.time()
    # Written whole, then renamed: a labeller polling for the file never reads it half-written.
    (work / "go.tmp").write_text(json.dumps({"deadline": go + args.seconds}))
    (work / "go.tmp").replace(work / "go")
    background = [] if folder is None else start_import_and_worker(folder, work, env, import_nice=args.import_nice)
    load_at_go = os.getloadavg()[0]
    for child in children:
        child.wait(timeout=args.seconds + 300)
    load_at_end = os.getloadavg()[0]
    print(f"[{database}] labellers done after {time.time() - go:.0f} s", flush=True)
    for process in background:
        process.wait(timeout=args.seconds + 1800)
    figures = measure(args, database, db, work, children)
    figures.load_average = [load_at_go, load_at_end]
    if job_id is not None:
        importer, worker = background
        check_background(figures, importer, jobs.get_job(db, job_id), worker, expected_import=args.import_images)
    decide(figures, alone=args.alone)
    close_all()
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
        if cluster is not None:
            cluster.drop_database(name)
    return figures


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(max(values)), "n": len(values)}


def trail_check(db: Any) -> tuple[int, int]:
    """(events that do not start from the label the one before left, images whose label is not their last event's)."""
    from sqlalchemy import select

    from core.schema import Image, Label, LabelEvent

    with db.read() as session:
        current = dict(session.execute(select(Label.image_id, Label.category_id)).all())
        image_ids = session.scalars(select(Image.id)).all()
        events = session.execute(
            select(LabelEvent.image_id, LabelEvent.old_category_id, LabelEvent.new_category_id).order_by(
                LabelEvent.image_id, LabelEvent.id
            )
        )
        state: dict[int, int | None] = {}
        breaks = 0
        for image_id, old, new in events:
            breaks += old != state.get(image_id)
            state[image_id] = new
    mismatches = sum(current.get(i) != state.get(i) for i in image_ids)
    return breaks, mismatches


def measure(args: argparse.Namespace, database: str, db: Any, work: Path, children: list[Background]) -> RunFigures:
    """Gather the labellers' operations and check them against the tables."""
    from sqlalchemy import func, select

    from core.schema import LabelEvent

    figures = RunFigures(database, args.labellers, args.processes, args.seconds)
    ops: list[Op] = []
    refusals: Counter[str] = Counter()
    for p, child in enumerate(children):
        out = work / f"ops-{p}.json"
        if child.returncode != 0 or not out.exists():
            raise SystemExit(f"labeller process {p} failed ({child.returncode}):\n{child.output()[-3000:]}")
        result = json.loads(out.read_text())
        ops += [Op(OpKind(k), Outcome(o), int(e), float(ms)) for k, o, e, ms in result["ops"]]
        refusals.update(result["refusals"])
        figures.examples.update(result["examples"])
    figures.ops = len(ops)
    figures.ops_per_s = len(ops) / args.seconds
    figures.outcomes = dict(Counter(op.outcome.value for op in ops).most_common())
    figures.refusals = dict(refusals.most_common())
    figures.events_reported = sum(op.events for op in ops)
    with db.read() as session:
        figures.events_in_table = session.scalar(
            select(func.count()).select_from(LabelEvent).where(LabelEvent.actor.like("labeller-%"))
        )
    figures.chain_breaks, figures.label_mismatches = trail_check(db)
    figures.latency_ms = {"all label writes": percentiles([op.ms for op in ops])}
    figures.latency_ms |= {kind.value: percentiles([op.ms for op in ops if op.kind is kind]) for kind in OpKind}
    return figures


def check_background(
    figures: RunFigures, importer: Background, job: Any, worker: Background, *, expected_import: int
) -> None:
    """The import's and the training job's outcome."""
    text = importer.output()
    summary = re.search(r"(\d+) imported, (\d+) duplicates, (\d+) refused", text)
    lines = text.strip().splitlines()
    figures.import_summary = summary.group(0) if summary else lines[-1] if lines else "no output"
    figures.import_ok = bool(
        importer.returncode == 0 and summary and int(summary.group(1)) == expected_import and "Traceback" not in text
    )
    figures.import_s = importer.ended_s
    figures.training_status = str(job.status)
    figures.training_error = job.error.strip().splitlines()[-1] if job.error and job.error.strip() else ""
    if job.finished_at is not None:  # from queued (just before the go) to finished, both in the database's clock
        figures.training_s = (job.finished_at - job.created_at).total_seconds()
    if worker.returncode != 0 and not figures.training_error:
        figures.training_error = f"worker exited {worker.returncode}: {worker.output()[-500:]}"


def decide(figures: RunFigures, *, alone: bool) -> None:
    p99 = figures.latency_ms["all label writes"].get("p99", float("inf"))
    figures.checks = {
        "events equal the successful operations": figures.events_in_table == figures.events_reported,
        "every label equals its last event": figures.label_mismatches == 0 and figures.chain_breaks == 0,
        "no change refused for a lock": figures.outcomes.get(Outcome.LOCK.value, 0) == 0,
        "no untyped error (traceback)": figures.outcomes.get(Outcome.UNTYPED.value, 0) == 0,
        f"label-write p99 < {P99_TARGET_MS:g} ms": p99 < P99_TARGET_MS,
    }
    if not alone:
        figures.checks["import finished"] = figures.import_ok
        figures.checks["training succeeded"] = figures.training_status == "succeeded"


def report(runs: list[RunFigures]) -> str:
    """Markdown: one row of figures per database, then each check per database."""
    rows = []
    for f in runs:
        all_writes, single = f.latency_ms["all label writes"], f.latency_ms[OpKind.SET.value]
        rows.append({
            "database": f.database,
            "labellers (processes)": f"{f.labellers} ({f.processes})",
            "seconds": f.seconds,
            "operations": f.ops,
            "ops/s": f.ops_per_s,
            "changed": f.outcomes.get(Outcome.CHANGED.value, 0),
            "conflicts": f.outcomes.get(Outcome.CONFLICT.value, 0),
            "lock refusals": f.outcomes.get(Outcome.LOCK.value, 0),
            "untyped errors": f.outcomes.get(Outcome.UNTYPED.value, 0),
            "events / reported": f"{f.events_in_table} / {f.events_reported}",
            "labels != last event": f.label_mismatches,
            "p50 / p95 / p99 / max ms (all writes)": " / ".join(
                f"{all_writes.get(k, 0):,.0f}" for k in ("p50", "p95", "p99", "max")
            ),
            "set_label p99 ms": single.get("p99"),
            "import": f"{f.import_summary} in {f.import_s:.0f} s" if f.import_s is not None else "-",
            "training": f"{f.training_status} after {f.training_s:.0f} s" if f.training_s is not None else "-",
            "load avg": " -> ".join(f"{x:.1f}" for x in f.load_average),
        })  # fmt: skip
    table = markdown_table(list(rows[0]), rows)
    checks = [
        {"check": name, **{f.database: "pass" if f.checks[name] else "**FAIL**" for f in runs}}
        for name in runs[0].checks
    ]
    return table + "\n\n" + markdown_table(["check", *(f.database for f in runs)], checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--labellers", type=int, default=20)
    parser.add_argument("--processes", type=int, default=4, help="labeller processes (threads spread over them)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=600, help="labelled photos the labellers relabel")
    parser.add_argument("--import-images", type=int, default=3000, help="new photos imported meanwhile")
    parser.add_argument("--view-s", type=float, default=2.0, help="how old a labeller's view of the labels gets")
    parser.add_argument("--think-s", type=float, default=0.0, help="mean pause after each change (0: flat out)")
    parser.add_argument(
        "--import-nice", type=int, default=0, help="run the import this much nicer (what a background import gives)"
    )
    parser.add_argument("--alone", action="store_true", help="labellers only: no import, no training job")
    parser.add_argument("--train-params", default='{"arch": "resnet18", "image_size": 32}', help="quick job params")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_labellers(LabellerSpec(**json.loads(args.child.read_text())))
        return
    if not 1 <= args.processes <= args.labellers or args.seconds <= 0 or args.images < 2 * BULK_SIZE:
        parser.error("need 1 <= --processes <= --labellers, --seconds > 0 and --images >= 10")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    databases = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    runs = [run_database(args, database) for database in databases]
    print(f"\nload: {cpu_name()}, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(report(runs))
    write_json(args.out, {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": [asdict(r) for r in runs]})
    if not all(all(r.checks.values()) for r in runs):
        sys.exit(1)


def run_database(args: argparse.Namespace, database: str) -> RunFigures:
    """One run, on a cluster of its own for PostgreSQL (tests/postgres.py: initdb as a non-root user)."""
    if database == "sqlite":
        return run_once(args, database, None)
    from tests.postgres import start_cluster

    cluster = start_cluster()
    try:
        return run_once(args, database, cluster)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
