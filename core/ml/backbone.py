"""Where the next retrain starts: the active version, or a new lineage from pretrained weights (set or chosen)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from core.auth import Action, authorize, authorized_write, record
from core.catalog.serverfiles import exchange_file, exchange_files
from core.db import Database
from core.errors import TrainingRefused
from core.schema import Category, Label
from core.settings import Settings

if TYPE_CHECKING:
    from core.db import Database
    from core.ml.versions import VersionView
    from models.pretrained import StartingWeights

WEIGHTS_SUFFIX = ".safetensors"
SELECTION_FILE = "selected.json"
RANDOM_SOURCE = "none"  # the `pretrained_source` of a version trained from random initial weights
# Where the chosen file is used: the other PRODCAT_PRETRAINED values insist on the hub, the bundled weights or none.
_FILE_CHOICES = ("auto", "file")

# First-model accuracy by labelled images, measured by benchmarks/label_efficiency.py on 2026-11-30 (Fashion-MNIST,
# every default: quick mode at 224 px on 2 CPU cores, random picking, seed 0; docs/benchmarks.md "Label efficiency").
# The bundled weights (stage-pooled features with BlockPooling.HALVES_MIRROR_STD, the whole photo) on all 10,000
# official test images; random weights on 2,000 of them, which flattered the bundled curve by 0.2-1.1 points. Keyed by
# the kind of weights a new lineage starts from; kinds never measured say nothing.
EXPECTED_ACCURACY: dict[str, tuple[tuple[int, float], ...]] = {
    "bundled": ((100, 0.755), (300, 0.8236), (1000, 0.8553), (3000, 0.8832)),
    "none": ((100, 0.375), (300, 0.4655), (1000, 0.535), (3000, 0.6055)),
}


@dataclass(frozen=True)
class Lineage:
    """Where the next model version starts: the active version (`continue_from`) or fresh `weights`."""

    arch: str
    continue_from: int | None
    weights: StartingWeights | None
    reason: str

    @property
    def source_label(self) -> str | None:
        """The weights provenance of a new lineage (`bundled:efficientnet_lite0`), None when continuing."""
        return self.weights.label if self.weights is not None else None

    def describe(self) -> str:
        """One sentence for the Train page, `train` and `models list`."""
        if self.weights is None:
            return self.reason
        return f"{self.weights.describe()}. {self.reason}".strip()


def starting_weights(settings: Settings, arch: str | None) -> StartingWeights:
    """The best starting weights the settings allow for `arch` (None: the architecture follows the weights).

    A configured weights file that is missing, corrupt or for another architecture, or a source asked for explicitly
    that is not available, is refused with TrainingRefused naming the problem: never a silent random start.
    """
    from models.errors import WeightsInvalid, WeightsUnavailable
    from models.pretrained import resolve_starting_weights

    weights_file, chosen = _effective_choice(settings)
    if arch is None and chosen is not None and settings.pretrained in _FILE_CHOICES:
        # A chosen file's architecture was settled when it was picked (its metadata, or the configured default then):
        # a new lineage follows it even when the file names none and the default has changed since.
        arch = chosen.arch
    try:
        return resolve_starting_weights(
            settings.pretrained, arch=arch, pretrained_file=weights_file, cache_dir=settings.cache_dir
        )
    except (WeightsInvalid, WeightsUnavailable) as exc:
        raise TrainingRefused(f"pretrained weights refused: {exc}") from exc


def plan_lineage(
    settings: Settings, *, parent: VersionView | None, job_arch: str | None = None, image_size: int | None = None
) -> Lineage:
    """Continue the active version when it fits, else start a new lineage from the best available weights.

    The active version is continued when its architecture and image size are the ones asked for (or none was asked
    for) and it was itself pretrained, unless a weights file is configured that it did not start from. A version
    trained from random weights is not continued when pretrained weights are available: the new lineage is measured
    on the same test images and replaces it only if it is not worse (the promotion rule), never silently.
    """
    arch = job_arch or settings.default_arch
    size = image_size or settings.image_size
    fits = parent is not None and parent.image_size == size and arch in (None, parent.arch)
    if parent is None or not fits:
        weights = starting_weights(settings, arch)
        why = "first model" if parent is None else f"v{parent.id} is {parent.arch} at {parent.image_size} px"
        return Lineage(weights.arch, None, weights, f"A new lineage ({why}).")
    continuing = Lineage(
        parent.arch, parent.id, None, f"Continues v{parent.id} ({parent.arch}, from {parent.pretrained_source})."
    )
    if not started_from_random(parent.pretrained_source) and effective_pretrained_file(settings) is None:
        return continuing
    weights = starting_weights(settings, parent.arch if arch else None)
    if not weights.pretrained or weights.label == parent.pretrained_source:
        return continuing
    return Lineage(
        weights.arch,
        None,
        weights,
        f"A new lineage: v{parent.id} started from {parent.pretrained_source}; the new version must match or beat "
        "it on the same test images before it serves.",
    )


def expected_accuracy(source_label: str | None) -> ExpectedAccuracy | None:
    """The measured learning curve of a first model from this kind of weights, when one was benchmarked."""
    if source_label is None:
        return None
    kind = source_label.split(":", 1)[0]
    points = EXPECTED_ACCURACY.get(kind, ())
    return ExpectedAccuracy(kind, tuple(points)) if points else None


def started_from_random(source: str | None) -> bool:
    """True for a version trained from random initial weights (`pretrained_source` "none"; empty in damaged rows)."""
    return (source or RANDOM_SOURCE).split(":", 1)[0] == RANDOM_SOURCE


# --- the weights file chosen on the Categories & data page ----------------------------------------------------------


@dataclass(frozen=True)
class WeightsSelection:
    """The pretrained weights file an admin chose from the exchange folder, kept as a copy in data_dir/weights/."""

    arch: str
    file: str  # the copy's name in data_dir/weights/ (its `file:<name>` label is stored with every version)
    sha256: str
    chosen_at: datetime
    path: Path
    source: str = ""  # the name it had in the exchange folder
    chosen_by: str = ""


def weights_dir(settings: Settings) -> Path:
    """Where chosen weights files are kept: inside the data directory, so the exchange copy can be deleted."""
    return settings.data_dir / "weights"


def selected_weights(settings: Settings) -> WeightsSelection | None:
    """The recorded choice, or None. A damaged record is refused (TrainingRefused) rather than silently ignored."""
    record = weights_dir(settings) / SELECTION_FILE
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        name = str(data["file"])
        # The record names a file in the weights folder and nothing else, whatever was written into it.
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        return WeightsSelection(
            arch=str(data["arch"]),
            file=name,
            sha256=str(data["sha256"]),
            chosen_at=datetime.fromisoformat(str(data["chosen_at"])),
            path=weights_dir(settings) / name,
            source=str(data.get("source", "")),
            chosen_by=str(data.get("chosen_by", "")),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TrainingRefused(
            f"the record of the chosen pretrained weights {record} is damaged ({exc}): choose the weights file again, "
            "or clear the choice, on the Categories & data page"
        ) from exc


def _effective_choice(settings: Settings) -> tuple[Path | None, WeightsSelection | None]:
    if settings.pretrained_file is not None:  # the environment wins over the choice made in the app
        return settings.pretrained_file, None
    chosen = selected_weights(settings)
    return (chosen.path if chosen is not None else None), chosen


def effective_pretrained_file(settings: Settings) -> Path | None:
    """The weights file a new lineage starts from: PRODCAT_PRETRAINED_FILE when set, else the file chosen in the app."""
    return _effective_choice(settings)[0]


def weights_notes(settings: Settings) -> tuple[str, ...]:
    """Why a chosen weights file is not the one used (a setting overrides it), for the Train and Categories pages."""
    chosen = selected_weights(settings)
    if chosen is None:
        return ()
    if settings.pretrained_file is not None:
        return (
            f"PRODCAT_PRETRAINED_FILE ({settings.pretrained_file}) is set and wins over the weights file chosen in the "
            f"app ({chosen.file}).",
        )
    if settings.pretrained not in _FILE_CHOICES:
        return (f"PRODCAT_PRETRAINED={settings.pretrained}: the chosen weights file {chosen.file} is not used.",)
    return ()


def use_weights_file(db: Database, name: str, *, actor: str) -> StartingWeights:
    """Make the `.safetensors` file `name` in the exchange folder the pretrained backbone of new lineages.

    The name is resolved only inside the exchange folder (PathRefused for `..`, full paths, links out). The file is
    checked as the PRODCAT_PRETRAINED_FILE setting would be, and by building the network for its architecture (its
    safetensors metadata "arch", else PRODCAT_DEFAULT_ARCH), so a corrupt or wrong-architecture file is refused here
    (TrainingRefused, naming the file and why) and the previous choice stays. Then it is copied into data_dir/weights/
    (temporary file, then moved into place) and the choice recorded in data_dir/weights/selected.json.
    """
    from models.errors import WeightsInvalid, WeightsUnavailable
    from models.factory import create_network
    from models.pretrained import StartingWeights, WeightsSource, check_weights_file, resolve_starting_weights

    settings = db.settings
    authorize(db, actor, Action.WEIGHTS)
    source = exchange_file(settings, name, suffix=WEIGHTS_SUFFIX)
    try:
        file_arch = check_weights_file(source)
        if file_arch is None and settings.default_arch is None:
            raise TrainingRefused(
                f"pretrained weights refused: {name} does not say which architecture it holds (no 'arch' in its "
                "safetensors metadata): set PRODCAT_DEFAULT_ARCH to its timm architecture (e.g. resnet18), or save "
                'it with metadata {"arch": ...}'
            )
        # The same check (and wording) as a configured PRODCAT_PRETRAINED_FILE, then the network it would build.
        weights = resolve_starting_weights(
            "file", arch=settings.default_arch, pretrained_file=source, cache_dir=settings.cache_dir
        )
        create_network(weights.arch, 2, pretrained=WeightsSource.FILE.value, pretrained_file=source)
    except (WeightsInvalid, WeightsUnavailable, ValueError) as exc:  # ValueError: an architecture timm does not know
        raise TrainingRefused(f"pretrained weights refused: {exc}") from exc

    folder = weights_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    try:
        previous = selected_weights(settings)
    except TrainingRefused:  # a damaged record is replaced by this choice
        previous = None
    digest = _copy_checked(source, target)
    selection = {
        "arch": weights.arch,
        "file": target.name,
        "sha256": digest,
        "chosen_at": datetime.now(UTC).isoformat(),
        "source": Path(name).as_posix(),
        "chosen_by": actor,
    }
    with authorized_write(db, actor, Action.WEIGHTS) as session:
        record(session, actor, Action.WEIGHTS, f"weights file {target.name}", arch=weights.arch, sha256=digest)
    _write_atomically(folder / SELECTION_FILE, json.dumps(selection, indent=2).encode("utf-8"))
    if previous is not None and previous.path != target:
        previous.path.unlink(missing_ok=True)  # only the chosen file is kept: weights files are tens of megabytes
    return StartingWeights(weights.arch, WeightsSource.FILE, target)


def clear_weights_selection(db: Database, *, actor: str) -> WeightsSelection | None:
    """Forget the weights file chosen in the app (new lineages follow PRODCAT_PRETRAINED again); returns what it was.

    A damaged record is removed too (then None is returned).
    """
    settings = db.settings
    with authorized_write(db, actor, Action.WEIGHTS) as session:
        record(session, actor, Action.WEIGHTS, "weights selection", change="clear")
    try:
        chosen = selected_weights(settings)
    except TrainingRefused:
        chosen = None
    (weights_dir(settings) / SELECTION_FILE).unlink(missing_ok=True)
    if chosen is not None:
        chosen.path.unlink(missing_ok=True)
    return chosen


def _copy_checked(source: Path, target: Path) -> str:
    """Copy `source` to `target` through a temporary file in the target folder, then move it into place.

    Returns the copy's sha256. The copy is read back as safetensors before it replaces anything, so a file that
    changed while it was being copied (still uploading) never becomes the chosen weights.
    """
    from models.errors import WeightsInvalid
    from models.pretrained import check_weights_file

    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(temp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        try:
            check_weights_file(temp)
        except WeightsInvalid as exc:
            raise TrainingRefused(
                f"pretrained weights refused: {source.name} changed while it was being copied ({exc}): try again "
                "once it is complete"
            ) from exc
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp_name, path)
    finally:
        Path(temp_name).unlink(missing_ok=True)


@dataclass(frozen=True)
class BackboneChoice:
    """The Categories & data page's backbone section: the chosen file, what else could be chosen, and caveats."""

    chosen: WeightsSelection | None
    candidates: list[str]  # `.safetensors` names in the exchange folder
    notes: tuple[str, ...] = ()
    problem: str | None = None  # a damaged choice record: clearing it is the way out


