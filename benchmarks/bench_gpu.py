"""GPU throughput: resnet50 training and inference from the pixel cache, and JPEG decoding on GPU vs CPU.

    python benchmarks/bench_gpu.py --out results/gpu.json            # on a machine with an NVIDIA GPU
    python benchmarks/bench_gpu.py --compile --out results/gpu.json  # also torch.compile (compile time reported)
    python benchmarks/bench_gpu.py --cpu-smoke                       # tiny settings on CPU: checks the code runs
    python benchmarks/bench_gpu.py --devices all --out results/scaling.json    # multi-GPU scaling of full training
    python benchmarks/bench_gpu.py --devices cpu,cpu --cpu-smoke               # the same code path on 2 CPU processes

1. Training images/s end to end from the pixel cache (memory map -> pinned batch -> GPU -> augment_batch ->
   normalise -> forward/backward/AdamW), bf16 autocast, channels_last, cudnn.benchmark, optional torch.compile.
2. Inference images/s from the pixel cache through `models.inference.Classifier.predict_pixels` (the product path).
3. Classifying JPEG files from disk: torchvision.io.decode_jpeg on the GPU (nvJPEG, a list of files per call) vs
   decode_jpeg on the CPU vs PIL (what the app does for uploads), each followed by resize/crop and the model.

With `--devices` (a PRODCAT_TRAIN_DEVICES value: all, a GPU count, cuda:0,cuda:1...) it measures only how full-mode
training scales: the product's `train_full` on the first device, then `models.distributed.train_full_distributed`
(DDP, one process per GPU) on 2, 4, 8... of them and on all, each `--batch-size` images per device per step (weak
scaling), over a synthetic pixel cache. img/s is the mean of the epochs after the first (cuDNN autotuning and DDP's
first buckets fall in the first); seconds is the wall clock of the whole call, launch and validation included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.bench_loader import loader_batches, make_pixel_cache
from benchmarks.common import (
    device_name,
    library_versions,
    markdown_table,
    peak_gpu_mb,
    peak_rss_mb,
    rate,
    synchronize,
    timed,
    write_json,
)

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they still work and are what we measure.
warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
COLUMNS = ("measurement", "device", "arch", "px", "batch", "images", "seconds", "img/s", "notes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="Training batch size.")
    parser.add_argument("--infer-batch-size", type=int, default=512)
    parser.add_argument("--images", type=int, default=4096, help="Rows in the synthetic pixel cache.")
    parser.add_argument("--steps", type=int, default=40, help="Timed training steps.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed training steps first.")
    parser.add_argument("--compile", action="store_true", help="Also measure with torch.compile (and its time).")
    parser.add_argument("--jpegs", type=int, default=2000, help="JPEG files to classify from disk.")
    parser.add_argument("--jpeg-side", type=int, default=800, help="Side of the synthetic product photos.")
    parser.add_argument("--decode-batch", type=int, default=128, help="Files per GPU decode_jpeg call.")
    parser.add_argument("--cpu-smoke", action="store_true", help="Run every stage on CPU with tiny settings.")
    parser.add_argument(
        "--devices", help="Only measure full-training scaling over these devices (all, 2, cuda:0,cuda:1; cpu,cpu)."
    )
    parser.add_argument("--scaling-epochs", type=int, default=3, help="Epochs per scaling run (the first untimed).")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.arch, args.image_size, args.batch_size, args.infer_batch_size = "resnet18", 32, 8, 16
        args.images, args.steps, args.warmup, args.jpegs, args.jpeg_side, args.decode_batch = 64, 2, 1, 16, 96, 8
        args.batch_size, args.scaling_epochs = 4, 2
    return args


def _model(arch: str, device: Any, *, train: bool) -> Any:
    import torch

    from models.factory import create_network

    model, _ = create_network(arch, 10, pretrained="none")
    model = model.to(device).train(train)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def bench_training(pixels: np.ndarray, cfg: Any, device: Any, args: argparse.Namespace, *, compiled: bool) -> dict:
    """Training images/s from the cache; with `compiled`, the first step's time is the compile time."""
    import torch

    model = _model(args.arch, device, train=True)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    batches = loader_batches(pixels, cfg, device, args.batch_size)
    on_gpu = device.type == "cuda"

    def step() -> None:
        x = next(batches)
        y = torch.randint(0, 10, (x.shape[0],), device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with timed(device) as first:
        step()  # with torch.compile this step traces and compiles the graph
    for _ in range(max(args.warmup - 1, 0)):
        step()
    with timed(device) as clock:
        for _ in range(args.steps):
            step()
    return {
        "measurement": "train from cache" + (" (compiled)" if compiled else ""),
        "images": args.steps * args.batch_size,
        "seconds": clock.seconds,
        "img/s": rate(args.steps * args.batch_size, clock.seconds),
        "batch": args.batch_size,
        "first_step_s": first.seconds,
        "notes": f"first step {first.seconds:.1f} s" + (" incl. compile" if compiled else ""),
    }


def _classifier(model: Any, cfg: Any, device: Any) -> Any:
    """The product's inference wrapper (bf16 autocast on CUDA, conv-BN fused) around a network."""
    from models.checkpoint import CheckpointMeta
    from models.inference import Classifier

    meta = CheckpointMeta.from_preprocess("benchmark", [f"class{i}" for i in range(10)], cfg)
    return Classifier(model.eval(), meta, device)


def bench_inference(classifier: Any, pixels: np.ndarray, device: Any, args: argparse.Namespace) -> dict:
    """Images/s of Classifier.predict_pixels over the whole cache (one untimed warm-up batch first)."""
    classifier.predict_pixels(np.asarray(pixels[: args.infer_batch_size]), batch_size=args.infer_batch_size)
    with timed(device) as clock:
        probs = classifier.predict_pixels(pixels, batch_size=args.infer_batch_size)
    assert np.asarray(probs).shape == (len(pixels), 10)
    return {
        "measurement": "inference from cache",
        "images": len(pixels),
        "seconds": clock.seconds,
        "img/s": rate(len(pixels), clock.seconds),
        "batch": args.infer_batch_size,
        "notes": "Classifier.predict_pixels",
    }


def write_jpegs(folder: Path, count: int, side: int) -> list[Path]:
    """Synthetic product photos as JPEG files (quality 90, 4:2:0, like camera output)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    paths = []
    for i in range(count):
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        # A lit object on a pale background: gradients and a little noise, so files have realistic sizes.
        mask = ((xx - 0.5) ** 2 + (yy - 0.55) ** 2) < rng.uniform(0.05, 0.12)
        img = np.full((side, side, 3), 235.0, dtype=np.float32)
        img[mask] = colour * (0.6 + 0.4 * (1 - yy[mask, None]))
        img += rng.normal(0, 6, size=img.shape)
        path = folder / f"product_{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _resize_crop(image: Any, cfg: Any) -> Any:
    """CHW uint8 tensor -> model-sized CHW uint8: shorter side to S/crop_pct (antialiased), centre crop S."""
    import math

    import torch
    from torchvision.transforms.v2 import functional as tvf

    size = cfg.image_size
    resized = tvf.resize(image, [math.floor(size / cfg.crop_pct)], antialias=True)
    out = tvf.center_crop(resized, [size, size])
    assert isinstance(out, torch.Tensor)
    return out


def _normalise(batch: Any, cfg: Any, device: Any) -> Any:
    import torch

    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255
    out = (batch.to(device, non_blocking=True).float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else out


def bench_jpeg(paths: list[Path], model: Any, cfg: Any, device: Any, args: argparse.Namespace) -> list[dict]:
    """Decode (+resize/crop) and classify the files three ways; reports decode-only and end-to-end images/s."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    on_gpu = device.type == "cuda"

    @torch.inference_mode()
    def classify(batch: Any) -> Any:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            return model(_normalise(batch, cfg, device)).float().softmax(dim=1)

    def decode_gpu(chunk: list[Path]) -> Any:
        data = [read_file(str(p)) for p in chunk]  # bytes stay on the CPU; nvJPEG decodes on the device
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return torch.stack([_resize_crop(img, cfg) for img in images])

    def decode_cpu_torchvision(chunk: list[Path]) -> Any:
        images = [decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB, apply_exif_orientation=True) for p in chunk]
        return torch.stack([_resize_crop(img, cfg) for img in images])

    def decode_pil(chunk: list[Path]) -> Any:
        # The app's own path for uploads: PIL (JPEG draft at the target size), EXIF, RGB, resize + centre crop.
        from PIL import Image, ImageOps

        from models.preprocess import to_model_pixels

        rows = []
        for path in chunk:
            with Image.open(path) as im:
                im.draft("RGB", (cfg.image_size * 2, cfg.image_size * 2))
                rows.append(to_model_pixels(ImageOps.exif_transpose(im).convert("RGB"), cfg))
        return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)

    ways: list[tuple[str, Callable[[list[Path]], Any], str]] = [
        ("JPEG files, PIL decode (app path)", decode_pil, "cpu"),
        ("JPEG files, torchvision CPU decode", decode_cpu_torchvision, "cpu"),
    ]
    if on_gpu:
        ways.insert(0, ("JPEG files, nvJPEG GPU decode", decode_gpu, "cuda"))
    elif args.cpu_smoke:
        # Same batched list call as the GPU way, decoded on the CPU: checks that code path without a GPU.
        ways.insert(0, ("JPEG files, batched decode_jpeg list (smoke)", decode_gpu, "cpu"))
    chunk = args.decode_batch
    rows = []
    for name, decode, decode_on in ways:
        decode(paths[: min(chunk, len(paths))])  # warm-up: nvJPEG handles, cudnn algorithms, page cache
        with timed(device) as decode_clock:
            for start in range(0, len(paths), chunk):
                decoded = decode(paths[start : start + chunk])
        with timed(device) as total_clock:
            for start in range(0, len(paths), chunk):
                probs = classify(decode(paths[start : start + chunk]))
        assert decoded.shape[1:] == (3, cfg.image_size, cfg.image_size) and probs.shape[1] == 10
        rows.append(
            {
                "measurement": name,
                "images": len(paths),
                "seconds": total_clock.seconds,
                "img/s": rate(len(paths), total_clock.seconds),
                "batch": chunk,
                "decode_img_per_s": rate(len(paths), decode_clock.seconds),
                "notes": f"decode+resize alone {rate(len(paths), decode_clock.seconds):,.0f} img/s on {decode_on}; "
                f"{args.jpeg_side}px files",
            }
        )
    return rows


