"""Faults during a study: nothing lost, nothing left RUNNING, every stop explained.

Real processes where users have them: the study is a real `edgetune tune` process killed
with SIGKILL and started again; the board is a real SSH server on loopback behind a link
that drops mid-upload. The board's failures in the pause test are injected (named so).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from tasks.config import parse_config
from tasks.hpo.recovery import (
    ATTR_HEARTBEAT,
    ATTR_OWNER,
    current_owner,
    enqueue_retry,
    outcome_count,
    stale_reason,
    still_to_ask,
)
from tasks.hpo.study import open_study

from conftest import tiny_config

# Recovery units ----------------------------------------------------------------------------------


def _sqlite_study(tmp_path: Path, name: str = "units") -> optuna.Study:
    raw = tiny_config(tmp_path, tmp_path / name)
    config = parse_config(raw)
    return open_study(config.storage_url, config.study, 0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_is_decided_by_owner_and_heartbeat(tmp_path: Path) -> None:
    study = _sqlite_study(tmp_path)
    me = current_owner()
    now = time.time()
    mine, dead, alive, silent, unowned = (study.ask() for _ in range(5))
    mine.set_user_attr(ATTR_OWNER, me)
    dead.set_user_attr(ATTR_OWNER, {"host": me["host"], "pid": _dead_pid()})
    alive.set_user_attr(ATTR_OWNER, {"host": "another-host", "pid": 1})
    alive.set_user_attr(ATTR_HEARTBEAT, now - 5)
    silent.set_user_attr(ATTR_OWNER, {"host": "another-host", "pid": 1})
    silent.set_user_attr(ATTR_HEARTBEAT, now - 500)
    trials = {t.number: t for t in study.get_trials()}
    assert stale_reason(trials[mine.number], me, 120, now) is None
    assert stale_reason(trials[alive.number], me, 120, now) is None
    dead_reason = stale_reason(trials[dead.number], me, 120, now)
    assert dead_reason is not None and "is gone" in dead_reason
    assert stale_reason(trials[silent.number], me, 120, now) == (
        "no heartbeat for 500 s (limit 120 s)"
    )
    # No owner recorded (a process killed right after asking): its start time is its beat.
    assert stale_reason(trials[unowned.number], me, 120, now) is None
    assert stale_reason(trials[unowned.number], me, 120, now + 300) is not None


def test_retries_are_traced_counted_and_bounded(tmp_path: Path) -> None:
    study = _sqlite_study(tmp_path, "retries")
    first = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)})
    study.tell(first, state=TrialState.FAIL)
    frozen = study.get_trials()[0]
    assert outcome_count(study.get_trials()) == 1  # a failure without retry is an outcome
    assert enqueue_retry(study, frozen, retries=1)
    assert enqueue_retry(study, frozen, retries=1)  # once only, however often reconciled
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs == {"retry_of": 0, "attempt": 1}
    assert trials[1].system_attrs["fixed_params"] == frozen.params
    assert outcome_count(trials) == 0  # the retry stands for it
    assert still_to_ask(study.get_trials(), 3) == 3
    second = study.ask()
    assert second.suggest_float("lr", 0.01, 0.1, log=True) == frozen.params["lr"]
    study.tell(second, state=TrialState.FAIL)
    again = study.get_trials()[1]
    assert not enqueue_retry(study, again, retries=1)  # attempt 1 of 1: no retry left
    assert enqueue_retry(study, again, retries=1, charge=False)  # the board's fault: free
    assert study.get_trials()[2].user_attrs == {"retry_of": 1, "attempt": 1}


# A whole study, killed and resumed -------------------------------------------------------------


def _edgetune() -> list[str]:
    return [str(Path(sys.executable).parent / "edgetune")]


def _api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return env


def _write(tmp_path: Path, raw: dict[str, Any], name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _no_run_left_running(tracking_uri: str) -> list[Any]:
    client = MlflowClient(tracking_uri)
    runs = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]
    assert runs
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    return runs


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_killed_study_process_resumes_without_losing_a_trial(
    digits_root: Path, tmp_path: Path
) -> None:
    raw = tiny_config(digits_root, tmp_path / "killed")
    raw["train"]["epochs"] = 4
    raw["study"].update(n_trials=3, parallel=1, heartbeat_s=1, stale_after_s=30)
    path = _write(tmp_path, raw, "killed")
    config = parse_config(raw)
    env = _api_env()
    first = subprocess.Popen(
        [*_edgetune(), "tune", str(path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:
        assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
        assert time.monotonic() < deadline, "no trial started training"
        time.sleep(0.5)
        try:
            study = open_study(config.storage_url, config.study, 0, create=False)
        except Exception:
            continue
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if trial.intermediate_values:  # mid-training
                victim = trial
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    study = open_study(config.storage_url, config.study, 0, create=False)
    assert study.get_trials()[victim.number].state == TrialState.RUNNING  # left behind

    second = subprocess.run(
        [*_edgetune(), "tune", str(path), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    trials = open_study(config.storage_url, config.study, 0, create=False).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith(f"stale: its study process {first.pid} on ")
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    runs = _no_run_left_running(config.tracking_uri)
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[failed.user_attrs["mlflow_run_id"]].info.status == "FAILED"
    killed_parents = [
        r for r in runs if r.data.tags.get("edgetune.kind") == "study" and r.info.status == "KILLED"
    ]
    assert len(killed_parents) == 1
    assert "is gone" in killed_parents[0].data.tags["edgetune.end_reason"]


# Resume, restart, reuse ----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_changed_space_is_refused_restart_starts_afresh_and_reuse_best_retrains(
    digits_root: Path, tmp_path: Path
) -> None:
    from flows.tune import tune
    from tasks.hpo.recovery import StudyChangedError

    raw = tiny_config(digits_root, tmp_path / "resume")
    raw["study"]["n_trials"] = 2
    config = parse_config(raw)
    first = tune(config.model_dump(mode="json"))
    assert first["counts"]["COMPLETE"] == 2
    first_best = first["best"]["device_augrc"]
    again = tune(config.model_dump(mode="json"))  # nothing left to do: no duplicate trial
    assert len(again["trials"]) == 2

    changed = parse_config(
        {
            **raw,
            "study": {
                **raw["study"],
                "search_space": {"lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
            },
        }
    )
    with pytest.raises(StudyChangedError) as info:
        tune(changed.model_dump(mode="json"))
    message = str(info.value)
    assert "search_space.lr.high: 0.1 -> 0.2" in message
    assert "search_space.momentum removed" in message and "--restart" in message
    assert "\n" not in message

    restarted = tune(
        {
            **changed.model_dump(mode="json"),
            "study": {**changed.model_dump(mode="json")["study"], "n_trials": 1},
        },
        restart=True,
    )
    assert len(restarted["trials"]) == 1 and restarted["counts"]["COMPLETE"] == 1
    best = restarted["best"]

    reused = tune(changed.model_dump(mode="json"), reuse_best=True)
    assert reused["study"] == "resume-best"
    [trial] = reused["trials"]
    assert trial["state"] == "COMPLETE" and trial["params"] == best["params"]
    client, name = MlflowClient(config.tracking_uri), changed.registered_model_name
    retrained = client.get_model_version_by_alias(name, "retrained")
    assert retrained.run_id == trial["mlflow_run_id"]
    # the same parameters train the same model (one trial seed): not better, so the
    # champion stays where it was (the best of the searches, the one before the restart
    # included), and the summary says so
    assert trial["device_augrc"] == pytest.approx(best["device_augrc"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id != retrained.run_id
    assert float(champion.tags["device_augrc"]) <= min(best["device_augrc"], first_best)
    assert reused["champion"]["alias"] == "retrained"
    assert reused["champion"]["note"].startswith(f"@champion stays version {champion.version}")
    # the finished search run again registers nothing new and keeps its champion
    versions = len(client.search_model_versions(f"name = '{name}'"))
    tune(
        {
            **changed.model_dump(mode="json"),
            "study": {**changed.model_dump(mode="json")["study"], "n_trials": 1},
        }
    )
    assert len(client.search_model_versions(f"name = '{name}'")) == versions
    assert client.get_model_version_by_alias(name, "champion").version == champion.version


# The link to the board drops mid-upload --------------------------------------------------------


class Link:
    """A loopback TCP relay in front of the board that can drop every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.up_bytes = 0
        self.cut_after: int | None = None
        self.cuts = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if upstream:
                    with self.lock:
                        self.up_bytes += len(data)
                        cut = self.cut_after is not None and self.up_bytes > self.cut_after
                    if cut:
                        self.drop(down_for=1.0)
        except OSError:
            pass

    def drop(self, down_for: float) -> None:
        """Reset every connection and refuse new ones for ``down_for`` seconds."""
        with self.lock:
            self.cut_after = None
            self.cuts += 1
            conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.close()
            except OSError:
                pass
        self.listener.close()

        def back() -> None:
            self.listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, daemon=True).start()

        threading.Timer(down_for, back).start()


