"""infra/services.sh and infra/workers.sh against real PostgreSQL, Prefect and MLflow servers.

One set of services for the module (free ports, private state dir, the venv of this
interpreter). The tests run in file order: the last one brings everything down; the
fixture stops whatever is left even when an assertion fails.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.storage import JournalStudyStorage, open_storage


def integration(test):
    """Marks a test that runs the real services."""
    return pytest.mark.integration(pytest.mark.slow(test))


REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "infra" / "services.sh"
WORKERS = REPO / "infra" / "workers.sh"
POOLS = ("controller", "gpu", "compile", "edge")
DATABASES = ("optuna", "prefect", "mlflow")
# The caller's own settings must not leak into the services under test.
INHERITED_SETTINGS = {
    "EDGETUNE_DB_PASSWORD",
    "EDGETUNE_ARTIFACTS",
    "EDGETUNE_WORKER_POOLS",
    "EDGETUNE_GPU_DEVICES",
    "EDGETUNE_GPU_SLOTS_PER_DEVICE",
    "EDGETUNE_GPU_WORKERS",
    "CUDA_VISIBLE_DEVICES",
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "EDGETUNE_STORAGE",
}


def _postgres_available() -> str | None:
    """Why these tests cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "the infra scripts target Linux"
    if shutil.which("setsid") is None or shutil.which("ps") is None:
        return "setsid/ps (util-linux, procps) not installed"
    candidates = [
        os.environ.get("EDGETUNE_PG_BIN", ""),
        os.path.dirname(shutil.which("initdb") or ""),
    ]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not any(d and os.access(os.path.join(d, "initdb"), os.X_OK) for d in candidates):
        return "PostgreSQL server binaries (initdb) not installed"
    if os.geteuid() == 0:
        try:
            subprocess.run(["id", "-u", "postgres"], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            return "running as root without a 'postgres' system user"
    venv_bin = Path(sys.executable).parent
    if not all((venv_bin / exe).exists() for exe in ("prefect", "mlflow")):
        return f"prefect/mlflow executables not in {venv_bin}"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(Path(stat).parent.name))
    return members


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def _http_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


@dataclass
class Services:
    state: Path
    env: dict[str, str]
    pg_port: int
    prefect_port: int
    mlflow_port: int

    def run(
        self, script: Path, command: str, timeout: float = 180, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script), command],
            env={**self.env, **extra},
            cwd=self.state.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def password(self) -> str:
        return (self.state / "db-password").read_text().strip()

    def connect(self, database: str):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.pg_port,
            user="edgetune",
            password=self.password,
            dbname=database,
            connect_timeout=5,
        )


