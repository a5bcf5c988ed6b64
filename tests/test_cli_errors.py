"""Every command, given bad input, says what is wrong in one ``error:`` line and exits 2.

No traceback, no Prefect log of the exception, nothing half-written. The cases are keyed
by command path; a command added to the CLI without a case here fails
``test_every_command_has_a_bad_input_case``. The cases whose traceback came from outside
the command (Prefect's flow-run logger, typer's exception hook) run the real console
script in a subprocess: an in-process runner would not show what a terminal prints.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

from edgetune.cli import EXIT_BAD_INPUT, app

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@dataclass
class Where:
    """A test's folder: configs are written here; nothing else may appear unless expected."""

    tmp: Path
    digits: Path

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def classifier(self, **study: object) -> Path:
        raw = tiny_config(self.digits, self.run_dir)
        raw["study"].update(study)
        return self.write("study.yaml", raw)

    def detector(self) -> Path:
        """A detector study config whose dataset is absent (data/insulators not fetched)."""
        raw = {
            "name": "s-ml",
            "run_dir": str(self.tmp / "detector"),
            "data": {"yaml": "../insulators/data.yaml"},
            "train": {"imgsz": 64, "epochs": 1, "batch": 2, "device": "cpu", "workers": 0},
            "study": {"name": "s-ml-hpo", "n_trials": 1},
        }
        return self.write("detectors/s-ml.yaml", raw)

    def write(self, name: str, raw: object) -> Path:
        """``raw`` as YAML; a string is written as it is."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
        return path

    def store_uri(self) -> str:
        return f"sqlite:///{self.tmp / 'none' / 'mlflow.db'}"

    def stored_study(self) -> Path:
        """The classifier config with its study stored as a first ``tune`` leaves it (the
        project's own naming and fingerprint), without training anything."""
        from tasks.config import load_config
        from tasks.hpo.recovery import check_fingerprint
        from tasks.hpo.study import open_study
        from tasks.workloads.registry import objective_for

        path = self.classifier()
        cfg = load_config(path)
        study = open_study(cfg.storage_url, cfg.study, cfg.seed, objective=objective_for(cfg))
        check_fingerprint(study, cfg)
        return path


@dataclass
class Case:
    argv: Callable[[Where], list[str]]
    message: str  # in the error line
    absent: Callable[[Where], list[Path]] = lambda where: [where.run_dir]
    subprocess: bool = False  # the traceback came from outside the command's own code


def _run_dir_and_detector(where: Where) -> list[Path]:
    return [where.run_dir, where.tmp / "detector", where.tmp / "mlflow.db"]


#: command path -> its bad-input cases (id -> case).
CASES: dict[str, dict[str, Case]] = {
    "tune": {
        "detector dataset absent": Case(
            lambda w: ["tune", str(w.detector())],
            "insulators/data.yaml does not exist; set data.yaml",
            _run_dir_and_detector,
            subprocess=True,
        ),
        "changed search space": Case(
            lambda w: ["tune", str(w.stored_study()), "study.search_space.lr.high=0.2"],
            "was run with a different search space or objective (search_space.lr.high: 0.1 "
            "-> 0.2); to continue it, restore those settings; to start afresh, run with "
            "--restart",
            lambda w: [w.run_dir / "config.yaml", w.run_dir / "mlflow.db"],
            subprocess=True,
        ),
        "reuse-best without a study": Case(
            lambda w: ["tune", str(w.classifier()), "--reuse-best"],
            "study 'run' has no COMPLETE trial to reuse; run the search first",
            subprocess=True,
        ),
        "bad override syntax": Case(
            lambda w: ["tune", str(w.classifier()), "train.epochs"],
            "override 'train.epochs': expected section.key=value",
        ),
        "unknown override key": Case(
            lambda w: ["tune", str(w.classifier()), "train.epoch=3"],
            "train.epoch: unknown key (did you mean 'epochs'?)",
        ),
    },
    "validate": {
        "detector dataset absent": Case(
            lambda w: ["validate", str(w.detector())],
            "insulators/data.yaml does not exist; set data.yaml",
            _run_dir_and_detector,
            subprocess=True,
        ),
        "missing config file": Case(
            lambda w: ["validate", str(w.tmp / "nope.yaml")],
            "config file '{tmp}/nope.yaml' not found; pass the path of a YAML file",
        ),
        "bad key in the file": Case(
            lambda w: ["validate", str(w.write("bad.yaml", {"trian": {}}))],
            "trian: unknown key (did you mean 'train'?)",
        ),
    },
    "report": {
        "missing run directory": Case(
            lambda w: ["report", str(w.tmp / "runs" / "nope")],
            "config file '{tmp}/runs/nope' not found",
        ),
    },
    "evaluate": {
        "config without a tracking store": Case(
            lambda w: ["evaluate", str(w.classifier())],
            "models:/run-classifier@champion: no MLflow tracking store {tmp}/run/mlflow.db; "
            "run 'edgetune tune' first",
        ),
        "tracking store absent": Case(
            lambda w: ["evaluate", "models:/m@champion", "--tracking-uri", w.store_uri()],
            "models:/m@champion: no MLflow tracking store {tmp}/none/mlflow.db",
            lambda w: [w.tmp / "none"],
        ),
        "not a model": Case(lambda w: ["evaluate", "nonsense"], "expected models:/NAME@ALIAS"),
        "checkpoint without its config": Case(
            lambda w: ["evaluate", str(w.tmp / "weights.pt"), "--float-only"],
            "a checkpoint file needs the config it was trained with (--config)",
        ),
        "target risk above one": Case(
            lambda w: ["evaluate", "models:/m@champion", "--target-risk", "5"],
            "--target-risk 5.0: give a fraction between 0 and 1, e.g. 0.01",
        ),
    },
    "dashboard": {
        "no stored study": Case(
            lambda w: ["dashboard", str(w.classifier())],
            "no study named 'run' in sqlite:///{tmp}/run/optuna.db; run 'edgetune tune",
        ),
    },
    "worker": {
        "no Prefect server named": Case(
            lambda w: ["worker", "--pool", "compile"],
            "PREFECT_API_URL is not set: a worker serves a Prefect server's pool",
        ),
        "poll of zero": Case(
            lambda w: ["worker", "--pool", "compile", "--poll", "0"],
            "Invalid value for '--poll'",
            subprocess=True,
        ),
    },
    "deploy": {
        "malformed deployments file": Case(
            lambda w: ["deploy", "--file", str(w.write("deploy.yaml", "deployments: [a"))],
            "deploy.yaml: malformed YAML",
        ),
        "bad board name": Case(
            lambda w: ["deploy", "--device", "edge 1/b"],
            "device 'edge 1/b' is not a board name",
        ),
    },
    "device check": {
        "missing config file": Case(
            lambda w: ["device", "check", str(w.tmp / "nope.yaml")],
            "config file '{tmp}/nope.yaml' not found",
        ),
    },
    "engine start": {
        "idle of zero": Case(
            lambda w: ["engine", "start", "--idle", "0"],
            "--idle must be a positive number of minutes, not 0",
        ),
    },
    "engine stop": {
        "an unknown option": Case(
            lambda w: ["engine", "stop", "--now"],
            "No such option: --now",
            subprocess=True,
        ),
    },
    "engine status": {
        "an unknown option": Case(
            lambda w: ["engine", "status", "--json"],
            "No such option: --json",
            subprocess=True,
        ),
    },
    "device release": {
        "bad override syntax": Case(
            lambda w: ["device", "release", str(w.classifier()), "device.name"],
            "override 'device.name': expected section.key=value",
        ),
    },
    "data digits": {
        "bad fractions": Case(
            lambda w: ["data", "digits", str(w.run_dir), "--val-fraction", "0.9"],
            "val_fraction and test_fraction must be in (0, 1) and sum below 1",
        ),
    },
    "data relabel": {
        "fixes file absent": Case(
            lambda w: [
                "data",
                "relabel",
                str(w.digits),
                str(w.tmp / "fixed"),
                "--fixes",
                str(w.tmp / "none.csv"),
            ],
            "fixes file {tmp}/none.csv does not exist; give the reviewed doubts.csv",
            lambda w: [w.tmp / "fixed"],
        ),
    },
    "data preview": {
        "a detector config": Case(
            lambda w: ["data", "preview", str(w.detector()), "-o", str(w.tmp / "a.png")],
            "is a detector config: Ultralytics draws its own augmentation; give a classifier",
            lambda w: [w.tmp / "a.png", w.tmp / "detector"],
        ),
        "more images than the data": Case(
            lambda w: ["data", "preview", str(w.classifier()), "--images", "99999"],
            "--images 99999 is more than the 1077 training images of",
            lambda w: [w.tmp / "augmented.png", w.run_dir],
        ),
    },
    "data doubts": {
        "a detector config": Case(
            lambda w: ["data", "doubts", str(w.detector()), "-o", str(w.tmp / "d")],
            "is a detector config: label doubts are found for a classifier's image folders",
            lambda w: [w.tmp / "d", w.tmp / "detector"],
        ),
        "more folds than a class has images": Case(
            lambda w: ["data", "doubts", str(w.classifier()), "--folds=999", f"-o{w.tmp}/d"],
            "fewer than --folds 999: every fold needs each class; lower --folds to",
            lambda w: [w.tmp / "d", w.run_dir],
        ),
    },
    "data split": {
        "fractions that leave no train": Case(
            lambda w: ["data", "split", str(w.digits), str(w.run_dir), "--val=0.6", "--test=0.5"],
            "--val + --test below 1, but got --val 0.6 and --test 0.5",
        ),
        "a detector config for the checkpoint": Case(
            lambda w: [
                *("data", "split", str(w.digits), str(w.run_dir), "--by", "features"),
                *("--checkpoint", str(w.tmp / "m.pt"), "--config", str(w.detector())),
            ],
            "is a detector config; give the classifier config the --checkpoint was trained with",
            _run_dir_and_detector,
        ),
    },
    "data shapes": {
        "no train images": Case(
            lambda w: ["data", "shapes", str(w.run_dir), "--train", "0"],
            "need at least one image per split",
        ),
    },
    "detect train": {
        "detector dataset absent": Case(
            lambda w: ["detect", "train", str(w.detector())],
            "insulators/data.yaml does not exist; set data.yaml",
            _run_dir_and_detector,
        ),
        "unknown Ultralytics key": Case(
            lambda w: ["detect", "train", str(w.detector()), "lr=0.1"],
            "lr: unknown key",
            _run_dir_and_detector,
        ),
    },
    "detect crops": {
        "missing model file": Case(
            lambda w: ["detect", "crops", str(w.tmp / "m.onnx"), str(w.tmp), str(w.run_dir)],
            "model {tmp}/m.onnx does not exist; pass an .onnx file or a name",
        ),
    },
    "detect annotate": {
        "missing model file": Case(
            lambda w: ["detect", "annotate", str(w.tmp / "m.onnx"), str(w.tmp), str(w.run_dir)],
            "model {tmp}/m.onnx does not exist; pass an .onnx file or a name",
        ),
    },
}


def _command_paths(group: TyperGroup, prefix: tuple[str, ...] = ()) -> set[str]:
    paths: set[str] = set()
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            paths |= _command_paths(command, (*prefix, name))
        else:
            paths.add(" ".join((*prefix, name)))
    return paths


def test_every_command_has_a_bad_input_case() -> None:
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    commands = _command_paths(group)
    assert {"tune", "detect train", "data digits"} <= commands  # the walk finds sub-commands
    assert set(CASES) == commands, "give each command a bad-input case in CASES"
    assert all(CASES[command] for command in commands)


def test_prefects_own_temporary_server_gets_as_long_to_start_as_the_projects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With PREFECT_HOME set and no API URL, Prefect starts its own temporary server, whose
    default 20 s to start was too short on a busy machine (a CI run timed out there)."""
    from edgetune import cli, prefect_server

    variable = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what the command sets stays here
    monkeypatch.delenv(variable, raising=False)
    cli._quiet_services(False)
    assert os.environ[variable] == "120" == f"{prefect_server.STARTUP_TIMEOUT_S:g}"
    monkeypatch.setenv(variable, "7")
    cli._quiet_services(False)
    assert os.environ[variable] == "7"  # the user's setting wins


def _subprocess(argv: list[str], tmp: Path) -> tuple[int, str]:
    """The console script as a user runs it (this checkout's code, a private Prefect home)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(tmp / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "",  # the command chooses, as in a terminal
    }
    env = {k: v for k, v in env.items() if v}
    done = subprocess.run(
        [sys.executable, "-m", "edgetune.cli", *argv],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


def _assert_one_error_line(stderr: str, message: str, strict: bool) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert message in errors[0], errors[0]
    if strict:  # a real terminal: nothing but the error line
        assert lines == errors, stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune"], "Missing argument 'config'. (see 'edgetune tune --help')"),
        (
            ["tune", "x.yaml", "--patience", "abc"],
            "Invalid value for '--patience': Input should be a valid integer, unable to parse "
            "string as an integer (see 'edgetune tune --help')",
        ),
        (
            ["detect", "trian"],
            "No such command 'trian'. Did you mean 'train'? (see 'edgetune detect --help')",
        ),
    ],
)
def test_a_usage_error_is_one_line_too(argv: list[str], message: str, tmp_path: Path) -> None:
    """Not typer's usage box: the error and where the help is, exit 2."""
    code, stderr = _subprocess(argv, tmp_path)
    assert code == EXIT_BAD_INPUT
    assert stderr.splitlines() == [f"error: {message}"]