def backbone_choice(settings: Settings) -> BackboneChoice:
    """What the Categories & data page shows about the chosen pretrained weights file (no file is read but JSON)."""
    candidates = exchange_files(settings, suffix=WEIGHTS_SUFFIX)
    try:
        return BackboneChoice(selected_weights(settings), candidates, weights_notes(settings))
    except TrainingRefused as exc:
        return BackboneChoice(None, candidates, problem=str(exc))


# --- what the next retrain starts from ------------------------------------------------------------------------------


_WEIGHTS_WORDS = {
    "bundled": "the bundled ImageNet weights",
    "hub": "timm hub weights",
    "file": "a chosen weights file",
    RANDOM_SOURCE: "random initial weights",
}


@dataclass(frozen=True)
class ExpectedAccuracy:
    """A measured learning curve: first-model test accuracy at several label counts, from `source` weights."""

    source: str  # the kind of weights it was measured with: bundled, hub, file, none
    points: tuple[tuple[int, float], ...]  # (labelled images, accuracy), ascending

    def at(self, labelled: int) -> tuple[int, float]:
        """The measured point at the largest label count not above `labelled` (the smallest one below that)."""
        reached = [p for p in self.points if p[0] <= labelled]
        return reached[-1] if reached else self.points[0]

    def describe(self, labelled: int) -> str:
        """One sentence for people who have `labelled` images labelled now."""
        curve = ", ".join(f"{n:,} labels {acc:.0%}" for n, acc in self.points)
        n, acc = self.at(labelled)
        return (
            f"Expected first model: about {acc:.0%} test accuracy with {n:,} labelled images ({labelled:,} now); "
            f"measured with {_WEIGHTS_WORDS.get(self.source, self.source)} on Fashion-MNIST: {curve} "
            "(quick mode, the CPU default; docs/benchmarks.md). "
            "Your photos will differ."
        )


