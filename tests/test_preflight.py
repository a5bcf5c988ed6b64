"""Preflight's service checks: local stores pass untouched, servers get one short connection.

The failures, end to end through the command line, are in tests/test_cli.py.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tasks.config import ConfigError, parse_config
from tasks.preflight import check_device, check_storage, check_tracking
from tasks.storage import StudyError
from tasks.tracking import TrackingError

SECRET = "pa55-Secret"


def test_local_stores_pass_without_being_created(tmp_path: Path) -> None:
    check_storage(f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    check_tracking(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    check_tracking((tmp_path / "run" / "mlruns").as_uri())
    check_tracking(str(tmp_path / "run" / "mlruns"))
    assert not (tmp_path / "run").exists()


def test_a_listening_tracking_server_passes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        check_tracking(f"http://127.0.0.1:{port}")
        check_tracking(f"http://mlflow:{SECRET}@127.0.0.1:{port}/prefix")


def test_a_database_that_answers_passes(tmp_path: Path) -> None:
    """The connection path itself, on a database file that already exists."""
    from tasks.preflight import _check_database

    existing = tmp_path / "exists.db"
    sqlite3.connect(existing).close()
    _check_database(f"sqlite:///{existing}", "study.storage", "study.storage")


class _RefusingEngine:
    def connect(self) -> Any:
        raise RuntimeError(f'FATAL: password "{SECRET}" is wrong\nDETAIL: more lines')

    def dispose(self) -> None:
        pass


def test_a_driver_message_that_quotes_the_password_is_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tasks.preflight

    monkeypatch.setattr(tasks.preflight, "create_engine", lambda *a, **k: _RefusingEngine())

    with pytest.raises(StudyError) as caught:
        check_storage(f"postgresql+psycopg2://optuna:{SECRET}@db:5432/optuna")

    assert str(caught.value) == (
        "cannot connect to the Optuna storage database postgresql+psycopg2://optuna:***@db:5432/"
        'optuna: FATAL: password "***" is wrong; check study.storage (or --storage, '
        "$EDGETUNE_STORAGE) and that the database is running"
    )


def test_a_tracking_database_is_checked_like_the_storage() -> None:
    with pytest.raises(TrackingError) as caught:
        check_tracking(f"postgresql+psycopg2://mlflow:{SECRET}@127.0.0.1:1/mlflow")
    message = str(caught.value)
    assert message.startswith(
        "cannot connect to the tracking database postgresql+psycopg2://mlflow:***@127.0.0.1:1/"
    )
    assert "check tracking.uri (or --tracking-uri, $MLFLOW_TRACKING_URI)" in message
    assert SECRET not in message


def test_an_unknown_dialect_is_bad_input() -> None:
    with pytest.raises(ConfigError, match=r"^study\.storage: nodb://u:\*\*\*@h/x cannot be used"):
        check_storage(f"nodb://u:{SECRET}@h/x")


def _device(tmp_path: Path, **ssh: Any) -> Any:
    return parse_config(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"root": str(tmp_path)},
            "study": {"name": "p"},
            "device": {"name": "pi", "runner": "ssh", "ssh": {"host": "h", "user": "u", **ssh}},
        }
    )


def test_board_files_are_checked_without_connecting(tmp_path: Path) -> None:
    import asyncssh

    key = tmp_path / "id"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    check_device(_device(tmp_path, key_file=str(key), known_hosts=str(known_hosts)))

    junk = tmp_path / "junk"
    junk.write_text("not a private key\n")
    with pytest.raises(
        ConfigError,
        match=r"^device pi: cannot load SSH key file .*junk \(device\.ssh\.key_file\): .*; "
        r"edgetune needs a key without a passphrase, or unset key_file to use ssh-agent$",
    ):
        check_device(_device(tmp_path, key_file=str(junk)))