@pytest.mark.parametrize(
    ("command", "case"),
    [(command, case) for command, cases in CASES.items() for case in cases],
)
def test_bad_input_is_one_error_line_exit_2_and_nothing_half_written(
    command: str, case: str, tmp_path: Path, digits_root: Path
) -> None:
    spec = CASES[command][case]
    where = Where(tmp_path, digits_root)
    argv = spec.argv(where)
    before = {p for p in tmp_path.rglob("*")}
    if spec.subprocess:
        code, stderr = _subprocess(argv, tmp_path)
    else:
        result = runner.invoke(app, argv)
        code, stderr = result.exit_code, result.stderr
        assert result.stdout == ""
    assert code == EXIT_BAD_INPUT, stderr
    _assert_one_error_line(stderr, spec.message.format(tmp=tmp_path), strict=spec.subprocess)
    for path in spec.absent(where):
        assert path in before or not path.exists(), f"{path} was created"


# What a flow run prints when an expected error comes from inside it ---------------------


def test_prefect_logs_no_traceback_of_an_expected_error_unless_verbose() -> None:
    """Prefect logs a failed flow run's exception (with its traceback) through the
    ``prefect.flow_runs`` logger to the root's console handler."""
    import io

    from edgetune.cli import _untraced
    from tasks.config import ConfigError

    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(console)
    log = logging.getLogger("prefect.flow_runs")

    def fail(error: Exception) -> None:
        try:
            raise error
        except Exception as exc:
            log.error("Encountered exception during execution: %r", exc, exc_info=True)

    try:
        with _untraced(verbose=False):
            fail(ConfigError("train.lr: bad"))
        assert stream.getvalue() == ""
        with _untraced(verbose=False):
            fail(KeyError("a bug"))  # not expected: its traceback helps
        assert "Traceback" in stream.getvalue() and "KeyError" in stream.getvalue()
        stream.seek(0)
        stream.truncate()
        with _untraced(verbose=True):
            fail(ConfigError("train.lr: bad"))
        assert "Traceback" in stream.getvalue()
        stream.seek(0)
        stream.truncate()
        fail(ConfigError("train.lr: bad"))  # the filter is gone after the run
        assert "ConfigError" in stream.getvalue()
        assert not console.filters
    finally:
        root.removeHandler(console)


@pytest.mark.slow
def test_an_expected_error_inside_the_flow_is_one_line_in_a_terminal(
    tmp_path: Path, digits_root: Path
) -> None:
    """A stored study without a fingerprint that optimises something else: only the flow,
    opening the study, finds it (the check before the flow compares fingerprints)."""
    import optuna

    where = Where(tmp_path, digits_root)
    config = where.classifier()
    where.run_dir.mkdir()
    study = optuna.create_study(study_name="run", storage=f"sqlite:///{where.run_dir}/optuna.db")
    study.set_user_attr("objective", "device_map50_95")
    code, stderr = _subprocess(["tune", str(config)], tmp_path)
    assert code == EXIT_BAD_INPUT, stderr
    _assert_one_error_line(stderr, "optimises device_map50_95, not device_augrc", strict=False)
    assert "Encountered exception" not in stderr
    assert not (where.run_dir / "config.yaml").exists()
