"""Fashion-MNIST demo data: read the official idx files and import them as labelled PNGs through normal ingest."""

from __future__ import annotations

import gzip
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from core.catalog.ingest import ImportResult, ProgressCallback, Upload, import_uploads
from core.db import Database, in_chunks
from core.errors import ProdcatError
from core.schema import Image

# The official class order of Fashion-MNIST (label value = position).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Debian's `dataset-fashion-mnist` package; PRODCAT_FASHION_MNIST_DIR points elsewhere (same four .gz files).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DEMO_LIMIT = 600
SplitName = Literal["train", "test"]
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# idx type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur in (Fashion-)MNIST.
_IDX_DTYPES: dict[int, type[np.generic] | np.dtype[Any]] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}


class DatasetUnavailable(ProdcatError):
    """Fashion-MNIST is neither installed locally nor downloadable."""


@dataclass
class FashionMNIST:
    """One official split: images (N,28,28) uint8 and labels (N,) uint8 in the official order."""

    split: SplitName
    images: np.ndarray
    labels: np.ndarray
    source: str  # where the files came from, shown to the user


@dataclass
class DemoImport:
    """What the demo import did: the ingest result plus per-category and per-app-split counts."""

    result: ImportResult
    chosen: int  # images selected from the dataset
    source: str
    per_category: dict[str, int] = field(default_factory=dict)
    per_split: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable lines for the command line."""
        lines = [
            f"Fashion-MNIST from {self.source}: {self.chosen} images chosen; {self.result.summary()}",
            "per category: " + ", ".join(f"{name} {count}" for name, count in self.per_category.items()),
            "app split (fixed per image by its hash): "
            + ", ".join(f"{name} {count}" for name, count in self.per_split.items()),
        ]
        lines += [f"refused {item.name}: {item.reason}" for item in self.result.refused[:20]]
        return "\n".join(lines)


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzip-compressed idx file (the MNIST format) into an array, without pickle."""
    raw = gzip.decompress(Path(path).read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def local_dir() -> Path:
    """Where the Debian-packaged files are expected (PRODCAT_FASHION_MNIST_DIR overrides)."""
    return Path(os.environ.get("PRODCAT_FASHION_MNIST_DIR", str(DEBIAN_DIR)))


def local_files_present(directory: Path | None = None) -> bool:
    """True when all four idx files are in `directory` (default: `local_dir()`)."""
    directory = directory or local_dir()
    return all(
        (directory / f"{prefix}-{kind}-ubyte.gz").is_file()
        for prefix in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )


def load_fashion_mnist(split: SplitName, *, download_root: Path | None = None) -> FashionMNIST:
    """The official split from the local idx files, else downloaded by torchvision into `download_root`."""
    directory = local_dir()
    prefix = _FILE_PREFIX[split]
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.is_file() and labels_path.is_file():
        try:
            images, labels = read_idx(images_path), read_idx(labels_path)
        except (OSError, ValueError) as exc:
            raise DatasetUnavailable(
                f"Fashion-MNIST files in {directory} are unreadable ({exc}); reinstall them"
            ) from exc
        source = str(directory)
    else:
        images, labels, source = _download(split, download_root)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DatasetUnavailable(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetUnavailable(f"Fashion-MNIST {split}: label {int(labels.max())} outside the 10 classes")
    return FashionMNIST(split=split, images=images, labels=labels, source=source)


def _download(split: SplitName, download_root: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """torchvision's download (needs the network). torchvision parses the raw idx files itself, no pickle."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    root = download_root or Path.home() / ".cache" / "prodcat" / "fashion-mnist"
    try:
        dataset = TorchvisionFashionMNIST(str(root), train=(split == "train"), download=True)
    except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError depending on what failed
        raise DatasetUnavailable(
            f"Fashion-MNIST is not in {local_dir()} and could not be downloaded ({exc}). "
            "Install Debian's `dataset-fashion-mnist` package, or set PRODCAT_FASHION_MNIST_DIR to a folder "
            "holding the four *-ubyte.gz files, or connect to the internet."
        ) from exc
    return dataset.data.numpy(), dataset.targets.numpy().astype(np.uint8), f"torchvision download in {root}"


def balanced_indices(labels: np.ndarray, limit: int | None, *, num_classes: int = 10) -> np.ndarray:
    """Indices of the first limit/num_classes images of each class (the remainder to the first classes).

    None keeps every image. The result is sorted, so images keep their official order.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 0:
        raise ValueError(f"limit must be positive, got {limit}")
    base, extra = divmod(limit, num_classes)
    chosen = [np.flatnonzero(labels == c)[: base + (1 if c < extra else 0)] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def encode_png(pixels: np.ndarray) -> bytes:
    """A real greyscale PNG file of one 28x28 image (what a user would upload)."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(pixels), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def file_name(split: SplitName, index: int) -> str:
    """`fmnist_train_00042.png`: the split and the official index, so an image can be traced back."""
    return f"fmnist_{split}_{index:05d}.png"


def make_uploads(data: FashionMNIST, indices: Sequence[int] | np.ndarray) -> tuple[list[Upload], dict[str, str]]:
    """PNG uploads for the chosen images and the file name -> category mapping that labels them."""
    uploads: list[Upload] = []
    labels: dict[str, str] = {}
    for index in indices:
        name = file_name(data.split, int(index))
        uploads.append(Upload(name=name, data=encode_png(data.images[index])))
        labels[name] = FASHION_MNIST_CLASSES[int(data.labels[index])]
    return uploads, labels


def splits_for(choice: str) -> list[SplitName]:
    """`train`, `test` or `both` as the list of official splits to read."""
    options: dict[str, list[SplitName]] = {"train": ["train"], "test": ["test"], "both": ["train", "test"]}
    if choice not in options:
        raise ValueError(f"split must be train, test or both, got {choice!r}")
    return options[choice]


def import_fashion_mnist(
    db: Database,
    *,
    limit: int | None = DEFAULT_DEMO_LIMIT,
    split: str = "train",
    actor: str,
    progress: ProgressCallback | None = None,
) -> DemoImport:
    """Import Fashion-MNIST images as labelled PNG uploads through `core.catalog.ingest.import_uploads`.

    `limit` caps the images taken from each chosen official split, balanced per class (None: all of them).
    Re-running imports nothing twice: ingest reports the same bytes as duplicates.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive number of images, got {limit}")
    uploads: list[Upload] = []
    labels: dict[str, str] = {}
    sources: list[str] = []
    for name in splits_for(split):
        data = load_fashion_mnist(name, download_root=db.settings.cache_dir / "fashion-mnist")
        sources.append(data.source)
        part_uploads, part_labels = make_uploads(data, balanced_indices(data.labels, limit))
        uploads += part_uploads
        labels.update(part_labels)
    result = import_uploads(db, uploads, labels=labels, actor=actor, source="demo:fashion-mnist", progress=progress)
    per_category = Counter(labels[item.name] for item in uploads)
    ids = [item.image_id for item in result.imported] + [item.image_id for item in result.duplicates]
    return DemoImport(
        result=result,
        chosen=len(uploads),
        source=", ".join(dict.fromkeys(sources)),
        per_category={c: per_category[c] for c in FASHION_MNIST_CLASSES if per_category[c]},
        per_split=_split_counts(db, ids),
    )


def _split_counts(db: Database, image_ids: Sequence[int]) -> dict[str, int]:
    """How the app's own hash split spread these images (train/val/test)."""
    counts: Counter[str] = Counter()
    ids = list(image_ids)
    with db.read() as session:
        for chunk in in_chunks(ids):
            counts.update(session.scalars(select(Image.split).where(Image.id.in_(chunk))))
    return {name: counts[name] for name in ("train", "val", "test") if counts[name]}
