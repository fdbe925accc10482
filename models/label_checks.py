"""Label checks over backbone features, as pure functions: out-of-sample probabilities, label issues, outliers.

- `cross_validated_probs`: K-fold heads on features, so every labelled image gets probabilities from a head that
  never saw its label (cleanlab's documented practice; a model's fit to its own training labels agrees with the
  wrong ones and would hide them).
- `find_label_problems`: cleanlab's label quality (self-confidence), the confident-learning estimate of how many
  labels are wrong (`num_label_issues`), which images those are, and the label each probably should have.
- `outlier_scores` / `nearest_neighbours`: cosine distances in feature space, brute force in chunks (fast enough up
  to ~100k images on a CPU, and on the job's GPU when it has one; no index to keep in step).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.errors import NotEnoughData
from models.training import TrainConfig, fit_linear_head

DEFAULT_FOLDS = 5
DEFAULT_NEIGHBOURS = 10
_CHUNK = 2048  # query rows per similarity block: 2048 x 10k float32 = 80 MB


@dataclass(frozen=True)
class CrossValidated:
    """Out-of-sample probabilities (N, C) for every row, the folds used and the head's L2 strength."""

    probs: np.ndarray
    folds: int
    l2: float


@dataclass(frozen=True)
class LabelProblems:
    """Per labelled row: label quality (0..1, low = likely wrong), label issue or not, the likeliest class and its
    probability. `estimated_issues` is confident learning's estimate of how many labels are wrong."""

    quality: np.ndarray
    issue: np.ndarray  # bool
    suggested: np.ndarray  # class index
    suggested_probability: np.ndarray
    estimated_issues: int


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fold_ids(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    with warnings.catch_warnings():  # a class smaller than K is spread as well as it can be; that is fine here
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))