def _force_stop(state: Path) -> None:
    """Last resort after a failed `down`: SIGKILL every process group recorded in the state."""
    for pidfile in [*state.glob("*.pid"), *state.glob("workers/*.pid")]:
        with contextlib.suppress(ValueError, OSError):
            os.killpg(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    postmaster = state / "pg" / "postmaster.pid"
    with contextlib.suppress(ValueError, OSError, IndexError):
        os.kill(int(postmaster.read_text().split()[0]), signal.SIGKILL)


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    if reason := _postgres_available():
        pytest.skip(reason)
    # Short path (the PostgreSQL unix socket lives inside) the postgres user can traverse.
    state = Path(
        tempfile.mkdtemp(prefix="edgetune-infra-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    pg_port, prefect_port, mlflow_port = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_SETTINGS}
    env.update(
        EDGETUNE_STATE_DIR=str(state / "services"),
        EDGETUNE_PG_PORT=str(pg_port),
        EDGETUNE_PREFECT_PORT=str(prefect_port),
        EDGETUNE_MLFLOW_PORT=str(mlflow_port),
        EDGETUNE_VENV=str(Path(sys.executable).parent.parent),
        EDGETUNE_WORKER_HOST="test",
    )
    svc = Services(state / "services", env, pg_port, prefect_port, mlflow_port)
    try:
        up = svc.run(SERVICES, "up")
        assert up.returncode == 0, f"services.sh up failed:\n{up.stderr}"
        yield svc
    finally:
        downs = [svc.run(WORKERS, "down", timeout=90), svc.run(SERVICES, "down", timeout=120)]
        if any(d.returncode != 0 for d in downs):
            _force_stop(svc.state)
        shutil.rmtree(state, ignore_errors=True)


@integration
def test_databases_exist_and_the_role_connects_to_each(services: Services) -> None:
    password = services.password
    assert len(password) >= 32
    assert (services.state / "db-password").stat().st_mode & 0o777 == 0o600
    for database in DATABASES:
        with contextlib.closing(services.connect(database)) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT current_database(), current_user, pg_get_userbyid(datdba)"
                " FROM pg_database WHERE datname = current_database()"
            )
            assert cur.fetchone() == (database, "edgetune", "edgetune")
    # Prefect migrated its own database at start, and only that one.
    with contextlib.closing(services.connect("prefect")) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {row[0] for row in cur.fetchall()}
    assert {"flow_run", "work_pool", "deployment", "alembic_version"} <= tables
    with contextlib.closing(services.connect("optuna")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert cur.fetchone() == (0,)
    # Everything listens on loopback only.
    pg_conf = (services.state / "pg" / "edgetune.conf").read_text()
    assert "listen_addresses = '127.0.0.1'" in pg_conf


@integration
def test_prefect_and_mlflow_answer_and_store(services: Services, tmp_path: Path) -> None:
    assert _http_json(f"http://127.0.0.1:{services.prefect_port}/api/health") is True
    with urllib.request.urlopen(
        f"http://127.0.0.1:{services.mlflow_port}/health", timeout=10
    ) as resp:
        assert resp.status == 200

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{services.mlflow_port}")
    experiment_id = client.create_experiment("infra-test")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "augrc", 0.125)
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello from the test\n")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)

    fetched = client.get_run(run.info.run_id)
    assert fetched.data.metrics == {"augrc": 0.125}
    assert fetched.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
    assert Path(local).read_text() == "hello from the test\n"
    # Stored by the server in the state dir's artifact store, not by the client.
    stored = list((services.state / "mlartifacts").rglob("note.txt"))
    assert len(stored) == 1
    # The experiment lives in the mlflow database, not in optuna's.
    with contextlib.closing(services.connect("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(experiment_id),))
        assert cur.fetchone() == ("infra-test",)


@integration
def test_status_env_and_a_second_up_is_a_no_op(services: Services) -> None:
    status = services.run(SERVICES, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["postgres", "up"],
        ["prefect", "up"],
        ["mlflow", "up"],
    ]

    env = services.run(SERVICES, "env")
    assert env.returncode == 0, env.stderr
    assert env.stdout.splitlines() == [
        f"export PREFECT_API_URL='http://127.0.0.1:{services.prefect_port}/api'",
        f"export MLFLOW_TRACKING_URI='http://127.0.0.1:{services.mlflow_port}'",
        f"export EDGETUNE_STORAGE='journal+postgresql://edgetune:{services.password}@127.0.0.1:{services.pg_port}/optuna'",
    ]
    assert (services.state / "env").read_text() == env.stdout
    assert (services.state / "env").stat().st_mode & 0o777 == 0o600
    # The URLs are usable as they are: the study storage opens the journal in `optuna`.
    storage = env.stdout.splitlines()[2].split("'")[1]
    opened = open_storage(storage)
    assert isinstance(opened, JournalStudyStorage)
    with opened._backend._connection().cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute("SELECT current_database(), to_regclass('optuna_journal') IS NOT NULL")
        assert cursor.fetchone() == ("optuna", True)

    pids = {name: (services.state / f"{name}.pid").read_text() for name in ("prefect", "mlflow")}
    started = time.monotonic()
    again = services.run(SERVICES, "up")
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 10
    for name in ("postgres", "prefect", "mlflow"):
        assert f"{name} already running" in again.stderr
    assert {name: (services.state / f"{name}.pid").read_text() for name in pids} == pids
    # The password appears in no log line of `up`.
    assert services.password not in status.stdout + status.stderr + again.stderr


@integration
def test_workers_come_online_in_their_pools_and_stop(services: Services) -> None:
    api = f"http://127.0.0.1:{services.prefect_port}/api"
    # Before the pools exist, a stage worker refuses to start (it would create a pool
    # without its limit) and up says why, stopping what it started.
    early = services.run(WORKERS, "up", EDGETUNE_WORKER_POOLS="edge")
    assert early.returncode != 0
    assert (
        "work pool 'edge' does not exist; create the pools with `edgetune deploy`" in early.stderr
    )
    assert not list((services.state / "workers").glob("*.pid"))
    deploy = subprocess.run(
        [str(Path(sys.executable).parent / "edgetune"), "deploy"],
        env={**services.env, "PREFECT_API_URL": api}, capture_output=True, text=True,
        timeout=300, cwd=services.state.parent,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr
    up = services.run(WORKERS, "up", EDGETUNE_GPU_DEVICES="5,7")
    try:
        assert up.returncode == 0, up.stderr
        pidfiles = sorted((services.state / "workers").glob("*.pid"))
        assert [p.stem for p in pidfiles] == [
            "compile-1",
            "controller-1",
            "edge-1",
            "gpu-1",
            "gpu-2",
        ]
        pids = [int(p.read_text()) for p in pidfiles]
        assert all(_pid_alive(pid) for pid in pids)
        polls = {"controller": None, "gpu": b"1", "compile": b"0.25", "edge": b"0.25"}
        for pid, pidfile in zip(pids, pidfiles, strict=True):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            pool = pidfile.stem.rsplit("-", 1)[0]
            if pool == "controller":  # studies: Prefect's process worker, polling every 1 s
                assert command[2:5] == [b"worker", b"start", b"--pool"], command
                assert b"--limit" not in command
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                assert b"PREFECT_WORKER_QUERY_SECONDS=1" in environ
                continue
            # a stage pool: edgetune's stage worker, one run at a time per slot, a short poll
            assert Path(command[1].decode()).name == "edgetune" and command[2] == b"worker"
            assert command[command.index(b"--pool") + 1] == pool.encode()
            assert command[command.index(b"--limit") + 1] == b"1"
            assert command[command.index(b"--poll") + 1] == polls[pool], command
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            pinned = [v for v in environ if v.startswith((b"CUDA_VISIBLE", b"EDGETUNE_GPU_SLOTS"))]
            gpu = {"gpu-1": [b"CUDA_VISIBLE_DEVICES=5"], "gpu-2": [b"CUDA_VISIBLE_DEVICES=7"]}
            slots = [b"EDGETUNE_GPU_SLOTS_PER_DEVICE=1"] if pool == "gpu" else []
            assert sorted(pinned) == [*gpu.get(pidfile.stem, []), *slots], pinned

        def online(pool: str) -> list[str]:
            workers = _http_json(f"{api}/work_pools/{pool}/workers/filter", {})
            assert isinstance(workers, list)
            return sorted(w["name"] for w in workers if w["status"] == "ONLINE")

        expected = {"controller": 1, "gpu": 2, "compile": 1, "edge": 1}
        _wait(lambda: all(len(online(p)) == n for p, n in expected.items()), 60, "workers ONLINE")
        pools = {p["name"]: p["type"] for p in _http_json(f"{api}/work_pools/filter", {})}  # type: ignore[union-attr]
        assert {name: pools.get(name) for name in POOLS} == dict.fromkeys(POOLS, "process")
        assert online("gpu") == ["gpu-1-test", "gpu-2-test"]

        status = services.run(WORKERS, "status", EDGETUNE_GPU_DEVICES="5,7")
        assert status.returncode == 0, status.stdout
        assert services.run(WORKERS, "up", EDGETUNE_GPU_DEVICES="5,7").returncode == 0
        assert [int(p.read_text()) for p in pidfiles] == pids
    finally:
        down = services.run(WORKERS, "down", timeout=90)
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if _group_members(pid)]
    assert not list((services.state / "workers").glob("*.pid"))
    assert services.run(WORKERS, "status").returncode != 0
    assert services.run(WORKERS, "down").returncode == 0


@integration
def test_down_stops_everything(services: Services) -> None:
    groups = {
        name: int((services.state / f"{name}.pid").read_text()) for name in ("prefect", "mlflow")
    }
    postmaster = int((services.state / "pg" / "postmaster.pid").read_text().split()[0])
    assert all(_group_members(pgid) for pgid in groups.values()) and _pid_alive(postmaster)

    down = services.run(SERVICES, "down", timeout=120)
    assert down.returncode == 0, down.stderr

    assert {name: _group_members(pgid) for name, pgid in groups.items()} == {
        "prefect": [],
        "mlflow": [],
    }
    assert not _pid_alive(postmaster)
    assert not (services.state / "pg" / "postmaster.pid").exists()
    for port in (services.pg_port, services.prefect_port, services.mlflow_port):
        assert not _port_open(port), f"port {port} still open"
    status = services.run(SERVICES, "status")
    assert status.returncode != 0
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["postgres", "down"],
        ["prefect", "down"],
        ["mlflow", "down"],
    ]
    assert services.run(SERVICES, "down").returncode == 0


# ---------------------------------------------------------------- without services


@pytest.mark.parametrize("script", [SERVICES, WORKERS])
def test_scripts_refuse_bad_arguments_with_a_usage_line(script: Path, tmp_path: Path) -> None:
    for args in ([], ["start"], ["up", "extra"]):
        result = subprocess.run(
            ["bash", str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2
        assert result.stderr.startswith(f"usage: infra/{script.name} up|down|")
    assert not list(tmp_path.iterdir())


def test_gpu_workers_are_one_per_slot_each_pinned_to_its_gpu(tmp_path: Path) -> None:
    def status(**settings: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGETUNE_GPU_")}
        env |= {"EDGETUNE_STATE_DIR": str(tmp_path / "state"), "EDGETUNE_WORKER_POOLS": "gpu"}
        return subprocess.run(
            ["bash", str(WORKERS), "status"], env={**env, **settings}, cwd=tmp_path,
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def pins(result: subprocess.CompletedProcess[str]) -> list[str]:
        assert result.returncode == 1, result.stderr  # listed, none running
        return [line.split("pool gpu")[1].strip() for line in result.stdout.splitlines()]

    slot = "EDGETUNE_GPU_SLOTS_PER_DEVICE"
    two_each = status(EDGETUNE_GPU_DEVICES="5,7", **{slot: "2"})
    assert [line.split()[0] for line in two_each.stdout.splitlines()] == [
        "gpu-1", "gpu-2", "gpu-3", "gpu-4"
    ]  # fmt: skip
    assert pins(two_each) == [
        f"(CUDA_VISIBLE_DEVICES={gpu} {slot}=2)" for gpu in ("5", "5", "7", "7")
    ]
    # a worker count spread over the GPUs listed, each told how many share its GPU
    assert pins(status(EDGETUNE_GPU_DEVICES="0", EDGETUNE_GPU_WORKERS="3")) == (
        [f"(CUDA_VISIBLE_DEVICES=0 {slot}=3)"] * 3
    )
    assert pins(status(EDGETUNE_GPU_DEVICES="0,1")) == [
        f"(CUDA_VISIBLE_DEVICES={gpu} {slot}=1)" for gpu in ("0", "1")
    ]
    assert pins(status()) == [""]  # no GPUs named: one worker, not pinned
    bad = status(**{slot: "0"})
    assert bad.returncode != 0 and bad.stdout == ""
    assert f"{slot} must be a whole number of trainings per GPU >= 1, not '0'" in bad.stderr
    crowded = status(EDGETUNE_GPU_DEVICES="0,1", EDGETUNE_GPU_WORKERS="5", **{slot: "2"})
    assert crowded.returncode != 0 and crowded.stdout == ""
    assert (
        f"EDGETUNE_GPU_WORKERS=5 is more than 2 GPU(s) x {slot}=2; raise the slots per GPU or "
        f"leave EDGETUNE_GPU_WORKERS unset (one worker per slot)"
    ) in crowded.stderr
    assert not list(tmp_path.iterdir())  # status creates nothing


def test_env_without_services_says_what_to_do(tmp_path: Path) -> None:
    env = {**os.environ, "EDGETUNE_STATE_DIR": str(tmp_path / "none")}
    env.pop("EDGETUNE_DB_PASSWORD", None)
    result = subprocess.run(
        ["bash", str(SERVICES), "env"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "run 'infra/services.sh up' first" in result.stderr
    assert not (tmp_path / "none").exists()


def test_compose_matches_the_scripts() -> None:
    import yaml

    infra = REPO / "infra"
    compose = yaml.safe_load((infra / "docker-compose.yml").read_text())
    services_sh = SERVICES.read_text()
    for default in ("55432", "4200", "5000"):
        assert f":-{default}}}}}" in services_sh  # the same default ports
    published = {name: svc["ports"] for name, svc in compose["services"].items()}
    assert published == {
        "postgres": ["127.0.0.1:${EDGETUNE_PG_PORT:-55432}:5432"],
        "prefect": ["127.0.0.1:${EDGETUNE_PREFECT_PORT:-4200}:4200"],
        "mlflow": ["127.0.0.1:${EDGETUNE_MLFLOW_PORT:-5000}:5000"],
    }
    images = {name: svc["image"] for name, svc in compose["services"].items()}
    assert images == {
        "postgres": "postgres:15",
        "prefect": "prefecthq/prefect:3.8.8-python3.11",
        "mlflow": "ghcr.io/mlflow/mlflow:v3.17.2",
    }
    prefect_env = compose["services"]["prefect"]["environment"]
    mlflow_env = compose["services"]["mlflow"]["environment"]
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    init = (infra / "postgres-init.sh").read_text()
    for database in DATABASES:
        assert f"CREATE DATABASE {database} OWNER edgetune;" in init
    example = (infra / ".env.example").read_text()
    for var in ("POSTGRES_PASSWORD", "EDGETUNE_DB_PASSWORD"):
        assert f"${{{var}:?" in (infra / "docker-compose.yml").read_text()
        assert f"\n{var}=" in example
