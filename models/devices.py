"""Choosing the torch device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

_CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """The device to run on. "auto" picks CUDA, then MPS, then CPU; an explicit choice that is missing raises.

    Raises ValueError naming the preference when it is unknown or the hardware is not there, so a misconfigured
    `PRODCAT_DEVICE=cuda` on a CPU machine fails loudly instead of silently training for hours on the CPU.
    """
    if isinstance(preference, torch.device):
        preference = preference.type
    choice = str(preference).lower()
    if choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} asked for, but CUDA is not available on this machine")
        return torch.device(choice)
    if choice not in _CHOICES:
        raise ValueError(f"unknown device {preference!r}: use one of {', '.join(_CHOICES)}")
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
