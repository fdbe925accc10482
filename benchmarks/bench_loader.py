"""Is the training loader fast enough? Loader alone vs model step alone, in images/s, on CPU and CUDA.

    python benchmarks/bench_loader.py --arch resnet18 --image-size 64 --batch-size 128

Loader: pixel-cache memory map -> random batch indices -> gathered uint8 rows -> (pinned) tensor -> device ->
`models.preprocess.augment_batch` -> normalised float NCHW (`normalize_nchw`). Step: forward + backward +
optimizer on one fixed batch already on the device (bf16 autocast and channels_last on CUDA, as in training).
The loader must deliver at least twice the step's images/s, so a training epoch is never waiting on data; the
script exits 1 when it does not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import (
    device_name,
    library_versions,
    markdown_table,
    peak_rss_mb,
    rate,
    synchronize,
    timed,
    write_json,
)

REQUIRED_RATIO = 2.0
COLUMNS = ("device", "arch", "px", "batch", "loader img/s", "step img/s", "loader/step", "ok")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="timm architecture for the model step.")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4096, help="Rows in the synthetic pixel cache.")
    parser.add_argument("--steps", type=int, default=20, help="Timed batches per measurement.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed batches first (allocator, cudnn autotune).")
    parser.add_argument(
        "--devices", default="auto", help="Comma-separated: cpu, cuda, mps; auto = cpu plus cuda when present."
    )
    parser.add_argument("--no-check", action="store_true", help="Report only; do not exit 1 when below 2x.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args(argv)


def make_pixel_cache(folder: Path, count: int, size: int) -> np.ndarray:
    """A pixel cache on disk (the RowStore format the app uses) filled with synthetic product-like images."""
    from core.ml.pixel_cache import RowStore

    store = RowStore(folder, dtype="uint8", row_shape=(size, size, 3), meta={"benchmark": "loader"})
    rng = np.random.default_rng(0)
    keys = [f"{i:064x}" for i in range(count)]
    index: dict[str, int] = {}
    with store.locked():
        for start in range(0, count, 512):
            part = keys[start : start + 512]
            # A smooth colour field plus noise: realistic enough, and content does not change the cost.
            base = rng.integers(0, 256, size=(len(part), 1, 1, 3), dtype=np.uint8)
            noise = rng.integers(0, 48, size=(len(part), size, size, 3), dtype=np.uint8)
            index = store.append(index, part, base + noise)
    return store.view(len(index))


def loader_batches(pixels: np.ndarray, cfg: Any, device: Any, batch_size: int, seed: int = 0) -> Any:
    """Endless training batches from the cache, exactly the stages the training loop runs per batch."""
    import torch

    from models.preprocess import augment_batch, normalize_nchw

    rng = np.random.default_rng(seed)
    # augment_batch draws its random parameters on the CPU (same augmentation on any device).
    generator = torch.Generator().manual_seed(seed)
    on_gpu = device.type == "cuda"
    while True:
        # Sorted indices read the memory map front to back; the batch order is shuffled anyway.
        index = np.sort(rng.choice(len(pixels), size=batch_size, replace=False))
        batch = torch.from_numpy(np.ascontiguousarray(pixels[index]))
        if on_gpu:
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
        augmented = augment_batch(batch, generator=generator)
        yield normalize_nchw(augmented, cfg, channels_last=on_gpu)


def measure_loader(pixels: np.ndarray, cfg: Any, device: Any, args: argparse.Namespace) -> float:
    """Images/s of the loader alone."""
    batches = loader_batches(pixels, cfg, device, args.batch_size)
    for _ in range(args.warmup):
        next(batches)
    with timed(device) as clock:
        for _ in range(args.steps):
            out = next(batches)
        synchronize(device)
    assert out.dtype.is_floating_point and out.shape[1] == 3
    return rate(args.steps * args.batch_size, clock.seconds)


def measure_step(cfg: Any, device: Any, args: argparse.Namespace) -> float:
    """Images/s of forward + backward + optimizer step alone, on one fixed batch already on the device."""
    import torch

    from models.factory import create_network

    model, _ = create_network(args.arch, 10, pretrained="none")
    on_gpu = device.type == "cuda"
    model = model.to(device).train()
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    if on_gpu:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    with timed(device) as clock:
        for _ in range(args.steps):
            step()
    return rate(args.steps * args.batch_size, clock.seconds)


def chosen_devices(spec: str) -> list[Any]:
    import torch

    if spec == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    from models.devices import pick_device

    return [pick_device(name.strip()) for name in spec.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.factory import create_network, preprocessing_config

    model, _ = create_network(args.arch, 10, pretrained="none")
    cfg = preprocessing_config(model, args.image_size)
    del model
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prodcat-bench-loader-") as tmp:
        pixels = make_pixel_cache(Path(tmp) / "pixels", args.images, cfg.image_size)
        for device in chosen_devices(args.devices):
            loader = measure_loader(pixels, cfg, device, args)
            step = measure_step(cfg, device, args)
            ratio = loader / step if step else float("inf")
            rows.append(
                {
                    "device": device_name(device),
                    "arch": args.arch,
                    "px": cfg.image_size,
                    "batch": args.batch_size,
                    "loader img/s": loader,
                    "step img/s": step,
                    "loader/step": ratio,
                    "ok": "yes" if ratio >= REQUIRED_RATIO else "NO",
                }
            )
            print(f"{device}: loader {loader:,.0f} img/s, step {step:,.0f} img/s, ratio {ratio:.1f}", flush=True)
        del pixels
    write_json(
        args.out,
        {
            "benchmark": "bench_loader",
            "settings": vars(args) | {"out": str(args.out)},
            "rows": rows,
            "peak_rss_mb": peak_rss_mb(),
            "versions": library_versions(),
        },
    )
    print()
    print(markdown_table(COLUMNS, rows))
    if not args.no_check and any(row["ok"] != "yes" for row in rows):
        print(f"the loader delivers less than {REQUIRED_RATIO:g}x the model step's images/s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
