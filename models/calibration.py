"""Temperature scaling: one scalar fitted on validation logits so shown confidences match observed accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def fit_temperature(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, *, max_iter: int = 100
) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on `labels`, clamped to [0.05, 20].

    Optimised over log T (keeps T positive, better conditioned) with LBFGS. Returns 1.0 for empty input.
    """
    logits_t = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not isinstance(logits, torch.Tensor) else logits)
    labels_t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if logits_t.numel() == 0 or labels_t.numel() == 0:
        return 1.0
    logits_t = logits_t.detach().to("cpu", torch.float64)
    labels_t = labels_t.detach().to("cpu")
    if logits_t.ndim != 2 or logits_t.shape[0] != labels_t.shape[0]:
        raise ValueError(f"logits {tuple(logits_t.shape)} and labels {tuple(labels_t.shape)} do not match")
    if not torch.isfinite(logits_t).all():
        raise ValueError("logits contain NaN or infinity: cannot calibrate")

    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimiser.step(closure)
    value = float(log_t.detach().exp())
    if not math.isfinite(value):
        return 1.0
    return min(max(value, MIN_TEMPERATURE), MAX_TEMPERATURE)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T) as float32 numpy."""
    scaled = torch.as_tensor(np.asarray(logits, dtype=np.float32)) / float(temperature)
    return torch.softmax(scaled, dim=-1).numpy()
