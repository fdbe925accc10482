"""Quick retraining speed: fit_head on cached backbone features vs scikit-learn's LogisticRegression baseline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from models.training import TrainConfig, fit_head


def synthetic_features(n: int, dim: int, classes: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative pooled-feature-like vectors: class centroids plus noise, passed through ReLU like a ResNet's."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(0.0, 1.0, size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    feats = centroids[labels] + rng.normal(0.0, 4.0, size=(n, dim)).astype(np.float32)
    return np.maximum(feats, 0.0).astype(np.float32), labels.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # One draw split in two, so train and validation share the class centroids.
    n_val = max(args.n // 8, 10)
    feats, labels = synthetic_features(args.n + n_val, args.dim, args.classes, seed=0)
    x, y, xv, yv = feats[: args.n], labels[: args.n], feats[args.n :], labels[args.n :]

    results: dict[str, dict[str, float]] = {}
    for name, fit in (
        ("fit_head (L2 picked on val, 3 fits)", lambda: fit_head(x, y, xv, yv, num_classes=args.classes)),
        (
            "fit_head (fixed L2=1e-3)",
            lambda: fit_head(x, y, xv, yv, num_classes=args.classes, config=TrainConfig(head_l2=1e-3)),
        ),
    ):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            weight, bias = fit()
            times.append(time.perf_counter() - start)
        pred = (torch.from_numpy(xv) @ weight.T + bias).argmax(1).numpy()
        results[name] = {"seconds_median": float(np.median(times)), "val_accuracy": float((pred == yv).mean())}

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        baseline = LogisticRegression(C=1.0, max_iter=200, class_weight="balanced").fit(x, y)
        times.append(time.perf_counter() - start)
    results["sklearn LogisticRegression (lbfgs, balanced)"] = {
        "seconds_median": float(np.median(times)), "val_accuracy": float(baseline.score(xv, yv)),
    }  # fmt: skip
    print(json.dumps({"n": args.n, "dim": args.dim, "classes": args.classes, "threads": args.threads,
                      "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
