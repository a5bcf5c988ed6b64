"""The command line: bad input is refused in one line before anything is created."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from edgetune.cli import app

from board import Board, free_port, known_hosts_line, start_board
from conftest import tiny_config

runner = CliRunner()


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("tune", "report", "validate", "data"):
        assert command in result.output


def _broken_dataset(digits_root: Path, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(digits_root, root)
    if how == "empty class":
        for image in (root / "train" / "2").iterdir():
            image.unlink()
    elif how == "corrupt image":
        next((root / "val" / "4").iterdir()).write_bytes(b"not an image")
    elif how == "classes differ":
        shutil.rmtree(root / "val" / "9")
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing dataset", r"error: dataset folder .*nowhere not found"),
        ("empty class", r"error: class folder .*train/2 has no images"),
        ("corrupt image", r"error: corrupt image .*val/4/"),
        (
            "classes differ",
            r"error: class folders differ between train/ and val/.*only in train: \['9'\]",
        ),
        ("typo", r"error: .*train\.epoch: unknown key \(did you mean 'epochs'\?\)"),
        (
            "inverted range",
            r"error: .*study\.search_space\.lr: low <= high must hold, but got low=0\.5, high=0\.01",
        ),
        ("hailo", r"error: compiler 'hailo' needs the Hailo Dataflow Compiler.*onnxruntime-int8"),
        (
            "time budget",
            r"error: .*study\.time_budget: '6x' is not a duration; write e\.g\. 6h, 90m",
        ),
        ("space file", r"error: study\.search_space: file .*none\.yaml' not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_created(
    digits_root: Path, tmp_path: Path, case: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    root = digits_root
    overrides: list[str] = []
    if case == "missing dataset":
        root = tmp_path / "nowhere"
    elif case in ("empty class", "corrupt image", "classes differ"):
        root = _broken_dataset(digits_root, tmp_path, case)
    elif case == "typo":
        overrides = ["train.epoch=3"]
    elif case == "inverted range":
        overrides = ["study.search_space.lr.low=0.5", "study.search_space.lr.high=0.01"]
    elif case == "hailo":
        overrides = ["compile.backend=hailo"]
    elif case == "time budget":
        overrides = ["--time-budget", "6x"]
    elif case == "space file":
        overrides = [f"study.search_space={tmp_path / 'none.yaml'}"]
    config = _write(tmp_path, tiny_config(root, run_dir))
    result = runner.invoke(app, ["tune", str(config), *overrides])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(message, lines[0]), lines[0]
    assert not run_dir.exists()  # no study, no tracking store, no run folder


def test_validate_reports_the_dataset(digits_root: Path, tmp_path: Path) -> None:
    config = _write(tmp_path, tiny_config(digits_root, tmp_path / "run"))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']" in result.output
    assert not (tmp_path / "run").exists()


def test_data_digits_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    result = runner.invoke(app, ["data", "digits", str(tmp_path / "mine")])
    assert result.exit_code == 2
    assert "not an edgetune digits folder" in result.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_tune_then_report(digits_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"
    config = _write(tmp_path, tiny_config(digits_root, run_dir))
    result = runner.invoke(app, ["tune", str(config), "study.n_trials=2"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "2 complete, 0 pruned, 0 failed" in result.stdout, result.stdout[-2500:]
    # no terminal: the progress is plain lines on stderr, one per event, each outcome too
    for n in (0, 1):
        assert re.search(
            rf"^\[\d+:\d\d elapsed, ETA [\d:?]+\] trial {n}: COMPLETE, device AUGRC 0\.\d{{5}} ",
            result.stderr,
            re.MULTILINE,
        ), result.stderr
    assert "models:/cli-classifier@champion (version 1)" in result.stdout.replace("\n", "")

    report = runner.invoke(app, ["report", str(run_dir), "--json"])
    assert report.exit_code == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["counts"]["COMPLETE"] == 2
    assert [row["state"] for row in data["trials"]] == ["COMPLETE", "COMPLETE"]
    best = min(data["trials"], key=lambda row: row["device_augrc"])
    assert data["best"]["trial"] == best["trial"] == data["champion"]["trial"]
    assert set(best["params"]) == {"lr", "momentum"}

    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.stderr


# Bad input, end to end: every class of mistake is one line, exit 2, nothing created ------


def _tiny_weights(tmp_path: Path, how: str) -> Path:
    path = tmp_path / ("model.onnx" if how == "onnx" else "weights.pt")
    if how == "other width":
        import torch

        from tasks.models import TinyCNN

        torch.save(TinyCNN(10, width=8).state_dict(), path)
    else:
        path.write_bytes(b"\x08\x07 not a torch checkpoint")
    return path


def _config_text(digits_root: Path, tmp_path: Path, case: str) -> tuple[str, list[str]]:
    """The study file (as text) and the overrides of one bad-input case."""
    raw = tiny_config(digits_root, tmp_path / "run")
    space = raw["study"]["search_space"]
    overrides: list[str] = []
    ssh = {"host": "127.0.0.1", "user": "pi", "known_hosts": str(tmp_path / "known_hosts")}
    (tmp_path / "known_hosts").write_text("")
    if case == "malformed yaml":
        return "data: {root: x\nstudy: {name: s}\n", []
    if case == "not a mapping":
        return "- data\n- study\n", []
    if case == "unknown section":
        raw["trainer"] = {"lr": 0.1}
    elif case == "unknown search-space key":
        space["lr"]["lg"] = True
    elif case == "unknown ssh key":
        raw["device"].update(runner="ssh", ssh={**ssh, "hostname": "pi.local"})
    elif case == "wrong type":
        raw["train"]["epochs"] = "ten"
    elif case == "string for a number":
        raw["train"]["lr"] = "0.1"
    elif case == "empty choices":
        space["momentum"] = {"type": "categorical", "choices": []}
    elif case == "missing bound":
        space["lr"] = {"type": "float", "low": 0.01}
    elif case == "non-finite bound":
        space["lr"]["high"] = float("inf")
    elif case == "inverted int range":
        space["batch_size"] = {"type": "int", "low": 64, "high": 8}
    elif case == "log range from zero":
        space["lr"]["low"] = 0
    elif case == "selection on test":
        overrides = ["data.eval_split=test"]
    elif case == "zero epochs":
        raw["train"]["epochs"] = 0
    elif case == "negative batch size":
        raw["train"]["batch_size"] = -4
    elif case == "batch size range from zero":
        space["batch_size"] = {"type": "int", "low": 0, "high": 64}
    elif case == "momentum range reaches 1":
        space["momentum"]["high"] = 1.0
    elif case == "empty dataset":
        (tmp_path / "empty").mkdir()
        raw["data"]["root"] = str(tmp_path / "empty")
    elif case in ("onnx as weights", "garbage weights", "weights of another width"):
        how = {"onnx as weights": "onnx", "garbage weights": "garbage"}.get(case, "other width")
        raw["model"]["weights"] = str(_tiny_weights(tmp_path, how))
    elif case == "ssh key file missing":
        raw["device"].update(runner="ssh", ssh={**ssh, "key_file": str(tmp_path / "id_none")})
    elif case == "ssh known_hosts missing":
        raw["device"].update(runner="ssh", ssh={**ssh, "known_hosts": str(tmp_path / "kh")})
    elif case == "ssh work_dir escapes":
        raw["device"].update(runner="ssh", ssh={**ssh, "work_dir": "../elsewhere"})
    elif case == "bad override":
        overrides = ["study.search_space.lr={type: float"]
    return yaml.safe_dump(raw), overrides


BAD_INPUT = [
    ("malformed yaml", r"study\.yaml: malformed YAML at line 2, column \d+: .*; fix the syntax"),
    (
        "not a mapping",
        r"expected a mapping of sections at the top .*; start from configs/quickstart\.yaml",
    ),
    (
        "unknown section",
        r"trainer: unknown key \(did you mean 'train'\?\); allowed keys here: compile, data,",
    ),
    (
        "unknown search-space key",
        r"study\.search_space\.lr\.lg: unknown key \(did you mean 'log'\?\); "
        r"allowed keys here: choices, high, log, low, step, type",
    ),
    (
        "unknown ssh key",
        r"device\.ssh\.hostname: unknown key \(did you mean 'host'\?\); allowed keys here: .*port",
    ),
    ("wrong type", r"train\.epochs: Input should be a valid integer, but got 'ten'"),
    (
        "selection on test",
        r"data\.eval_split: test would choose the hyperparameters on the test split, which is "
        r"kept for the final report",
    ),
    ("string for a number", r"train\.lr: Input should be a valid number, but got '0\.1'"),
    ("empty choices", r"study\.search_space\.momentum: categorical needs a non-empty 'choices'"),
    ("missing bound", r"study\.search_space\.lr: float needs both 'low' and 'high'"),
    (
        "non-finite bound",
        r"study\.search_space\.lr: low and high must be finite, but got low=0\.01, high=inf; "
        r"give finite bounds",
    ),
    (
        "inverted int range",
        r"study\.search_space\.batch_size: low <= high must hold, but got low=64\.0, high=8\.0; "
        r"swap them",
    ),
    (
        "log range from zero",
        r"study\.search_space\.lr: log scale needs low > 0, but got low=0\.0; raise low",
    ),
    ("zero epochs", r"train\.epochs: Input should be greater than 0, but got 0"),
    ("negative batch size", r"train\.batch_size: Input should be greater than 0, but got -4"),
    (
        "batch size range from zero",
        r"study\.search_space\.batch_size: a trial could draw 0, which train\.batch_size "
        r"refuses \(Input should be greater than 0\); keep the range inside",
    ),
    (
        "momentum range reaches 1",
        r"study\.search_space\.momentum: a trial could draw 1\.0, which train\.momentum refuses "
        r"\(Input should be less than 1\)",
    ),
    ("empty dataset", r"dataset .*/empty has no train/ val/ folder; expected train/, val/"),
    (
        "onnx as weights",
        r"model\.weights: weights file .*model\.onnx is an ONNX model, but weights must be a "
        r"torch state_dict .*torch\.save\(model\.state_dict\(\), path\)",
    ),
    (
        "garbage weights",
        r"model\.weights: weights file .*weights\.pt is not a torch checkpoint of tensors "
        r"\(\w+\); give a state_dict of model\.arch",
    ),
    (
        "weights of another width",
        r"model\.weights: weights file .* does not fit this architecture: 15 tensors have "
        r"another shape \(e\.g\. features\.0\.0\.weight \[8, 3, 3, 3\] vs \[16, 3, 3, 3\]\)",
    ),
    (
        "ssh key file missing",
        r"device test-run: SSH key file .*id_none \(device\.ssh\.key_file\) does not exist; "
        r"give the path",
    ),
    (
        "ssh known_hosts missing",
        r"device test-run: known_hosts file .*/kh does not exist; create it with "
        r"`ssh-keyscan -p 22 127\.0\.0\.1 >> .*/kh`",
    ),
    (
        "ssh work_dir escapes",
        r"device\.ssh\.work_dir '\.\./elsewhere' contains '\.\.'; use a plain directory",
    ),
    (
        "bad override",
        r"override 'study\.search_space\.lr=\{type: float': value is not valid YAML "
        r"\(expected ',' or '\}', but got '<stream end>'\); quote the whole override",
    ),
]


@pytest.mark.parametrize(("case", "message"), BAD_INPUT, ids=[case for case, _ in BAD_INPUT])
def test_bad_config_is_one_line_exit_2_and_nothing_created(
    digits_root: Path, tmp_path: Path, case: str, message: str
) -> None:
    text, overrides = _config_text(digits_root, tmp_path, case)
    config = tmp_path / "study.yaml"
    config.write_text(text)
    for command in ("validate", "tune"):
        result = runner.invoke(app, [command, str(config), *overrides])
        assert result.exit_code == 2, (command, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (command, lines)
        assert lines[0].startswith("error: ")
        assert re.search(message, lines[0]), (command, lines[0])
        assert result.stdout == ""
        assert not (tmp_path / "run").exists()  # no run folder, study or tracking store


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    for command in (["validate"], ["tune"], ["device", "check"]):
        result = runner.invoke(app, [*command, str(tmp_path / "nope.yaml")])
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            f"error: config file '{tmp_path / 'nope.yaml'}' not found; pass the path of a YAML file"
        )


# Unreachable services: fail fast, one line, no password, nothing created ------------------

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    ("options", "env", "message"),
    [
        (
            ["--storage", f"postgresql+psycopg2://optuna:{SECRET}@127.0.0.1:1/optuna"],
            {},
            r"^error: cannot connect to the Optuna storage database "
            r"postgresql\+psycopg2://optuna:\*\*\*@127\.0\.0\.1:1/optuna: connection to server "
            r"at \"127\.0\.0\.1\", port 1 failed: Connection refused; check study\.storage "
            r"\(or --storage, \$EDGETUNE_STORAGE\) and that the database is running$",
        ),
        (
            [],
            {"EDGETUNE_STORAGE": f"postgresql+psycopg2://optuna:{SECRET}@127.0.0.1:1/optuna"},
            r"^error: cannot connect to the Optuna storage database "
            r"postgresql\+psycopg2://optuna:\*\*\*@127\.0\.0\.1:1/optuna: .*Connection refused",
        ),
        pytest.param(
            ["--storage", f"postgresql://optuna:{SECRET}@127.0.0.1:1/optuna"],
            {},
            r"^error: study\.storage: the database driver for postgresql:// is not installed "
            r"\(No module named 'psycopg'\); use postgresql\+psycopg2://",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("psycopg") is not None,
                reason="psycopg (3) is installed here, so postgresql:// has its driver",
            ),
        ),
        (
            ["--storage", f"optuna:{SECRET}@127.0.0.1/optuna"],
            {},
            r"^error: study\.storage: optuna:\*\*\*@127\.0\.0\.1/optuna is not a database URL; "
            r"write it as dialect\+driver://user@host:port/database",
        ),
        (
            ["--tracking-uri", f"http://mlflow:{SECRET}@127.0.0.1:1"],
            {},
            r"^error: cannot reach the MLflow tracking server http://mlflow:\*\*\*@127\.0\.0\.1:1: "
            r"ConnectionRefusedError: .*; check tracking\.uri \(or --tracking-uri, "
            r"\$MLFLOW_TRACKING_URI\) and that the server is running$",
        ),
        (
            [],
            {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
            r"^error: cannot reach the MLflow tracking server http://127\.0\.0\.1:1: ",
        ),
    ],
    ids=[
        "storage",
        "storage-env",
        "storage-driver",
        "storage-no-scheme",
        "tracking",
        "tracking-env",
    ],
)
def test_unreachable_services_fail_fast_without_the_password(
    digits_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    import tasks.preflight  # noqa: F401  # imports outside the timed part

    for key in ("EDGETUNE_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    config = _write(tmp_path, tiny_config(digits_root, run_dir))
    start = time.monotonic()
    result = runner.invoke(app, ["tune", str(config), *options])
    elapsed = time.monotonic() - start

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(message, lines[0]), lines[0]
    assert SECRET not in result.output + result.stderr
    assert not run_dir.exists()
    assert elapsed < 15  # no retries with backoff: MLflow's own would take minutes


# `edgetune device check` against a real SSH server on 127.0.0.1 ----------------------------


@pytest.fixture(scope="module")
def ssh_board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    with start_board(tmp_path_factory.mktemp("cli-board")) as board:
        yield board


def _device_config(tmp_path: Path, board: Board, **ssh: Any) -> Path:
    work_dir = tmp_path / "remote"
    options = board.runner_options(work_dir=str(work_dir), **ssh)
    raw = tiny_config(tmp_path / "data", tmp_path / "run", device={"runner": "ssh", "ssh": options})
    return _write(tmp_path, raw)


@pytest.mark.integration
def test_device_check_reports_the_board(ssh_board: Board, tmp_path: Path) -> None:
    result = runner.invoke(app, ["device", "check", str(_device_config(tmp_path, ssh_board))])

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["device"] == "test-run" and info["host"] == "127.0.0.1"
    assert info["work_dir"] == str(tmp_path / "remote")


@pytest.mark.integration
@pytest.mark.parametrize("case", ["unknown host key", "wrong client key"])
def test_device_check_refuses_untrusted_ssh_in_one_line(
    ssh_board: Board, tmp_path: Path, case: str
) -> None:
    import asyncssh

    stranger = asyncssh.generate_private_key("ssh-ed25519")
    if case == "unknown host key":
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(known_hosts_line(ssh_board.host, ssh_board.port, stranger))
        config = _device_config(tmp_path, ssh_board, known_hosts=str(known_hosts))
        expected = (
            rf"^error: device test-run: the host key of 127\.0\.0\.1:{ssh_board.port} is not "
            rf"trusted \(.*\); if this is the right board, add its key to known_hosts with "
            rf"`ssh-keyscan -p {ssh_board.port} 127\.0\.0\.1 >> {re.escape(str(known_hosts))}`, "
            r"or set device\.ssh\.check_host_key: false knowingly$"
        )
    else:
        key_file = tmp_path / "id_stranger"
        key_file.write_bytes(stranger.export_private_key())
        key_file.chmod(0o600)
        config = _device_config(tmp_path, ssh_board, key_file=str(key_file), retries=2)
        expected = (
            rf"^error: device test-run: SSH authentication failed for {ssh_board.user}@"
            rf"127\.0\.0\.1:{ssh_board.port} with key file {re.escape(str(key_file))}: add its "
            r"public key to ~/\.ssh/authorized_keys .*, or set device\.ssh\.key_file / "
            r"device\.ssh\.user$"
        )

    result = runner.invoke(app, ["device", "check", str(config)])

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "remote").exists()  # nothing was sent to the board


@pytest.mark.integration
def test_device_check_on_a_closed_port_is_a_fault_not_bad_input(
    ssh_board: Board, tmp_path: Path
) -> None:
    port = free_port()
    config = _device_config(tmp_path, ssh_board, port=port, retries=0)

    result = runner.invoke(app, ["device", "check", str(config)])

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: device test-run: cannot reach the device at 127.0.0.1:{port} after 1 "
        f"attempt(s) (device.ssh.retries=0); last error: {lines[0].split('last error: ')[1]}"
    ]
    assert "ConnectionRefusedError" in lines[0]


def test_evaluate_names_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from tasks.tracking import Tracker

    Tracker(uri).client.search_experiments()  # a store without the model (none: refused)
    cases = [
        (["nonsense"], "expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a"),
        (["runs:/0123abc", "--tracking-uri", uri], "model 'runs:/0123abc' is not in the tracking"),
        (["models:/m@champion"], "models:/m@champion: no tracking URI; give --tracking-uri"),
        (["models:/m@champion", "--tracking-uri", uri], "model 'models:/m@champion' is not in"),
        (["models:/m/1", "--split", "train"], "--split train: choose test"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["evaluate", *args])
        assert result.exit_code == 2, result.output
        # one line (MLflow's own start-up logging may come before it in this process)
        [error] = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert message in error, result.output


# Overrides on the command line: over every variant, Ultralytics' flat keys -----------------


def test_validate_says_which_variant_setting_an_override_replaced(
    digits_root: Path, tmp_path: Path
) -> None:
    raw = tiny_config(digits_root, tmp_path / "run")
    raw["variants"] = [
        {"name": "tiny", "set": {"train.lr": 0.02}},
        {"name": "r18", "set": {"model.arch": "resnet18"}},
    ]
    config = _write(tmp_path, raw)
    result = runner.invoke(app, ["validate", str(config), "train.lr=0.05"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: override train.lr=0.05 applies to every variant: it replaces variant "
        "tiny's set.train.lr"
    ]
    same = runner.invoke(app, ["validate", str(config), "model.arch=resnet18", "train.lr=0.1"])
    assert same.exit_code == 2
    assert same.stderr.strip() == (
        "error: override model.arch=resnet18, train.lr=0.1 replaces what tells variants tiny "
        "and r18 apart (their set:), so both would be the same run; drop the override to "
        "compare them, or add variants=[] to run one study with it"
    )


def test_detect_train_takes_ultralytics_flat_keys(tmp_path: Path) -> None:
    config = tmp_path / "s-ml.yaml"
    config.write_text(
        (Path(__file__).parents[1] / "configs" / "detectors" / "s-ml.yaml").read_text()
    )
    data = tmp_path / "elsewhere" / "data.yaml"
    result = runner.invoke(
        app, ["detect", "train", str(config), f"data={data}", "epochs=1", "imgsz=64", "batch=2"]
    )
    assert result.exit_code == 2
    # data= is data.yaml: the file is looked for (it used to be refused as the section)
    assert result.stderr.strip() == (
        f"error: data.yaml {data} does not exist; set data.yaml to the dataset's file"
    )
    assert not (tmp_path / "runs").exists()