@dataclass(frozen=True)
class NextStart:
    """What the next retrain starts from, for the Train page and `train`; `problem` when the weights are refused."""

    description: str  # Lineage.describe(), or the refusal
    source_label: str | None  # the weights of a new lineage (`bundled:efficientnet_lite0`); None when continuing
    new_lineage: bool
    labelled: int
    expected: ExpectedAccuracy | None = None
    problem: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def random_start(self) -> bool:
        """A new lineage from random initial weights: expect a much weaker first model."""
        return self.new_lineage and started_from_random(self.source_label)


def next_start(
    db: Database, *, job_arch: str | None = None, image_size: int | None = None, labelled: int | None = None
) -> NextStart:
    """Where the next retrain would start (continue the active version, or a new lineage from which weights), with
    the benchmarked accuracy of a first model at this many labels when one is known.

    `labelled` (images labelled in live categories) is counted when not given. Refused weights are not raised:
    `problem` says why, so the page can show it and keep Retrain disabled.
    """
    from core.ml.versions import active_version

    if labelled is None:
        labelled = _labelled_in_live_categories(db)
    try:
        notes = weights_notes(db.settings)
        lineage = plan_lineage(db.settings, parent=active_version(db), job_arch=job_arch, image_size=image_size)
    except TrainingRefused as exc:
        return NextStart(str(exc), None, False, labelled, problem=str(exc))
    new = lineage.continue_from is None
    expected = expected_accuracy(lineage.source_label) if new else None
    return NextStart(lineage.describe(), lineage.source_label, new, labelled, expected, notes=notes)


def _labelled_in_live_categories(db: Database) -> int:
    with db.read() as session:
        query = (
            select(func.count())
            .select_from(Label)
            .join(Category, Category.id == Label.category_id)
            .where(Category.archived_at.is_(None))
        )
        return int(session.scalar(query) or 0)
