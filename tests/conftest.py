"""Shared fixtures: one Prefect test server per session, the digits dataset, tiny configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before Prefect or MLflow is imported anywhere: no telemetry, quiet logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Commands started by tests run cold and leave no engine behind (tests/test_engine.py
# chooses its own).
os.environ["EDGETUNE_ENGINE"] = "off"


URL_VARIABLES = ("EDGETUNE_STORAGE", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session", autouse=True)
def _decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Decoded training images go to the session's temporary folder, not the user's cache
    (commands started by tests inherit it)."""
    os.environ["EDGETUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("decoded"))
    yield
    os.environ.pop("EDGETUNE_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def _url_environment() -> Iterator[None]:
    """Each test starts without the URL variables, and whatever it sets is removed after.

    ``edgetune --storage/--tracking-uri`` set them in the process (so that a password
    stays out of the config): without this, one CLI test would leak its URL into the next
    test, or into a module fixture set up between two tests. (monkeypatch.delenv would
    not do: it restores nothing for a variable that was absent, and restores a leaked one.)
    """
    for name in URL_VARIABLES:
        os.environ.pop(name, None)
    yield
    for name in URL_VARIABLES:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real Prefect API (SQLite-backed) shared by every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example, written through the same code users run."""
    from tasks.data import write_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    write_digits(root)
    return root


@pytest.fixture(scope="session")
def digits16(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits at 16 px for trainings: the dataset (``info``), its train items, and its
    val split as the float tensors a trial validates on (``val_x``, ``val_y``)."""
    from tasks.data import inspect_dataset, load_bundle, make_bundle
    from tasks.training.loaders import bundle_tensors

    info = inspect_dataset(digits_root, verify_images=False)
    bundle = make_bundle(
        info.files["val"], info.classes, 16, tmp_path_factory.mktemp("val16") / "val.npz"
    )
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    return {"info": info, "items": info.files["train"], "val_x": val_x, "val_y": val_y}


def tiny_config(root: Path, run_dir: Path, **sections: Any) -> dict[str, Any]:
    """A config small enough for a CPU test: 16 px, 2 epochs, 2 trials in parallel."""
    raw: dict[str, Any] = {
        "seed": 0,
        "run_dir": str(run_dir),
        "data": {"root": str(root), "image_size": 16, "augment": {"rotation": 0.0}},
        "model": {"arch": "tinycnn"},
        "train": {"epochs": 2, "batch_size": 128, "swa_start": 1, "lr": 0.05, "swa_lr": 0.02},
        "compile": {"calibration_samples": 32},
        "device": {"name": f"test-{run_dir.name}", "warmup": 0},
        "study": {
            "name": run_dir.name,
            "n_trials": 2,
            "parallel": 2,
            "bootstrap": 20,
            "search_space": {
                "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
                "momentum": {"type": "float", "low": 0.85, "high": 0.95},
            },
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Remote paths of every SFTP put the board runner makes, in order (the artifact is put
    without `tasks.devices.ssh._upload`)."""
    import asyncssh

    recorded: list[str] = []
    real = asyncssh.SFTPClient.put

    async def spy(self: Any, localpaths: Any, remotepath: Any = None, **kwargs: Any) -> Any:
        recorded.append(str(remotepath))
        return await real(self, localpaths, remotepath, **kwargs)

    monkeypatch.setattr(asyncssh.SFTPClient, "put", spy)
    return recorded
