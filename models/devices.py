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
