"""Self-describing checkpoints: safetensors weights plus a JSON sidecar, written atomically, never unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from models.errors import CheckpointInvalid
from models.factory import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, PreprocessConfig, create_network
from models.stages import MAX_BLOCK_INDEX, BlockPooling, StageLayout, StagePooledNet

SIDECAR_FORMAT = 1
# Bounds on what a sidecar may claim, checked before anything is built from it: a sidecar is a file anyone with
# access to the data directory (or an uploaded model) can write, and a million class names or a 20,000 px input would
# allocate gigabytes before failing. Category names are at most 200 characters in core.
MAX_SIDECAR_BYTES = 4 * 1024 * 1024
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 256
MAX_ARCH_NAME = 128
MAX_TEXT_FIELD = 1_000  # interpolation, pretrained_source, backbone_id
PROBE_BATCH = 2  # images of the probe a loaded model must answer with finite numbers


def library_versions() -> dict[str, str]:
    """Versions of the libraries that define the weights' meaning, stored beside every checkpoint."""
    return {"torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__}


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild, preprocess for, and explain a checkpoint (the `.json` sidecar)."""

    arch: str
    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    crop_pct: float
    interpolation: str
    temperature: float = 1.0
    train_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    data_snapshot: dict[str, Any] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=library_versions)
    pretrained_source: str = "none"
    backbone_id: str = ""
    feature_blocks: list[int] = field(default_factory=list)  # a StagePooledNet's pooled blocks; [] for a plain net
    feature_pooling: str = BlockPooling.MEAN.value  # how those blocks are pooled (sidecars before it: the mean)

    @property
    def stage_layout(self) -> StageLayout | None:
        """The stage-pooled network this checkpoint holds, None for a plain one (fields checked by `read_meta`)."""
        if not self.feature_blocks:
            return None
        return StageLayout(tuple(self.feature_blocks), BlockPooling(self.feature_pooling))

    @classmethod
    def layout_fields(cls, layout: StageLayout | None) -> dict[str, Any]:
        """The sidecar fields recording `layout` (none for a plain network)."""
        if layout is None:
            return {}
        return {"feature_blocks": list(layout.blocks), "feature_pooling": layout.pooling.value}

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the model was trained with."""
        return PreprocessConfig(
            image_size=self.image_size,
            mean=tuple(self.mean),  # type: ignore[arg-type]  # a list of 3 RGB values (mypy: any length)
            std=tuple(self.std),  # type: ignore[arg-type]  # a list of 3 RGB values (mypy: any length)
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )

    @classmethod
    def from_preprocess(cls, arch: str, class_names: list[str], cfg: PreprocessConfig, **extra: Any) -> CheckpointMeta:
        """Meta for `arch` and `class_names` with the preprocessing fields taken from `cfg`."""
        return cls(
            arch=arch,
            class_names=list(class_names),
            image_size=cfg.image_size,
            mean=list(cfg.mean),
            std=list(cfg.std),
            crop_pct=cfg.crop_pct,
            interpolation=cfg.interpolation,
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the sidecar's content, without the format marker)."""
        return asdict(self)


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a weights file: same name, `.json` suffix."""
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write `model`'s weights to `path` (.safetensors) and `meta` to its `.json` sidecar, each atomically.

    Each file goes to a temporary file in the same folder and is moved into place with `os.replace`, so a crash
    never leaves a half-written file under the final name. The sidecar is written after the weights.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoint files must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    header = {"arch": meta.arch, "num_classes": str(len(meta.class_names)), "format": "pt"}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))
    document = {"format": SIDECAR_FORMAT, **meta.to_dict()}
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
    _atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:  # flush to disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(target.parent)


def sync_directory(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so the renames in it survive a power cut (POSIX; a no-op where folders cannot be opened).
    `core.durable.sync_directory` is the same for core: the layering lets neither package import the other."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _unwrap(model: nn.Module) -> nn.Module:
    """The original module behind torch.compile / DDP wrappers (their state-dict keys carry prefixes)."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner) if isinstance(inner, nn.parallel.DistributedDataParallel) else inner


# Sidecar field -> accepted JSON types. bool is excluded from numbers explicitly in _check_types.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "class_names": (list,),
    "image_size": (int,),
    "mean": (list,),
    "std": (list,),
    "crop_pct": (int, float),
    "interpolation": (str,),
    "temperature": (int, float),
    "train_config": (dict,),
    "seed": (int,),
    "data_snapshot": (dict,),
    "library_versions": (dict,),
    "pretrained_source": (str,),
    "backbone_id": (str,),
    "feature_blocks": (list,),
    "feature_pooling": (str,),
}
_REQUIRED = ("arch", "class_names", "image_size", "mean", "std", "crop_pct", "interpolation")


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Read and validate the sidecar of checkpoint `path`; raises CheckpointInvalid naming the file and the fault."""
    side = sidecar_path(path)
    try:
        size = side.stat().st_size
    except OSError:
        raise CheckpointInvalid(f"{side}: checkpoint sidecar is missing") from None
    if size > MAX_SIDECAR_BYTES:
        raise CheckpointInvalid(
            f"{side}: sidecar is {size:,} bytes, more than the {MAX_SIDECAR_BYTES:,} a sidecar may be"
        )
    try:
        # NaN and Infinity are no JSON (json.dumps(allow_nan=False) never writes them): refused, not read as floats.
        document = json.loads(side.read_text(encoding="utf-8"), parse_constant=_no_constants)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, a 5,000-digit number...
        raise CheckpointInvalid(f"{side}: sidecar is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise CheckpointInvalid(f"{side}: sidecar must hold a JSON object, got {type(document).__name__}")
    missing = [k for k in _REQUIRED if k not in document]
    if missing:
        raise CheckpointInvalid(f"{side}: sidecar lacks required keys {', '.join(missing)}")
    known = {f.name for f in fields(CheckpointMeta)}
    values = {k: v for k, v in document.items() if k in known}
    _check_types(side, values)
    values["crop_pct"] = float(values["crop_pct"])
    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    return CheckpointMeta(**values)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_types(side: Path, values: dict[str, Any]) -> None:
    for key, value in values.items():
        expected = _FIELD_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise CheckpointInvalid(f"{side}: sidecar field {key!r} has type {type(value).__name__}")
    arch = values["arch"]
    if len(arch) > MAX_ARCH_NAME:
        raise CheckpointInvalid(f"{side}: arch is {len(arch):,} characters long, more than {MAX_ARCH_NAME}")
    if not timm.is_model(arch):  # before any network is built from it
        raise CheckpointInvalid(f"{side}: unknown architecture {arch!r}: not a timm model name")
    names = values["class_names"]
    if len(names) > MAX_CLASSES:
        raise CheckpointInvalid(f"{side}: {len(names):,} class names, more than the {MAX_CLASSES:,} a model may have")
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise CheckpointInvalid(f"{side}: class_names must be a non-empty list of distinct names")
    if (longest := max(len(n) for n in names)) > MAX_CLASS_NAME:
        raise CheckpointInvalid(f"{side}: a class name is {longest:,} characters long, more than {MAX_CLASS_NAME}")
    for key in ("interpolation", "pretrained_source", "backbone_id"):
        if len(values.get(key, "")) > MAX_TEXT_FIELD:
            raise CheckpointInvalid(f"{side}: {key} is longer than {MAX_TEXT_FIELD:,} characters")
    for key in ("mean", "std"):
        vec = values[key]
        if len(vec) != 3 or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vec):
            raise CheckpointInvalid(f"{side}: {key} must be three numbers")
    if not all(0 <= x <= 1 for x in values["mean"]) or not all(0 < x <= 1 for x in values["std"]):
        raise CheckpointInvalid(f"{side}: mean values must be in [0, 1] and std values positive, at most 1")
    if not MIN_IMAGE_SIZE <= values["image_size"] <= MAX_IMAGE_SIZE or not 0 < values["crop_pct"] <= 1.0:
        raise CheckpointInvalid(
            f"{side}: image_size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (got {values['image_size']:,}) and "
            f"crop_pct in (0, 1]"
        )
    # A crop_pct near 0 would resize every photo to an enormous square before the centre crop.
    if round(values["image_size"] / values["crop_pct"]) > 2 * MAX_IMAGE_SIZE:
        raise CheckpointInvalid(f"{side}: crop_pct {values['crop_pct']} resizes photos past {2 * MAX_IMAGE_SIZE} px")
    if "temperature" in values and not 0 < values["temperature"] < 1000:
        raise CheckpointInvalid(f"{side}: temperature must be positive")
    blocks = values.get("feature_blocks", [])
    if len(blocks) > MAX_BLOCK_INDEX or not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= MAX_BLOCK_INDEX for b in blocks
    ):
        raise CheckpointInvalid(f"{side}: feature_blocks must be block indices 0 to {MAX_BLOCK_INDEX}")
    pooling = values.get("feature_pooling", BlockPooling.MEAN.value)
    if pooling not in {p.value for p in BlockPooling}:
        known = ", ".join(p.value for p in BlockPooling)
        raise CheckpointInvalid(f"{side}: feature_pooling {pooling[:40]!r} is not one this version knows ({known})")


def load_checkpoint(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network of checkpoint `path` and load its weights strictly; returns (model in eval mode, meta).

    Never unpickles: weights are read with safetensors only. Raises CheckpointInvalid (message names the file)
    when the weights or sidecar are missing, not safetensors (e.g. a renamed pickle), truncated, or do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointInvalid(f"{path}: checkpoint weights file is missing")
    meta = read_meta(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for garbage and truncation
        raise CheckpointInvalid(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        model, _ = create_network(meta.arch, len(meta.class_names), pretrained="none")
        if (layout := meta.stage_layout) is not None:
            model = StagePooledNet(model, layout, len(meta.class_names))
    except ValueError as exc:
        raise CheckpointInvalid(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise CheckpointInvalid(
            f"{path}: weights do not fit {meta.arch} with {len(meta.class_names)} classes: {' '.join(first)}"
        ) from exc
    model.eval()
    check_finite(model, meta, where=path)
    return model.to(device), meta


def check_finite(model: nn.Module, meta: CheckpointMeta, *, where: str | os.PathLike[str]) -> None:
    """Refuse (CheckpointInvalid) a model with NaN or infinite weights, or whose logits on a fixed probe batch are not
    all finite (weights so large they overflow): served, it would show every photo with confidence "nan"."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointInvalid(f"{where}: weights {name} hold NaN or infinite values: the model is unusable")
    probe = torch.randn(PROBE_BATCH, 3, meta.image_size, meta.image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            logits = model(probe.to(next(model.parameters()).device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointInvalid(f"{where}: {meta.arch} does not run on {meta.image_size} px input: {first}") from exc
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointInvalid(f"{where}: the model's outputs are not finite numbers (NaN or infinity): unusable")
