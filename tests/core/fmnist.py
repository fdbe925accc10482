"""Fashion-MNIST for tests: the installed files (skipped locally when absent, required in CI) and a catalogue that
retrains from the bundled backbone at 64 px on the CPU, with no hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core import db as core_db
from core.db import Database
from core.settings import get_settings

if TYPE_CHECKING:
    from core.catalog.demo import FashionMNIST


def fashion_mnist() -> tuple[FashionMNIST, FashionMNIST]:
    from core.catalog.demo import load_fashion_mnist, local_dir, local_files_present

    if not local_files_present():
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST missing from {local_dir()}: .ci/run must install dataset-fashion-mnist")
        pytest.skip(f"Fashion-MNIST not installed in {local_dir()} (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist("train"), load_fashion_mnist("test")


def open_catalogue(data_dir: Path, monkeypatch: pytest.MonkeyPatch, pretrained: str) -> Database:
    core_db.close_all()
    monkeypatch.setenv("PRODCAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PRODCAT_PRETRAINED", pretrained)
    monkeypatch.setenv("PRODCAT_IMAGE_SIZE", "64")
    monkeypatch.setenv("PRODCAT_DEVICE", "cpu")
    monkeypatch.setenv("PRODCAT_AUTH", "none")  # one test process acting alone, as the data_dir fixture sets it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # auto must not find hub weights: the bundled backbone is the point
    monkeypatch.setattr("models.pretrained.hub_cached", lambda arch: False)
    get_settings.cache_clear()
    return core_db.open_database(get_settings())
