"""API predict against the CLI: images/s and per-request latency (p50/p99) of `POST /api/v1/predict` with 1 and 32
images per request, against `python -m core.cli predict` on the same files, same model, same machine, same run.

    python benchmarks/bench_api.py --out results/api.json

In a fresh data directory: a quick-trained model (resnet18 at --image-size, random-init backbone: the weights'
values do not change the cost) is the active one; `streamlit run server.py` serves it (sign-in on, a viewer token);
--files photo-sized JPEGs are written to a folder. Then, interleaved round by round so background load hits both
alike:

- api: --api-requests requests of 1 image, and --api-requests / 4 requests of 32 images (after one warm-up request
  each, which loads the model in the server);
- cli: --cli-runs invocations of `core.cli predict` on 1 file and on 32 files, each a new process (import, model
  load, predict), which is what a system without the API runs per batch.

Latency is the wall clock of one request or one process; images/s is images over the summed latencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import ROOT, cpu_name, library_versions, markdown_table, write_json
from tests.servers import streamlit_server


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(latencies: list[float], per_request: int) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "images_per_s": per_request * len(latencies) / sum(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def prepare(data_dir: Path, image_size: int, files: int, photos: Path) -> tuple[str, list[Path]]:
    """A quick-trained active model, a viewer token, and `files` 600x600 JPEGs; returns (token, paths)."""
    from core import auth
    from core.db import close_all, open_database
    from core.ml.training import run_training
    from core.settings import Settings
    from tests.core.training_helpers import add_job, dataset, store_images
    from tests.imagegen import make_image

    settings = Settings(data_dir=data_dir, database_url=None, auth="builtin", pretrained="none", label_check_folds=0)
    db = open_database(settings)
    auth.add_account(db, "bench", auth.Role.ADMIN, None, actor="")
    _, token = auth.create_token(db, "bench-system", auth.Role.VIEWER, actor="bench")
    store_images(db, dataset(["Shoes", "Bags", "Hats"], train=4, val=2, test=2), size=96)
    params = {"image_size": image_size, "arch": "resnet18", "head_l2": 1e-3}
    run_training(db, add_job(db, params=params), on_progress=lambda _: None, should_stop=lambda: False)
    close_all()
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(files):
        path = photos / f"photo_{n:03d}.jpg"
        make_image(("Shoes", "Bags", "Hats")[n % 3], 5000 + n, size=600).save(path, quality=90)
        paths.append(path)
    return token, paths


@contextlib.contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    with streamlit_server(env, log, wait=False) as running:
        running.wait_until_healthy(timeout_s=120)
        yield running.base


def api_request(client: Any, base: str, token: str, paths: list[Path]) -> tuple[float, list[dict[str, Any]]]:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    start = time.perf_counter()
    response = client.post(f"{base}/api/v1/predict", headers={"Authorization": f"Bearer {token}"}, files=files)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()["results"]


def cli_run(env: dict[str, str], paths: list[Path]) -> tuple[float, list[dict[str, Any]]]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "core.cli", "predict", "--json", *map(str, paths)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - start, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--files", type=int, default=64, help="distinct JPEGs to cycle through")
    parser.add_argument("--api-requests", type=int, default=40, help="1-image requests (32-image: a quarter)")
    parser.add_argument("--cli-runs", type=int, default=4, help="CLI processes per batch size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import httpx

    work = Path(tempfile.mkdtemp(prefix="bench_api_"))
    data_dir = work / "data"
    token, paths = prepare(data_dir, args.image_size, args.files, work / "photos")
    env = {**os.environ, "PRODCAT_DATA_DIR": str(data_dir), "PRODCAT_AUTH": "builtin", "PRODCAT_PRETRAINED": "none"}
    env.pop("PRODCAT_DATABASE_URL", None)
    batches = {1: args.api_requests, 32: max(args.api_requests // 4, 2)}
    latencies: dict[tuple[str, int], list[float]] = {(k, n): [] for k in ("api", "cli") for n in batches}
    agree = True
    with serve(env, work / "server.log") as base, httpx.Client(timeout=300) as client:
        for size in batches:  # warm-up: the first request imports torch and loads the model in the server
            api_request(client, base, token, paths[:size])
        offset = 0

        def take(size: int) -> list[Path]:
            nonlocal offset
            chosen = [paths[(offset + i) % len(paths)] for i in range(size)]
            offset += size
            return chosen

        for round_ in range(args.cli_runs):
            for size, requests in batches.items():
                share = requests // args.cli_runs + (1 if round_ < requests % args.cli_runs else 0)
                for _ in range(share):
                    elapsed, _ = api_request(client, base, token, take(size))
                    latencies[("api", size)].append(elapsed)
                chosen = take(size)
                elapsed, by_cli = cli_run(env, chosen)
                latencies[("cli", size)].append(elapsed)
                _, by_api = api_request(client, base, token, chosen)  # same files: the same answers
                agree &= [r["category"] for r in by_api] == [r["category"] for r in by_cli]
                agree &= all(abs(a["confidence"] - c["confidence"]) < 6e-5 for a, c in zip(by_api, by_cli, strict=True))
            print(f"round {round_ + 1}/{args.cli_runs} done", file=sys.stderr)

    rows = []
    for size in batches:
        api, cli = summary(latencies[("api", size)], size), summary(latencies[("cli", size)], size)
        rows.append(
            {
                "images/request": size,
                "api requests": api["requests"],
                "api images/s": api["images_per_s"],
                "api p50 ms": api["p50_ms"],
                "api p99 ms": api["p99_ms"],
                "cli runs": cli["requests"],
                "cli images/s": cli["images_per_s"],
                "cli p50 ms": cli["p50_ms"],
                "cli p99 ms": cli["p99_ms"],
                "throughput api/cli": api["images_per_s"] / cli["images_per_s"],
                "p50 cli/api": cli["p50_ms"] / api["p50_ms"],
            }
        )
    print(markdown_table(list(rows[0]), rows))
    print(f"\npredictions equal (category, confidence within 6e-5): {agree}")
    load = os.getloadavg()
    settings = {
        "arch": "resnet18",
        "image_size": args.image_size,
        "photos": f"{args.files} JPEGs, 600x600, quality 90",
        "cpu": cpu_name(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        **library_versions(),
    }
    print(json.dumps(settings))
    write_json(args.out, {"settings": settings, "rows": rows, "predictions_equal": agree, "latencies_s": {
        f"{kind}-{size}": values for (kind, size), values in latencies.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
