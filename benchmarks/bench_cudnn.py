"""Does cuDNN's kernel autotuning (`TrainConfig.cudnn_benchmark`) pay for itself in a GPU training job?

    python benchmarks/bench_cudnn.py --out results/cudnn.json      # on a machine with an NVIDIA GPU

With autotuning on, cuDNN times its candidate kernels the first time it meets each input shape (the training batch,
the last validation batch...) and keeps the fastest: seconds once per process, then faster steps. A small catalogue's
retrain is a few dozen steps, a large one's thousands. Each run is the product's `models.training.train_full` in a
fresh process (the autotune cache lives in the process), the GPU default's network and size (efficientnet_lite0,
128 px, batch 256, bf16), over a synthetic pixel cache: a small job (1,000 images, 10 epochs: 30 steps, the ragged
batch dropped) and one epoch of a large one (20,000 images: 78 steps), each with autotuning on and off. Reported:
the whole call's wall time (model on the GPU, every step, validation each epoch) and the steady images/s of the
epochs after the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import ROOT, library_versions, markdown_table, timed, write_json

COLUMNS = ("job", "autotune", "images", "epochs", "steps", "seconds", "first epoch s", "steady img/s")
JOBS = {"small": (1000, 10), "large": (20000, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jobs", default="small,large", help=f"Which of {', '.join(JOBS)} to run.")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the code.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process, print JSON
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, job: str, autotune: bool) -> dict[str, Any]:
    """One training call in this process; its figures."""
    import torch

    from benchmarks.bench_loader import make_pixel_cache
    from models.factory import create_network, preprocessing_config
    from models.training import TrainConfig, TrainData, TrainMode, train_full

    images, epochs = JOBS[job]
    if args.device == "cpu":  # a smoke run: the same code, tiny
        images, epochs = 64, 2
    model, _ = create_network(args.arch, 10, pretrained="none")
    cfg = preprocessing_config(model, args.image_size)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="prodcat-bench-cudnn-") as tmp:
        train = make_pixel_cache(Path(tmp) / "train", images, cfg.image_size)
        val = make_pixel_cache(Path(tmp) / "val", max(images // 10, 8), cfg.image_size)
        data = TrainData(train, rng.integers(0, 10, len(train)), val, rng.integers(0, 10, len(val)),
                         [f"class{i}" for i in range(10)])  # fmt: skip
        config = TrainConfig(arch=args.arch, image_size=cfg.image_size, mode=TrainMode.FULL, epochs=epochs,
                             batch_size=min(args.batch_size, images), device=args.device, patience=0,
                             cudnn_benchmark=autotune)  # fmt: skip
        torch.manual_seed(0)
        with timed() as clock:
            result = train_full(config, data, model=model, cfg=cfg)
    history = result.history
    steady = [h.images_per_s for h in history[1:] if h.images_per_s is not None]  # full mode: every epoch
    return {
        "job": job,
        "autotune": autotune,
        "images": images,
        "epochs": len(history),
        "steps": len(history) * max(1, images // config.batch_size),  # train_full drops each epoch's ragged batch
        "seconds": clock.seconds,
        "first epoch s": history[0].seconds if history else None,
        "steady img/s": float(np.mean(steady)) if steady else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        job, _, flag = args.one.partition(":")
        print(json.dumps(run_one(args, job, flag == "on")), flush=True)
        return 0
    rows = []
    for job in args.jobs.split(","):
        for flag in ("on", "off"):
            command = [sys.executable, str(Path(__file__).resolve()), "--one", f"{job}:{flag}",
                       "--arch", args.arch, "--image-size", str(args.image_size),
                       "--batch-size", str(args.batch_size), "--device", args.device]  # fmt: skip
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    write_json(args.out, {"benchmark": "bench_cudnn", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "versions": library_versions()})  # fmt: skip
    print()
    print(markdown_table(COLUMNS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
