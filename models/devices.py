"""Choosing the torch device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

_CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """The device to run on. "auto" picks CUDA, then MPS, then CPU; an explicit choice that is missing raises.

    "cuda:N" names one GPU by its index (a worker given the second GPU of a machine: `PRODCAT_DEVICE=cuda:1`).
    Raises ValueError naming the preference when it is unknown or the hardware is not there, so a misconfigured
    `PRODCAT_DEVICE=cuda` on a CPU machine (or `cuda:1` on a one-GPU machine) fails loudly instead of silently
    training for hours elsewhere.
    """
    choice = str(preference).strip().lower()  # a torch.device keeps its index: "cuda:1"
    if choice.startswith("cuda:"):
        return _cuda_by_index(str(preference), choice.removeprefix("cuda:"))
    if choice not in _CHOICES:
        raise ValueError(f"unknown device {preference!r}: use one of {', '.join(_CHOICES)} or cuda:N (a GPU index)")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available on this machine")
    if choice == "mps" and not _mps_available():
        raise ValueError("device 'mps' asked for, but Apple MPS is not available on this machine")
    return torch.device(choice)


def _cuda_by_index(name: str, index_text: str) -> torch.device:
    if not index_text.isdigit():
        raise ValueError(f"unknown device {name!r}: a GPU is named cuda:N with N its index (cuda:0, cuda:1...)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    index, count = int(index_text), torch.cuda.device_count()
    if index >= count:
        have = "1 CUDA GPU (cuda:0)" if count == 1 else f"{count} CUDA GPUs (cuda:0 to cuda:{count - 1})"
        raise ValueError(f"device {name!r} asked for, but this machine has {have}")
    return torch.device("cuda", index)


def pick_train_devices(spec: str) -> list[torch.device]:
    """The devices one full-mode training job runs on, one process each (PRODCAT_TRAIN_DEVICES).

    "cuda:0,cuda:1" names GPUs by index; "cpu,cpu" runs CPU processes (gloo: tests, debugging); a count "N" takes
    the first N CUDA GPUs and "all" every one there is. Raises ValueError naming the setting and the fault: a GPU
    that is not there, a GPU named twice (one process per GPU), CPU mixed with CUDA, a bare "cuda" in a list (which
    one?), or mps (torch.distributed has no backend for it).
    """
    text = str(spec).strip().lower().replace(" ", "")
    if text == "all" or text.isdigit():
        return _first_gpus(spec, None if text == "all" else int(text))
    names = [name for name in text.split(",") if name]
    if not names:
        raise ValueError(f"train devices {spec!r}: name devices (cuda:0,cuda:1 or cpu,cpu) or give a GPU count")
    for name in names:
        if name != "cpu" and not name.startswith("cuda:"):
            raise ValueError(f"train devices {spec!r}: {name!r} cannot train beside others: use cuda:N or cpu")
    try:
        devices = [pick_device(name) for name in names]
    except ValueError as exc:
        raise ValueError(f"train devices {spec!r}: {exc}") from None
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"train devices {spec!r}: all CPU or all CUDA GPUs, not a mix")
    gpus = [d.index for d in devices if d.type == "cuda"]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"train devices {spec!r}: a GPU is named twice; each training process needs its own GPU")
    return devices


def _first_gpus(spec: str, wanted: int | None) -> list[torch.device]:
    """cuda:0 to cuda:wanted-1 (every GPU when `wanted` is None), or ValueError saying what the machine has."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted is not None and wanted < 1:
        raise ValueError(f"train devices {spec!r}: a GPU count must be at least 1")
    if count == 0 or (wanted or 0) > count:
        have = f"{count} CUDA GPU{'' if count == 1 else 's'}" if count else "no CUDA GPU (cpu,cpu runs CPU processes)"
        raise ValueError(f"train devices {spec!r}: this machine has {have}")
    return [torch.device("cuda", i) for i in range(wanted or count)]


def describe_devices(devices: list[torch.device]) -> str:
    """`describe_device` of one device, or e.g. '2 x cuda (NVIDIA H100) (DDP)' for several training together."""
    if len(devices) == 1:
        return describe_device(devices[0])
    names = sorted({describe_device(d) if d.type == "cuda" else d.type for d in devices})
    return f"{len(devices)} x {', '.join(names)} (DDP)"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. 'cuda (NVIDIA H100)' or 'cpu (2 threads)', for progress displays."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
