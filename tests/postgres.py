"""A throw-away PostgreSQL cluster for the tests: initdb into a temp dir, pg_ctl start on a unix socket, one fresh
database per test (copied from a migrated template), everything removed at the end of the session."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tests.servers import free_port

SUPERUSER = "prodcat"
TEMPLATE = "prodcat_template"


class PostgresUnavailable(RuntimeError):
    """The server binaries are not installed, or the cluster could not be started (the message says why)."""


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl are: PATH first, then Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@dataclass
class Cluster:
    """A running cluster reachable only through the unix socket in `socket_dir`."""

    bindir: Path
    root: Path
    port: int
    run_as: str | None  # the OS user the server runs as, when the tests run as root (initdb refuses root)

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of one database of this cluster."""
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(
            dbname=database, user=SUPERUSER, host=str(self.socket_dir), port=self.port, autocommit=True
        )

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--locale=C")  # fmt: skip
        options = (
            f"-c listen_addresses='' -c port={self.port} -c unix_socket_directories={self.socket_dir} "
            # Durability is not what these tests are about: a crash loses a throw-away cluster.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def create_database(self, *, template: str | None = TEMPLATE) -> str:
        """A new, empty database (a copy of the migrated template unless `template` is None); returns its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY file_copy").format(
            sql.Identifier(name), sql.Identifier(template or "template0")
        )
        with self.connect() as conn:
            conn.execute(statement)
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def start_cluster() -> Cluster:
    """initdb and start a cluster in a new temp dir (as `nobody` when running as root); raises PostgresUnavailable."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
            "install Debian's `postgresql` package"
        )
    # Under /tmp: the unix socket's path must stay short (about 100 bytes), and `nobody` must reach the folder.
    root = Path(tempfile.mkdtemp(prefix="prodcat-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    run_as = None
    if os.geteuid() == 0:
        run_as = "nobody"
        nobody = pwd.getpwnam(run_as)
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    cluster = Cluster(bindir=bindir, root=root, port=free_port(), run_as=run_as)
    try:
        cluster.start()
    except Exception:
        log = cluster.log_tail()
        shutil.rmtree(root, ignore_errors=True)
        if log:
            raise PostgresUnavailable(f"the PostgreSQL test cluster did not start; its log ends:\n{log}") from None
        raise
    return cluster
