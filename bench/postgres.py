"""A throwaway PostgreSQL cluster on loopback, for the benchmarks and the tests that need a
real server: ``initdb`` into a temporary folder, started on a free port, stopped and removed
at exit. As root it runs as the ``postgres`` system user (PostgreSQL refuses root), as
``infra/services.sh`` does; it trusts connections from 127.0.0.1 and listens nowhere else.

    with throwaway_postgres() as cluster:
        url = cluster.create_database("optuna")
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"


def pg_bin() -> Path | None:
    """The folder of the server's binaries: ``EDGETUNE_PG_BIN``, else ``initdb`` on the
    PATH, else the newest ``/usr/lib/postgresql/*/bin``; None when none has ``initdb``."""
    candidates = [os.environ.get("EDGETUNE_PG_BIN", "")]
    candidates.append(os.path.dirname(os.path.realpath(shutil.which("initdb") or "")))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for folder in candidates:
        if folder and os.access(os.path.join(folder, "initdb"), os.X_OK):
            return Path(folder)
    return None


def _version(folder: str) -> tuple[int, ...]:
    name = Path(folder).parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def unavailable() -> str | None:
    """Why no cluster can start here (for a skip), or None."""
    if pg_bin() is None:
        return "PostgreSQL server binaries (initdb) not installed; set EDGETUNE_PG_BIN"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root without a 'postgres' system user"
    return None


@dataclass
class Cluster:
    """A running cluster: its binaries, data folder and port."""

    bin: Path
    data: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres"
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def server_version(self) -> str:
        done = _run([str(self.bin / "postgres"), "--version"])
        return done.stdout.split()[2]  # postgres (PostgreSQL) 15.18 …

    def restart(self) -> None:
        """Restart the server as an operator would (``pg_ctl restart -m fast``): every
        connection is dropped."""
        self._ctl("restart", "-m", "fast", "-l", str(self.data.parent / "postgres.log"))

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")

    def _ctl(self, *args: str) -> None:
        _run([str(self.bin / "pg_ctl"), *args, "-D", str(self.data), "-w", "-t", "60"])


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SUPERUSER, "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        _as_server_user(command), cwd="/", capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(command[0]).name} failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    return done


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def throwaway_postgres() -> Iterator[Cluster]:
    """A new cluster, removed at exit; raises RuntimeError with what failed (see
    ``unavailable`` for a skip reason before trying)."""
    why = unavailable()
    if why is not None:
        raise RuntimeError(f"cannot start a throwaway PostgreSQL: {why}")
    folder = Path(tempfile.mkdtemp(prefix="edgetune-pg-"))
    if os.geteuid() == 0:  # the server's user must own its folder
        os.chown(folder, pwd.getpwnam(SUPERUSER).pw_uid, -1)
    bin_dir = pg_bin()
    assert bin_dir is not None
    cluster = Cluster(bin_dir, folder / "data", _free_port())
    try:
        _run([str(bin_dir / "initdb"), "-D", str(cluster.data), "-U", SUPERUSER, "-A", "trust",
              "-E", "UTF8", "--locale=C"])  # fmt: skip
        with (cluster.data / "postgresql.conf").open("a") as conf:  # root may write it
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {cluster.port}\n"
                "unix_socket_directories = ''\n"
            )
        cluster._ctl("start", "-l", str(folder / "postgres.log"))
        yield cluster
    finally:
        try:
            if (cluster.data / "postmaster.pid").exists():
                cluster.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