def cross_validated_probs(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    config: TrainConfig | None = None,
    blocks: Sequence[int] | None = None,
) -> CrossValidated:
    """K-fold out-of-sample probabilities of a class-balanced linear head (`fit_linear_head`) on features.

    The L2 strength is chosen once, on the first fold, by the held-out rows' log loss over the head's grid, then
    used for every fold (K + grid fits instead of K x grid). With fewer rows than 2 per fold, K shrinks; raises
    NotEnoughData below 2 classes or 4 rows. A class absent from a fold's training rows gets ~0 probability there.
    """
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    if len(y) < 4 or len(np.unique(y)) < 2:
        raise NotEnoughData("checking labels needs at least 4 labelled images in at least 2 categories")
    k = max(2, min(int(folds), len(y) // 2))
    config = config or TrainConfig()
    probs = np.zeros((len(y), num_classes))
    chosen = config.head_l2
    for train_rows, held_rows in _fold_ids(y, k, seed):
        if len(np.unique(y[train_rows])) < 2:
            probs[held_rows] = np.bincount(y[train_rows], minlength=num_classes) / len(train_rows)
            continue
        fold_config = config if chosen is None else _with_l2(config, chosen)
        held_x, held_y = (x[held_rows], y[held_rows]) if chosen is None else (None, None)
        fit = fit_linear_head(
            x[train_rows], y[train_rows], held_x, held_y, num_classes=num_classes, config=fold_config, blocks=blocks
        )
        chosen = fit.l2
        logits = x[held_rows].astype(np.float64) @ fit.weight.double().numpy().T + fit.bias.double().numpy()
        probs[held_rows] = _softmax(logits)
    return CrossValidated(probs=probs, folds=k, l2=float(chosen if chosen is not None else 0.0))


def _with_l2(config: TrainConfig, l2: float) -> TrainConfig:
    return TrainConfig.from_dict({**config.to_dict(), "head_l2": l2})


def find_label_problems(labels: np.ndarray, probs: np.ndarray) -> LabelProblems:
    """cleanlab over out-of-sample probabilities: quality = self-confidence (the probability of the given label);
    issues = the `num_label_issues` estimate many lowest-quality rows (cleanlab's `low_self_confidence` filter).

    Self-confidence was chosen by measurement: on 2,000 Fashion-MNIST images (bundled backbone, 224 px) with 10% of
    labels flipped uniformly, its top-K held 72% flips against 59% for normalized margin and 67% for
    confidence-weighted entropy (the same K-fold probabilities, heads at L2 1e-3); 82% / 66% / 79% at L2 0.1.
    """
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        empty = np.zeros(0)
        return LabelProblems(empty, np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), empty, 0)
    quality = np.asarray(get_label_quality_scores(y, p, method="self_confidence"), dtype=np.float64)
    present = np.unique(y)
    if len(present) >= 2:
        # cleanlab needs every class column to have labels: score on the classes present, as a sub-problem.
        column = {c: i for i, c in enumerate(present)}
        sub_y = np.array([column[c] for c in y])
        sub_p = p[:, present] / np.clip(p[:, present].sum(axis=1, keepdims=True), 1e-12, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimated = int(num_label_issues(sub_y, sub_p))
            issue = np.asarray(find_label_issues(sub_y, sub_p, filter_by="low_self_confidence"), dtype=bool)
    else:
        estimated, issue = 0, np.zeros(len(y), dtype=bool)
    suggested = p.argmax(axis=1)
    return LabelProblems(
        quality=quality,
        issue=issue,
        suggested=suggested,
        suggested_probability=p[np.arange(len(y)), suggested],
        estimated_issues=estimated,
    )


class UnitRows:
    """Reference feature rows scaled to unit length, kept on `device`: scoring many batches of queries against the
    same references (every prediction batch of a refresh) normalises and uploads them once."""

    def __init__(self, references: np.ndarray, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.rows = _unit_tensor(references, self.device)

    def __len__(self) -> int:
        return len(self.rows)


def _unit_tensor(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(rows, dtype=np.float32)).to(device)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def outlier_scores(
    queries: np.ndarray,
    references: np.ndarray | UnitRows,
    *,
    k: int = DEFAULT_NEIGHBOURS,
    same_rows: bool = False,
) -> np.ndarray:
    """Mean cosine distance (0..2) of each query row to its k nearest reference rows: high = unlike anything labelled.

    With `same_rows` the queries ARE the references (row i is not its own neighbour). NaN when there are no
    references to compare with. Runs where the references are: plain rows on the CPU, `UnitRows` on their device (on
    a GPU, 60,000 queries against 20,000 references take a fraction of a second).
    """
    refs = references if isinstance(references, UnitRows) else UnitRows(references)
    available = len(refs) - (1 if same_rows else 0)
    if available < 1:
        return np.full(len(queries), np.nan)
    k = min(int(k), available)
    scores = np.empty(len(queries))
    with torch.inference_mode():
        for start in range(0, len(queries), _CHUNK):
            sims = _unit_tensor(queries[start : start + _CHUNK], refs.device) @ refs.rows.T
            if same_rows:
                rows = torch.arange(len(sims), device=refs.device)
                sims[rows, start + rows] = -torch.inf
            top = torch.topk(sims, k, dim=1).values
            scores[start : start + _CHUNK] = (1.0 - top.mean(dim=1)).cpu().numpy()
    return scores


def nearest_neighbours(query: np.ndarray, references: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference rows, cosine similarities) of the k rows most like `query` (one feature vector), most similar
    first. `references` may be a memory map: it is read `_CHUNK` rows at a time, never copied whole."""
    q = _unit_tensor(np.asarray(query).reshape(1, -1), torch.device("cpu"))[0].numpy()
    k = min(int(k), len(references))
    if k < 1:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    best_rows, best_sims = np.zeros(0, dtype=np.int64), np.zeros(0)
    for start in range(0, len(references), _CHUNK * 4):
        block = np.asarray(references[start : start + _CHUNK * 4], dtype=np.float32)
        sims = (block @ q) / np.clip(np.linalg.norm(block, axis=1), 1e-12, None)
        rows = np.concatenate([best_rows, np.arange(start, start + len(block))])
        sims = np.concatenate([best_sims, sims.astype(np.float64)])
        keep = np.argpartition(-sims, min(k, len(sims)) - 1)[:k]
        best_rows, best_sims = rows[keep], sims[keep]
    order = np.lexsort((best_rows, -best_sims))
    return best_rows[order].astype(np.int64), best_sims[order]
