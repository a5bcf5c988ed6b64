"""The dry run before a study's first training, end to end.

At study start (``tasks.hpo.campaign.dry_run``, called by the ``tune`` flow, or by the
``edgetune tune`` command while its own Prefect server starts) and in
``edgetune validate --deep``, an untrained model of the configured architecture is exported,
compiled with the configured compiler and settings on the study's calibration set, and run
once on the board. A failure stops the study before any training, in one line naming the
setting. The board is a real SSH server on 127.0.0.1 (``tests/board.py``); the Hailo
compiler is the FAKE Dataflow Compiler (``tests/fakes/fake_hailo.py``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import optuna
import pytest
import yaml
from typer.testing import CliRunner

import tasks.workloads.classifier
from edgetune.cli import app
from tasks.config import parse_config
from tasks.devices import DeviceConfigError, SshRunner, create_runner

from board import Board, available_backends, known_hosts_line, start_board
from conftest import tiny_config
from fakes import export_onnx, fake_hailo, tiny_classifier, write_bundle

runner = CliRunner()
LOG = logging.getLogger("test-dry-run")


@pytest.fixture(scope="module", params=available_backends())
def board(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Board]:
    with start_board(tmp_path_factory.mktemp("dry-run-board"), request.param) as running:
        yield running


@pytest.fixture
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The parameters of every training the study starts (none, when the dry run stops it)."""
    started: list[dict[str, Any]] = []
    real = tasks.workloads.classifier.train

    def train(config: Any, params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        started.append(dict(params))
        return real(config, params, *args, **kwargs)

    monkeypatch.setattr(tasks.workloads.classifier, "train", train)
    return started


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ssh_device(board: Board, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    options = board.runner_options(work_dir=str(tmp_path / "remote"), **overrides)
    return {"runner": "ssh", "ssh": options, "warmup": 0, "timeout_s": 60}


def _stored_trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """Every trial of every study in the run folder's Optuna storage (none if it has none)."""
    database = run_dir / "optuna.db"
    if not database.is_file():
        return []
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}")
    return [
        trial
        for summary in optuna.get_all_study_summaries(storage)
        for trial in optuna.load_study(study_name=summary.study_name, storage=storage).trials
    ]


def _trial_runs(run_dir: Path) -> list[str]:
    """The names of the MLflow runs of trials in the run folder's tracking store."""
    database = run_dir / "mlflow.db"
    if not database.is_file():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{database}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments) if experiments else []
    return [str(r.info.run_name) for r in runs if str(r.info.run_name).startswith("trial-")]


def _one_error_line(result: Any) -> str:
    """The command's one ``error:`` line, its last on stderr (``tune`` says what it starts
    first, and Prefect's console may show the compiler's log lines)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return str(errors[0])


# At study start: nothing trains when the board or the compiler refuses --------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_an_untrusted_host_key_stops_the_study_before_any_training(
    board: Board, digits_root: Path, tmp_path: Path, trainings: list[dict[str, Any]]
) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line(board.host, board.port, stranger))
    run_dir = tmp_path / "run"
    device = _ssh_device(board, tmp_path, known_hosts=str(known_hosts))
    config = _write(tmp_path, tiny_config(digits_root, run_dir, device=device))

    result = runner.invoke(app, ["tune", str(config)])

    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    assert line.startswith("error: device test-run: the host key of "), line
    assert f"the host key of 127.0.0.1:{board.port} is not trusted" in line
    assert f"`ssh-keyscan -p {board.port} 127.0.0.1 >> {known_hosts}`" in line
    assert "device.ssh.check_host_key: false" in line
    assert "nothing was trained" in line
    assert trainings == []
    assert _stored_trials(run_dir) == []
    assert _trial_runs(run_dir) == []
    assert not (tmp_path / "remote").exists()  # nothing was sent to an untrusted board


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("own", [False, True], ids=["in-the-flow", "own-server"])
def test_a_calibration_the_compiler_refuses_stops_the_study_before_any_training(
    digits_root: Path,
    tmp_path: Path,
    trainings: list[dict[str, Any]],
    own: bool,
    request: pytest.FixtureRequest,
) -> None:
    """Entropy calibration on 20 images: batches of 16 and 4, which onnxruntime's entropy
    calibrator cannot stack; every trial would fail at compile, after its training. On a
    Prefect server of the command's own, the dry run fails before the command waits for
    the server: no flow run."""
    events = request.getfixturevalue("own_server") if own else None
    run_dir = tmp_path / "run"
    raw = tiny_config(digits_root, run_dir)
    raw["compile"] = {"calibration_samples": 20, "onnxruntime": {"calibrate_method": "entropy"}}
    config = _write(tmp_path, raw)

    result = runner.invoke(app, ["tune", str(config)])

    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    assert line.startswith(
        "error: compile.onnxruntime.calibrate_method: the onnxruntime-int8 compiler refused "
        "an untrained tinycnn (compile.onnxruntime: calibrate_method=entropy, "
        "per_channel=true, float_tail=false; compile.calibration_samples=20): "
    ), line
    assert "ValueError: setting an array element with a sequence" in line
    assert line.endswith("change these settings and run again (dry run: nothing was trained)")
    assert trainings == []
    assert _stored_trials(run_dir) == []
    assert _trial_runs(run_dir) == []
    if events is not None:
        assert events == ["dry run"]  # no wait for the server, no flow


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_server")
def test_the_fake_hailo_compiler_refusing_stops_the_study_before_any_training(
    digits_root: Path,
    tmp_path: Path,
    trainings: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sdk = fake_hailo.make_sdk_client()  # FAKE Dataflow Compiler: fails in optimize()
    sdk.fail_in = "optimize"
    monkeypatch.setitem(sys.modules, "hailo_sdk_client", sdk)
    run_dir = tmp_path / "run"
    raw = tiny_config(digits_root, run_dir)
    raw["compile"] = {"backend": "hailo", "calibration_samples": 8, "hailo": {"hw_arch": "hailo8l"}}
    config = _write(tmp_path, raw)

    result = runner.invoke(app, ["tune", str(config)])

    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    assert line.startswith(
        "error: compile.hailo.hw_arch: the hailo compiler refused an untrained tinycnn "
        "(compile.hailo: hw_arch=hailo8l, optimization_level=2, compression_level=0, "
        "calibration_batch_size=8, extra_model_script=''; compile.calibration_samples=8): "
    ), line
    assert "fake SDK failure injected in optimize" in line
    assert [method for method, _ in sdk.calls][-1] == "optimize"
    assert trainings == []
    assert _stored_trials(run_dir) == []


def _refuse_dry_run(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Make the dry run fail the test with ``why`` if it runs."""
    from tasks.hpo import campaign

    def refuse(config: Any) -> Any:
        raise AssertionError(why)

    monkeypatch.setattr(campaign, "dry_run_configs", refuse)


