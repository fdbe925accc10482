"""Checkpoint format: round trip, atomic writes, and refusal of anything corrupt, foreign or pickled."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint, sidecar_path
from models.errors import CheckpointInvalid
from models.factory import PreprocessConfig
from tests.models.conftest import CLASSES


def _meta(cfg: PreprocessConfig, **extra: object) -> CheckpointMeta:
    return CheckpointMeta.from_preprocess(
        "resnet18", CLASSES, cfg, temperature=1.7, train_config={"epochs": 1}, seed=3,
        data_snapshot={"images": 12}, pretrained_source="none", backbone_id="abc", **extra,
    )  # fmt: skip


@pytest.fixture
def saved(tmp_path: Path, tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> Path:
    path = tmp_path / "ckpt" / "v1.safetensors"
    save_checkpoint(path, tiny_net.eval(), _meta(tiny_cfg))
    return path


def test_round_trip_gives_the_same_logits_and_meta(
    saved: Path, tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig
) -> None:
    model, meta = load_checkpoint(saved, device="cpu")
    assert meta == _meta(tiny_cfg)
    assert meta.library_versions["torch"] == torch.__version__
    assert meta.preprocess == tiny_cfg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_net.eval()(x))
    assert not model.training


def test_save_leaves_no_temporary_files(saved: Path) -> None:
    assert sorted(p.name for p in saved.parent.iterdir()) == ["v1.json", "v1.safetensors"]
    assert json.loads(sidecar_path(saved).read_text())["class_names"] == CLASSES


def test_save_refuses_other_suffixes(tmp_path: Path, tiny_net: torch.nn.Module, tiny_cfg: PreprocessConfig) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "model.pt", tiny_net, _meta(tiny_cfg))


def test_missing_files_are_named(saved: Path) -> None:
    with pytest.raises(CheckpointInvalid, match=r"nothing\.safetensors"):
        load_checkpoint(saved.parent / "nothing.safetensors")
    sidecar_path(saved).unlink()
    with pytest.raises(CheckpointInvalid, match=r"v1\.json.*missing"):
        load_checkpoint(saved)


def test_truncated_weights_are_refused(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointInvalid, match=r"v1\.safetensors"):
        load_checkpoint(saved)


def test_weights_of_another_shape_are_refused(saved: Path) -> None:
    document = json.loads(sidecar_path(saved).read_text())
    document["class_names"] = ["a", "b", "c", "d"]  # 4 classes, but the weights have a 3-row head
    sidecar_path(saved).write_text(json.dumps(document))
    with pytest.raises(CheckpointInvalid, match="do not fit resnet18 with 4 classes"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: json.dumps([1, 2]), "JSON object"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "arch"}), "lacks required keys arch"),
        (lambda d: json.dumps({**d, "image_size": "224"}), "'image_size' has type str"),
        (lambda d: json.dumps({**d, "class_names": ["a", "a", "b"]}), "distinct"),
        (lambda d: json.dumps({**d, "mean": [0.5, 0.5]}), "mean must be three numbers"),
        (lambda d: json.dumps({**d, "temperature": -1}), "temperature must be positive"),
        (lambda d: json.dumps({**d, "arch": "no_such_net"}), "unknown architecture"),
        # Bounds: each of these once reached the network or the preprocessing (a traceback, or gigabytes).
        (lambda d: json.dumps({**d, "image_size": 20000}), "image_size must be 16 to 1024 \\(got 20,000\\)"),
        (lambda d: json.dumps({**d, "crop_pct": 0.001}), "resizes photos past 2048 px"),
        (lambda d: json.dumps({**d, "class_names": [f"c{i}" for i in range(10_001)]}), "10,001 class names"),
        (lambda d: json.dumps({**d, "class_names": ["a", "b" * 300, "c"]}), "a class name is 300 characters long"),
        (lambda d: json.dumps({**d, "arch": "resnet" + "x" * 200}), "arch is 206 characters long"),
        (lambda d: json.dumps({**d, "interpolation": "x" * 2000}), "interpolation is longer than 1,000"),
        (lambda d: json.dumps({**d, "std": [0.2, 0.2, 1e300]}), "std values positive, at most 1"),
        (lambda d: json.dumps(d).replace('"temperature": 1.7', '"temperature": NaN'), "NaN is not a JSON number"),
        (lambda d: json.dumps(d).replace('"seed": 3', '"seed": ' + "9" * 5000), "not valid JSON.*digits"),
    ],
)
def test_bad_sidecars_are_refused(saved: Path, mutate: Callable[[dict[str, Any]], str], message: str) -> None:
    side = sidecar_path(saved)
    side.write_text(mutate(json.loads(side.read_text())))
    with pytest.raises(CheckpointInvalid, match=message) as info:
        load_checkpoint(saved)
    assert "v1." in str(info.value)


class _TouchOnUnpickle:
    """Unpickling this creates a marker file: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_weights_is_never_executed(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": _TouchOnUnpickle(marker)})
    saved.write_bytes(payload)
    with pytest.raises(CheckpointInvalid, match="not a readable safetensors file"):
        load_checkpoint(saved)
    assert not marker.exists()
    # The payload is live: unpickling it really would have created the marker.
    pickle.loads(payload)  # deliberately, from memory (never from disk), to prove the test can fail
    assert marker.exists()


def test_read_meta_alone_validates_without_weights(saved: Path, tiny_cfg: PreprocessConfig) -> None:
    saved.unlink()
    assert read_meta(saved).class_names == CLASSES
    assert np.isclose(read_meta(saved).temperature, 1.7)


def test_a_huge_sidecar_is_refused_before_it_is_parsed(saved: Path) -> None:
    import time

    side = sidecar_path(saved)
    document = json.loads(side.read_text())
    # A million class names (the tester's 3-6 GB before refusal) and a 10-million-character architecture name.
    many_classes = {**document, "class_names": [f"class {i}" for i in range(1_000_000)]}
    for huge in (many_classes, {**document, "arch": "r" * 10**7}):
        side.write_text(json.dumps(huge))
        started = time.perf_counter()
        with pytest.raises(CheckpointInvalid, match=r"v1\.json: sidecar is [\d,]+ bytes, more than the 4,194,304"):
            load_checkpoint(saved)
        assert time.perf_counter() - started < 0.5


def _with_weights(saved: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved))
    change(state)
    save_file(state, str(saved), metadata={"format": "pt"})


def test_nan_weights_are_refused(saved: Path) -> None:
    _with_weights(saved, lambda state: state["layer1.0.conv1.weight"].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(CheckpointInvalid, match=r"v1\.safetensors: weights layer1\.0\.conv1\.weight hold NaN"):
        load_checkpoint(saved)


def test_weights_whose_outputs_overflow_are_refused(saved: Path) -> None:
    _with_weights(saved, lambda state: state["fc.weight"].fill_(3e38))  # finite, but the logits are not
    with pytest.raises(CheckpointInvalid, match="outputs are not finite numbers"):
        load_checkpoint(saved)
