"""A real `streamlit run` server on a free port, for the browser tests, the HTTP API tests and the benchmarks that
drive one: one definition of how it is started, how its health is awaited and how it is stopped."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class StreamlitServer:
    """A started server: `base` is its URL; `wait_until_healthy` returns once /_stcore/health answers "ok"."""

    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def wait_until_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.base}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"streamlit did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def streamlit_server(
    env: Mapping[str, str], log: Path, *, entry: str = "server.py", cwd: Path = ROOT, wait: bool = True
) -> Iterator[StreamlitServer]:
    """`streamlit run ENTRY` headless on a free port of 127.0.0.1 (no file watcher), its output in LOG; stopped on
    exit. With wait=False the caller does other work while it starts and calls `wait_until_healthy` itself."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", entry, "--server.port", str(port),
             "--server.headless", "true", "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
            cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = StreamlitServer(f"http://127.0.0.1:{port}", process, log)
    try:
        if wait:
            server.wait_until_healthy()
        yield server
    finally:
        server.stop()