def test_study_dry_run_false_skips_it_and_says_so(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from tasks.hpo import campaign

    _refuse_dry_run(monkeypatch, "the dry run ran although study.dry_run is false")
    config = parse_config(tiny_config(digits_root, tmp_path / "run", study={"dry_run": False}))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert campaign.dry_run(config, LOG) == []
    assert [r.getMessage() for r in caplog.records] == [
        "dry run skipped (study.dry_run: false): the first trial's stages are the first "
        "to reach the compiler and the board"
    ]


def test_in_deployments_mode_the_dry_run_is_left_to_the_edge_pool(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from tasks.hpo import campaign

    _refuse_dry_run(monkeypatch, "the parent ran the dry run in deployments mode")
    raw = tiny_config(digits_root, tmp_path / "run", orchestration={"mode": "deployments"})
    config = parse_config(raw)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert campaign.dry_run(config, LOG) == []
    [record] = caplog.records
    assert record.getMessage() == (
        "dry run not run here: orchestration.mode 'deployments' compiles on the compile pool "
        "and reaches the board from the edge pool; run 'edgetune validate --deep CONFIG' on a "
        "host of the edge pool before the study"
    )


def test_a_board_that_is_down_at_the_dry_run_pauses_the_study_in_one_line(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.devices import DeviceUnreachableError
    from tasks.hpo import campaign
    from tasks.hpo.loop import BoardPaused

    def down(config: Any) -> Any:
        raise DeviceUnreachableError("cannot reach the device at 10.0.0.9:22 after 1 attempt(s)")

    monkeypatch.setattr(campaign, "dry_run_configs", down)
    config = parse_config(tiny_config(digits_root, tmp_path / "run"))

    with pytest.raises(BoardPaused) as caught:
        campaign.dry_run(config, LOG)
    assert str(caught.value) == (
        "device test-run: cannot reach the device at 10.0.0.9:22 after 1 attempt(s); the study "
        "did not start (dry run: nothing was trained): check the board with 'edgetune device "
        "check CONFIG', then run the study again"
    )


def test_a_dry_run_the_caller_ran_is_logged_and_not_run_again(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from tasks.hpo import campaign
    from tasks.workloads.base import DryRun

    _refuse_dry_run(monkeypatch, "the dry run ran again")
    config = parse_config(tiny_config(digits_root, tmp_path / "run"))
    seconds = {"export": 0.4, "compile": 0.3, "device": 0.2}
    done = DryRun("tinycnn", "onnxruntime-int8", 32, "test-run", 8, 0.01, 1.5, seconds)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert campaign.dry_run(config, LOG, [done]) == [done]
    assert [r.getMessage() for r in caplog.records] == [
        "dry run before the first training: untrained tinycnn exported in 0.4 s, compiled by "
        "onnxruntime-int8 on 32 calibration images in 0.3 s (0.010 MB), run on board "
        "test-run: 8 images, 1.500 ms a batch, in 0.2 s"
    ]


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command as it runs on a Prefect server of its own (``prefect_server.running()``;
    its URL the embedded one, so the board's slot is a file lock), the session's test server
    standing in for it; each wait for the server and each dry run, recorded in order."""
    from prefect.settings import PREFECT_API_URL

    from edgetune import prefect_server
    from tasks.host import EMBEDDED_PREFECT_URL_ENV
    from tasks.hpo import campaign

    events: list[str] = []
    real = campaign.dry_run_configs

    def counted(config: Any) -> Any:
        events.append("dry run")
        return real(config)

    monkeypatch.setattr(campaign, "dry_run_configs", counted)
    monkeypatch.setattr(prefect_server, "running", lambda: True)
    monkeypatch.setattr(prefect_server, "ready", lambda *_, **__: events.append("server ready"))
    monkeypatch.setenv(EMBEDDED_PREFECT_URL_ENV, str(PREFECT_API_URL.value()))
    return events


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_server")
def test_the_command_runs_the_dry_run_while_its_own_prefect_server_starts(
    digits_root: Path, tmp_path: Path, own_server: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the wait for the server, not after it in the flow: the dry run fills the
    server's start-up; the flow logs what it did and does not run it again."""
    import flows.tune

    given: list[Any] = []
    real = flows.tune.dry_run

    def seen(cfg: Any, logger: Any, done: Any = None) -> Any:
        given.append(done)
        return real(cfg, logger, done)

    monkeypatch.setattr(flows.tune, "dry_run", seen)
    raw = tiny_config(digits_root, tmp_path / "run", study={"n_trials": 1, "parallel": 1})
    config = _write(tmp_path, raw)

    result = runner.invoke(app, ["tune", str(config)])

    assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert own_server[:2] == ["dry run", "server ready"]
    assert own_server.count("dry run") == 1
    [[done]] = given  # what the command ran, handed to the flow
    assert (done.model, done.compiler, done.calibration_images) == (
        "tinycnn",
        "onnxruntime-int8",
        32,
    )
    assert len(_stored_trials(tmp_path / "run")) == 1


# A dry run that passes, on the real SSH board ----------------------------------------------


@pytest.mark.integration
def test_the_dry_run_runs_an_untrained_model_once_on_the_ssh_board(
    board: Board, digits_root: Path, tmp_path: Path, caplog: Any
) -> None:
    from tasks.hpo import campaign

    raw = tiny_config(digits_root, tmp_path / "run", device=_ssh_device(board, tmp_path))
    config = parse_config(raw)

    with caplog.at_level(logging.INFO, logger=LOG.name):
        [done] = campaign.dry_run(config, LOG)

    assert (done.model, done.compiler, done.board) == ("tinycnn", "onnxruntime-int8", "test-run")
    assert done.calibration_images == 32  # the study's own calibration set
    assert done.board_images == 8
    assert done.latency_ms > 0 and done.size_mb > 0
    assert set(done.seconds) == {"export", "compile", "device"}
    assert all(seconds > 0 for seconds in done.seconds.values())
    [record] = caplog.records
    assert record.getMessage() == f"dry run before the first training: {done.summary()}"
    assert re.fullmatch(
        r"untrained tinycnn exported in \d+\.\d s, compiled by onnxruntime-int8 on 32 "
        r"calibration images in \d+\.\d s \(\d+\.\d\d\d MB\), run on board test-run: 8 images, "
        r"\d+\.\d\d\d ms a batch, in \d+\.\d s",
        done.summary(),
    ), done.summary()
    runs = tmp_path / "remote" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []  # nothing left on the board
    assert not (tmp_path / "run").exists()  # nothing created for the study


# Board settings the board refuses are settings errors (DeviceConfigError) ------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dry-run-model")
    return (
        export_onnx(tiny_classifier(), folder / "model.onnx"),
        write_bundle(folder / "bundle.npz", n=4),
    )


def _runner(board: Board, **overrides: Any) -> SshRunner:
    made = create_runner("ssh", **board.runner_options(warmup=0, timeout_s=30, **overrides))
    assert isinstance(made, SshRunner)
    return made


@pytest.mark.integration
def test_a_python_missing_on_the_board_is_a_settings_error(
    board: Board, artifact: tuple[Path, Path], tmp_path: Path
) -> None:
    model, bundle = artifact
    ssh = _runner(board, work_dir=str(tmp_path / "remote"), python="/nonexistent/python3")

    with pytest.raises(DeviceConfigError) as caught:
        ssh.evaluate(model, bundle, tmp_path / "work")
    message = str(caught.value)
    assert message.startswith(
        f"cannot start the evaluator with '/nonexistent/python3' on 127.0.0.1:{board.port} "
        "(exit code 127: "
    ), message
    assert message.endswith(
        "set device.ssh.python to a Python with numpy and onnxruntime on the board"
    )


@pytest.mark.integration
@pytest.mark.parametrize("why", ["a file in the way", "no write permission"])
def test_a_work_dir_the_board_refuses_is_a_settings_error(
    board: Board, artifact: tuple[Path, Path], tmp_path: Path, why: str
) -> None:
    model, bundle = artifact
    if why == "a file in the way":
        (tmp_path / "taken").write_text("a file, not a folder")
        work_dir = tmp_path / "taken" / "edgetune"
    else:
        if os.getuid() == 0:
            pytest.skip("root ignores file modes: no folder refuses it here")
        (tmp_path / "locked").mkdir(mode=0o500)
        work_dir = tmp_path / "locked" / "edgetune"
    ssh = _runner(board, work_dir=str(work_dir))

    with pytest.raises(DeviceConfigError) as caught:
        ssh.evaluate(model, bundle, tmp_path / "work")
    message = str(caught.value)
    assert message.startswith(
        f"{board.user}@127.0.0.1:{board.port} cannot write the evaluator under "
        f"device.ssh.work_dir {work_dir} (SFTP"
    ), message
    assert message.endswith(
        f"make it a folder {board.user} may write on the board, or set device.ssh.work_dir "
        "to one (relative to its home, e.g. edgetune)"
    )
    assert "\n" not in message


# edgetune validate --deep: one line either way ---------------------------------------------


def test_validate_deep_runs_the_dry_run_and_prints_one_ok_line(
    digits_root: Path, tmp_path: Path
) -> None:
    config = _write(tmp_path, tiny_config(digits_root, tmp_path / "run"))

    result = runner.invoke(app, ["validate", "--deep", str(config)])

    assert result.exit_code == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"ok: run: classes \['0', .*'9'\], images \{'train': \d+, 'val': \d+(, 'test': \d+)?\}; "
        r"dry run: untrained tinycnn exported in \d+\.\d s, compiled by onnxruntime-int8 on 32 "
        r"calibration images in \d+\.\d s \(\d+\.\d\d\d MB\), run on board test-run: 8 images, "
        r"\d+\.\d\d\d ms a batch, in \d+\.\d s",
        lines[0],
    ), lines[0]
    assert not (tmp_path / "run").exists()


def test_validate_deep_prints_one_error_line_naming_the_setting(
    digits_root: Path, tmp_path: Path
) -> None:
    raw = tiny_config(digits_root, tmp_path / "run")
    raw["compile"] = {"calibration_samples": 20, "onnxruntime": {"calibrate_method": "entropy"}}
    config = _write(tmp_path, raw)

    result = runner.invoke(app, ["validate", "--deep", str(config)])

    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: compile.onnxruntime.calibrate_method: the onnxruntime-int8 ")
    assert line.endswith("(dry run: nothing was trained)")
    assert not (tmp_path / "run").exists()


def test_variants_share_a_dry_run_and_a_refused_one_is_named(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One dry run per set of settings the variants check: a variant that changes only its
    training shares the study's; one that changes the compiler's has its own, named."""
    from tasks.workloads import registry
    from tasks.workloads.base import DryRunError

    raw = tiny_config(digits_root, tmp_path / "run")
    raw["compile"]["calibration_samples"] = 20
    raw["variants"] = [
        {"name": "slow", "set": {"train.lr": 0.02}},
        {"name": "fast", "set": {"train.lr": 0.08}},
        {"name": "entropy", "set": {"compile.onnxruntime.calibrate_method": "entropy"}},
    ]
    config = parse_config(raw)
    ran: list[str] = []
    real = tasks.workloads.classifier.dry_run

    def spy(study: Any) -> Any:
        ran.append(study.study.name)
        return real(study)

    monkeypatch.setattr(tasks.workloads.classifier, "dry_run", spy)

    with pytest.raises(DryRunError) as caught:
        registry.dry_run(config)

    assert ran == ["run", "run-entropy"]  # slow and fast ran as the study: one dry run
    assert str(caught.value).startswith(
        "variants[2] (entropy): compile.onnxruntime.calibrate_method: the onnxruntime-int8 "
        "compiler refused an untrained tinycnn (compile.onnxruntime: calibrate_method=entropy, "
    )
    without = parse_config({**raw, "variants": raw["variants"][:2]})
    [done] = registry.dry_run(without)
    assert done.calibration_images == 20 and ran[-1] == "run"
