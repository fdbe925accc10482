"""CPU/GPU inference speed: a plain eager `model(x)` loop against the Classifier path, in the same process."""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from models.checkpoint import CheckpointMeta
from models.devices import pick_device
from models.factory import create_network, preprocessing_config
from models.inference import Classifier, fuse_conv_bn
from models.preprocess import pixels_to_tensor


def to_channels_last(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device` with channels-last weights (torch's type stubs omit `to`'s memory_format)."""
    moved: torch.nn.Module = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return moved


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(
    variants: dict[str, Callable[[np.ndarray], object]], pixels: np.ndarray, batch: int, rounds: int
) -> dict[str, list[float]]:
    """Images/s of each variant over `pixels` in batches, interleaved round by round so background load on a
    shared machine hits every variant alike (one warm-up pass each first)."""
    for run in variants.values():
        run(pixels[:batch])
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            for i in range(0, len(pixels), batch):
                run(pixels[i : i + batch])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rates[name].append(len(pixels) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--rss-only", action="store_true", help="only the peak RSS of one Classifier scoring a batch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rss_start = peak_rss_mib()

    model, _ = create_network(args.arch, 10, pretrained="none")
    model.eval()
    cfg = preprocessing_config(model, args.size)
    meta = CheckpointMeta.from_preprocess(args.arch, [f"c{i}" for i in range(10)], cfg)
    pixels = np.random.default_rng(0).integers(0, 256, size=(args.images, args.size, args.size, 3), dtype=np.uint8)

    if args.rss_only:
        classifier = Classifier(model, meta, device)
        del model  # the Classifier holds the only (fused) copy, as in the UI
        rss_loaded = peak_rss_mib()
        classifier.predict_pixels(pixels[: args.batch])
        print(json.dumps({
            "arch": args.arch, "image_size": args.size, "batch": args.batch, "device": str(device),
            "rss_after_imports_mib": round(rss_start, 1), "peak_rss_model_loaded_mib": round(rss_loaded, 1),
            "peak_rss_after_one_batch_mib": round(peak_rss_mib(), 1),
        }, indent=2))  # fmt: skip
        return

    baseline_model = copy.deepcopy(model).to(device)

    def baseline(batch: np.ndarray) -> object:
        with torch.no_grad():
            return baseline_model(pixels_to_tensor(batch, cfg, device, channels_last=False)).cpu()

    variants: dict[str, Callable[[np.ndarray], object]] = {"baseline: eager NCHW, no_grad": baseline}

    cl_model = to_channels_last(copy.deepcopy(model), device)

    def channels_last(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return cl_model(pixels_to_tensor(batch, cfg, device, channels_last=True)).cpu()

    variants["channels_last + inference_mode"] = channels_last

    fp32 = Classifier(model, meta, device, cpu_bf16=False)
    variants["Classifier fp32 (channels_last, inference_mode, conv-bn fused)"] = fp32.logits_pixels
    unfused = Classifier(model, meta, device, fuse=False)
    variants[f"Classifier without conv-bn fusion (autocast {unfused.autocast_dtype})"] = unfused.logits_pixels
    classifier = Classifier(model, meta, device)
    name = f"Classifier default (autocast {classifier.autocast_dtype})"
    variants[name] = classifier.logits_pixels

    if args.compile:
        fused = fuse_conv_bn(copy.deepcopy(model))
        compiled = torch.compile(to_channels_last(fused, device))

        def compiled_run(batch: np.ndarray) -> object:
            with torch.inference_mode():
                return compiled(pixels_to_tensor(batch, cfg, device, channels_last=True)).cpu()

        start = time.perf_counter()
        compiled_run(pixels[: args.batch])
        print(f"torch.compile warm-up: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        variants["torch.compile (inductor) + fused + channels_last"] = compiled_run

    rates = throughput(variants, pixels, args.batch, args.rounds)
    best = {k: max(v) for k, v in rates.items()}
    base = best["baseline: eager NCHW, no_grad"]
    sample = pixels[: args.batch]
    reference = torch.softmax(torch.as_tensor(baseline(sample)).float(), dim=1)
    deviation = torch.softmax(torch.from_numpy(classifier.logits_pixels(sample)), dim=1) - reference
    print(json.dumps({
        "arch": args.arch, "image_size": args.size, "images": args.images, "batch": args.batch,
        "rounds": args.rounds, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "images_per_s_best": {k: round(v, 1) for k, v in best.items()},
        "images_per_s_median": {k: round(float(np.median(v)), 1) for k, v in rates.items()},
        "speedup_vs_baseline_best": {k: round(v / base, 2) for k, v in best.items()},
        "default_vs_baseline_max_abs_prob_diff": round(float(deviation.abs().max()), 5),
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_model_mib": round(rss_start, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
