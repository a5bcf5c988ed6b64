"""MLflow bookkeeping by explicit run id.

No fluent ``mlflow.start_run`` state: stages run in threads here and on other hosts in
production, and each one finds its run (and its inputs) by id. One parent run per study,
one nested run per trial; the champion's compiled artifact is registered with an alias.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# MLflow reads these at import: keep it quiet and offline before it is first imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARENT_TAG = "mlflow.parentRunId"
CHAMPION = "champion"


@dataclass(frozen=True)
class Promotion:
    """Where the champion alias stands after a registration, and why."""

    moved: bool
    version: str  # the champion's version now
    value: float | None  # its value on the compared metric, when it has one
    reason: str

    @property
    def note(self) -> str:
        if self.moved:
            return f"@champion moved to version {self.version}: {self.reason}"
        return f"@champion stays version {self.version}: {self.reason}"


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message names the URI and the fix."""


def _client(uri: str) -> Any:
    # MLflow loads on first use, after the environment above is set.
    from mlflow import MlflowClient

    # The client opens its tracking store at once: a new SQLite file is migrated here.
    with creation_lock(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def creation_lock(url: str, patience_s: float = 300.0) -> Iterator[None]:
    """Hold an OS file lock beside a SQLite database (``<file>.lock``) while it is opened.

    Opening a new database creates its tables (MLflow runs its migrations, Optuna writes
    its schema version): two processes starting one fresh run directory at once would both
    create them and one would fail half way. The kernel frees the lock when its holder
    dies. A server URL takes no lock: its server or database serialises its own schema;
    nor does a folder this process cannot write to (it creates no database there).
    """
    path = _lock_path(url)
    handle = _open_lock(path)
    if path is None or handle is None:
        yield
        return
    with handle:
        _wait_for_lock(handle.fileno(), path, patience_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_path(url: str) -> Path | None:
    database = url.removeprefix("sqlite:///").split("?")[0]
    if not url.startswith("sqlite:///") or database in ("", ":memory:"):
        return None
    return Path(database).with_name(Path(database).name + ".lock")


def _open_lock(path: Path | None) -> IO[str] | None:
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a")
    except OSError:
        return None


def _wait_for_lock(fd: int, path: Path, patience_s: float) -> None:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{path} stayed locked for {patience_s:.0f} s by another process opening "
                    f"{path.name.removesuffix('.lock')}; wait for that process, or stop it "
                    f"(its lock goes with it)"
                ) from None
            time.sleep(0.05)


def local_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts for the tracking URI ``uri``.

    Beside a SQLite tracking file (MLflow would use ./mlruns of the working folder, which
    for a worker is a temporary folder deleted after its run); None for a tracking server,
    whose artifact proxy (``--serve-artifacts``) stores them where every host reaches them.
    """
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    """A thin, thread-safe facade over one MLflow tracking URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = _client(uri)

    # Experiments and runs ---------------------------------------------------------------
    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        try:
            existing = self.client.get_experiment_by_name(name)
            if existing is not None:
                return str(existing.experiment_id)
            return str(self.client.create_experiment(name, artifact_location=artifact_location))
        except Exception as exc:
            # MLflow loads on first use, after the environment above is set.
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException) and "already exists" in str(exc):
                return str(self.client.get_experiment_by_name(name).experiment_id)
            raise TrackingError(
                f"cannot use MLflow tracking at {mask_uri(self.uri)}: {one_line(exc)}; check "
                f"tracking.uri (or --tracking-uri, $MLFLOW_TRACKING_URI) and that the server "
                f"is running"
            ) from None

    def start_run(
        self,
        experiment_id: str,
        name: str,
        *,
        parent_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        all_tags = dict(tags or {})
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        # MLflow loads on first use, after the environment above is set.
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        # MLflow loads on first use, after the environment above is set.
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value)[:5000])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Every file under ``folder``, under ``artifact_path`` of the run."""
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """Fetch a stage's input by run id: MLflow is the artifact bus between hosts."""
        # MLflow loads on first use, after the environment above is set.
        from mlflow.artifacts import download_artifacts

        dst.mkdir(parents=True, exist_ok=True)
        local = download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.uri
        )
        return Path(local)

    def artifact_uri(self, run_id: str, artifact_path: str) -> str:
        return f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"

    # Registry -----------------------------------------------------------------------------
    def register(
        self,
        name: str,
        run_id: str,
        artifact_path: str,
        *,
        alias: str | None = CHAMPION,
        tags: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> str:
        """Register a run's artifact folder as a version of ``name``; point ``alias`` at it.

        A run registered before keeps its version (a study run again registers nothing new).
        """
        # MLflow loads on first use, after the environment above is set.
        from mlflow.exceptions import MlflowException

        source = self.artifact_uri(run_id, artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower():
                raise
        same = [
            v
            for v in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if v.source == source
        ]
        if same:
            version = str(min(int(v.version) for v in same))
        else:
            created = self.client.create_model_version(
                name,
                source=source,
                run_id=run_id,
                tags={k: str(v) for k, v in (tags or {}).items()},
                description=description,
            )
            version = str(created.version)
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        return version

    def promote(
        self, name: str, version: str, metric: str, value: float, *, maximize: bool
    ) -> Promotion:
        """Give ``version`` the champion alias only if it beats the current champion on
        ``metric`` (the tag each version carries); a champion without that metric (measured
        on another split, or by another objective) is not comparable and keeps the alias."""
        # MLflow loads on first use, after the environment above is set.
        from mlflow.exceptions import MlflowException

        try:
            current = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            current = None
        if current is not None and str(current.version) == str(version):
            return Promotion(False, version, value, "it is the champion already")
        if current is None:
            self.client.set_registered_model_alias(name, CHAMPION, version)
            return Promotion(True, version, value, "the first champion")
        held = current.tags.get(metric)
        if held is None:
            return Promotion(
                False,
                str(current.version),
                None,
                f"version {current.version} has no {metric} to compare with (measured on "
                f"another split or objective)",
            )
        held_value = float(held)
        if value > held_value if maximize else value < held_value:
            self.client.set_registered_model_alias(name, CHAMPION, version)
            return Promotion(
                True,
                version,
                value,
                f"{value:.5f} beats version {current.version}'s {held_value:.5f}",
            )
        return Promotion(
            False,
            str(current.version),
            held_value,
            f"version {current.version}'s {metric} {held_value:.5f} is as good or better than "
            f"{value:.5f}",
        )

    def alias_version(self, name: str, alias: str = CHAMPION) -> Any:
        return self.client.get_model_version_by_alias(name, alias)


#: Query parameters whose values are credentials (``?password=…``, ``?token=…``).
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|secret|token|access_token|api_key|apikey|key)=)[^&;#\s]*"
)
#: ``scheme://user:password@host``: everything up to the last ``@`` before the host is the
#: password, so one with an unescaped ``/`` or ``@`` is hidden too.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*):[^?#\s]*@([^@?#\s]*)")
#: ``user:password@host/db`` without a scheme (not ``sqlite:////path``).
_BARE_USERINFO = re.compile(r"^([^:/@?#\s]+):(?!//)[^?#\s]*@([^@?#\s]*)")
#: The same inside free text (an exception message that quotes a URL).
_USERINFO_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*):[^@\s]*@")


def mask_uri(uri: str) -> str:
    """Hide a password in a database or server URL before it is printed or logged.

    ``scheme://user:password@host/…`` becomes ``scheme://user:***@host/…``, and credential
    query parameters (``password=``, ``token=``…) become ``***``. Never raises: a URL that
    cannot be parsed is masked by pattern.
    """
    masked = _USERINFO.sub(r"\1:***@\2", uri, count=1)
    if masked == uri:
        masked = _BARE_USERINFO.sub(r"\1:***@\2", uri, count=1)
    return _SECRET_QUERY.sub(r"\1***", masked)


def mask_text(text: str) -> str:
    """Hide every URL password and credential query parameter inside free text."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO_IN_TEXT.sub(r"\1:***@", text))


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first line of an error, whitespace collapsed, secrets masked and cut to ``limit``."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    text = mask_text(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