def bench_scaling(args: argparse.Namespace) -> list[dict]:
    """Full-mode training images/s on 1, 2, 4... and all of `args.devices`, `args.batch_size` images per device per
    step: `train_full` on one device, `train_full_distributed` (DDP) on several."""
    from statistics import mean

    import torch

    from models.devices import describe_devices, pick_train_devices
    from models.distributed import train_full_distributed
    from models.factory import create_network, preprocessing_config
    from models.training import TrainConfig, TrainData, TrainMode, train_full

    devices = pick_train_devices(args.devices)
    counts = sorted({k for k in (1, 2, 4, 8, 16) if k < len(devices)} | {len(devices)})
    network, _ = create_network(args.arch, 10, pretrained="none")
    cfg = preprocessing_config(network, args.image_size)
    del network
    steps_per_epoch = 8  # at the largest batch: enough steps for a steady rate
    images = max(args.images, args.batch_size * len(devices) * steps_per_epoch)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prodcat-bench-scaling-") as tmp:
        # Two whole cache files: the ranks map them again by name (a slice of one would be copied into every rank).
        train = make_pixel_cache(Path(tmp) / "train", images, cfg.image_size)
        val = make_pixel_cache(Path(tmp) / "val", min(images, 512), cfg.image_size)
        data = TrainData(train, rng.integers(0, 10, len(train)), val, rng.integers(0, 10, len(val)),
                         [f"class{i}" for i in range(10)])  # fmt: skip
        for count in counts:
            config = TrainConfig(arch=args.arch, image_size=cfg.image_size, mode=TrainMode.FULL,
                                 epochs=args.scaling_epochs, batch_size=args.batch_size * count, device=str(devices[0]),
                                 patience=0, compile=args.compile, eval_batch_size=args.infer_batch_size)  # fmt: skip
            torch.manual_seed(0)
            model, _ = create_network(args.arch, 10, pretrained="none")
            with timed() as clock:
                if count == 1:
                    result = train_full(config, data, model=model, cfg=cfg)
                else:
                    folder = Path(tmp) / f"ddp{count}"
                    result = train_full_distributed(
                        config, data, model=model, cfg=cfg, devices=devices[:count], folder=folder
                    )
            rates = [h.images_per_s for h in result.history if h.images_per_s is not None]  # full mode: every epoch
            steady = rates[1:] or rates
            speed = mean(steady)
            gain = speed / rows[0]["img/s"] if rows else 1.0
            rows.append(
                {
                    "measurement": f"full training on {count} device{'s' if count > 1 else ''}",
                    "device": describe_devices(devices[:count]),
                    "arch": args.arch,
                    "px": cfg.image_size,
                    "batch": config.batch_size,
                    "images": len(train) * len(result.history),
                    "seconds": clock.seconds,
                    "img/s": speed,
                    "speedup": gain,
                    "notes": f"x{gain:.2f} vs 1 device ({gain / count:.0%} of linear); "
                    f"{args.batch_size}/device/step; wall incl. launch",
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "bench_gpu.py measures GPU throughput and needs CUDA, which this machine does not have "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False).\n"
            "Run it on a machine with an NVIDIA GPU, or pass --cpu-smoke to check the code on CPU with tiny settings.",
            file=sys.stderr,
        )
        return 2
    if args.devices:
        scaling = bench_scaling(args)
        settings = vars(args) | {"out": str(args.out)}
        write_json(args.out, {"benchmark": "bench_gpu --devices", "settings": settings, "rows": scaling,
                              "peak_rss_mb": peak_rss_mb(), "versions": library_versions()})  # fmt: skip
        print()
        print(markdown_table(COLUMNS, scaling))
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from models.factory import create_network, preprocessing_config

    network, _ = create_network(args.arch, 10, pretrained="none")
    cfg = preprocessing_config(network, args.image_size)
    del network
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prodcat-bench-gpu-") as tmp:
        pixels = make_pixel_cache(Path(tmp) / "pixels", args.images, cfg.image_size)
        synchronize(device)
        rows.append(bench_training(pixels, cfg, device, args, compiled=False))
        print(rows[-1], flush=True)
        if args.compile:
            rows.append(bench_training(pixels, cfg, device, args, compiled=True))
            print(rows[-1], flush=True)
        model = _model(args.arch, device, train=False)
        rows.append(bench_inference(_classifier(model, cfg, device), pixels, device, args))
        print(rows[-1], flush=True)
        paths = write_jpegs(Path(tmp) / "jpegs", args.jpegs, args.jpeg_side)
        rows += bench_jpeg(paths, model.eval(), cfg, device, args)
        del pixels
    name = device_name(device)
    for row in rows:
        row.update({"device": name, "arch": args.arch, "px": cfg.image_size})
    write_json(
        args.out,
        {
            "benchmark": "bench_gpu",
            "settings": vars(args) | {"out": str(args.out)},
            "rows": rows,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(),
            "versions": library_versions(),
        },
    )
    print()
    print(markdown_table(COLUMNS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
