"""Where the next retrain starts: the active version, or a new lineage from the best available pretrained weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import TrainingRefused
from core.settings import Settings

if TYPE_CHECKING:
    from core.versions import VersionView
    from models.pretrained import StartingWeights

# First-model accuracy by labelled images, measured by benchmarks/label_efficiency.py (Fashion-MNIST, official test
# images, every default, 2 CPU cores; docs/benchmarks.md). Keyed by the weights source of a new lineage.
EXPECTED_ACCURACY: dict[str, tuple[tuple[int, float], ...]] = {}


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

    try:
        return resolve_starting_weights(
            settings.pretrained, arch=arch, pretrained_file=settings.pretrained_file, cache_dir=settings.cache_dir
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
    if parent.pretrained_source != "none" and settings.pretrained_file is None:
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


def expected_accuracy(source_label: str | None, labelled: int) -> tuple[int, float] | None:
    """The measured first-model accuracy at the largest benchmarked label count not above `labelled`, if any."""
    if source_label is None:
        return None
    points = EXPECTED_ACCURACY.get(source_label.split(":")[0], ())
    below = [p for p in points if p[0] <= max(labelled, points[0][0] if points else 0)]
    return below[-1] if below else None