@pytest.mark.integration
def test_the_board_link_dropping_mid_upload_is_survived(tmp_path: Path) -> None:
    import asyncssh
    import numpy as np

    from tasks.devices.ssh import SshRunner

    from board import known_hosts_line, start_board
    from fakes import export_onnx, tiny_classifier, write_bundle

    # A bundle large enough that the drop lands inside its upload.
    artifact = export_onnx(tiny_classifier(), tmp_path / "model.onnx")
    bundle = write_bundle(tmp_path / "bundle.npz", n=256, seed=3)
    with start_board(tmp_path / "board") as board:
        options = board.runner_options(warmup=0, timeout_s=60)
        clean = SshRunner(**options).evaluate(artifact, bundle, tmp_path / "a")
        link = Link(board.port)
        host_key = asyncssh.read_private_key(str(board.host_key))
        with board.known_hosts.open("a") as known:
            known.write(known_hosts_line(board.host, link.port, host_key))
        shutil.rmtree(board.work_dir)  # nothing cached: the bundle is uploaded again
        link.cut_after = 60_000  # past the handshake and the evaluator, inside the bundle
        runner = SshRunner(**{**options, "port": link.port, "retries": 3, "backoff_s": 0.5})
        result = runner.evaluate(artifact, bundle, tmp_path / "b")
        assert link.cuts == 1
        np.testing.assert_allclose(result.probs, clean.probs, rtol=1e-6)
        assert [p.name for p in board.work_dir.rglob("*.part")] == []
        runs = board.work_dir / "runs"
        assert not runs.exists() or list(runs.iterdir()) == []


# One machine, no Prefect server: the board's lock cannot leak ----------------------------------


def test_a_killed_holder_of_the_board_frees_it_at_once_in_embedded_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.board
    from tasks.board import BoardBusyError, board_lock_path, hold_board

    monkeypatch.setattr(tasks.board, "embedded", lambda: True)
    raw = tiny_config(tmp_path, tmp_path / "lock")
    raw["device"]["wait_timeout_s"] = 1
    config = parse_config(raw)
    path = board_lock_path(config.device.concurrency_limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(  # another study process, evaluating on the board
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with (
            pytest.raises(BoardBusyError, match=r"stayed busy for 1 s: another study"),
            hold_board(config),
        ):
            pass
        assert time.monotonic() - started >= 1
        holder.kill()  # killed while evaluating: no release, no cleanup
        holder.wait()
        started = time.monotonic()
        with hold_board(config):
            assert time.monotonic() - started < 1
    finally:
        holder.kill()
        holder.wait()
