"""Secrets: passwords in URLs are masked wherever recorded, references resolve at use,
host keys are checked by default and remote command lines are quoted.

The command line's own error messages are covered in tests/test_cli.py
(test_unreachable_services_fail_fast_without_the_password).
"""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.config import (
    ConfigError,
    DeviceConfig,
    SshOptions,
    dump_config,
    load_config,
    parse_config,
)
from tasks.devices import RemoteLayout, SshRunner, create_runner
from tasks.devices.ssh import check_work_dir
from tasks.secrets import SecretError, is_secret_ref, resolve_secret, secret_block_name
from tasks.tracking import Tracker, TrackingError, mask_text, mask_uri, one_line

SECRET = "pa55-Secret"
STORAGE = f"postgresql+psycopg2://optuna:{SECRET}@db.example:5432/optuna"
TRACKING = f"https://mlflow:{SECRET}@mlflow.example:5000"
FAST = settings(max_examples=25, deadline=None)


# mask_uri / mask_text / one_line ---------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        (STORAGE, "postgresql+psycopg2://optuna:***@db.example:5432/optuna"),
        (TRACKING, "https://mlflow:***@mlflow.example:5000"),
        (f"postgresql://u:{SECRET}/x@h/db", "postgresql://u:***@h/db"),  # unescaped "/"
        (f"postgresql://u:p@{SECRET}@h/db", "postgresql://u:***@h/db"),  # unescaped "@"
        (f"postgresql://u:{SECRET}@[::1/db", "postgresql://u:***@[::1/db"),  # unparsable
        (f"optuna:{SECRET}@db/optuna", "optuna:***@db/optuna"),  # no scheme
        (
            f"postgresql://db/optuna?sslmode=require&password={SECRET}",
            "postgresql://db/optuna?sslmode=require&password=***",
        ),
        (f"http://h:5000/api?token={SECRET}&x=1", "http://h:5000/api?token=***&x=1"),
        ("postgresql+psycopg2://optuna@db:5432/optuna", None),  # no password: unchanged
        ("http://127.0.0.1:5000", None),
        ("sqlite:////tmp/runs/a@b/optuna.db", None),  # a path with "@" is no password
        ("file:///home/me@corp/mlruns", None),
        ("prefect-secret://optuna-db", None),
    ],
)
def test_mask_uri_hides_passwords(uri: str, masked: str | None) -> None:
    assert mask_uri(uri) == (masked or uri)
    assert SECRET not in mask_uri(uri)


def test_mask_text_and_one_line_hide_urls_inside_messages() -> None:
    text = f"API request to {TRACKING}/api/2.0/x failed\n\tcaused by {STORAGE}"
    assert mask_text(text) == (
        "API request to https://mlflow:***@mlflow.example:5000/api/2.0/x failed\n"
        "\tcaused by postgresql+psycopg2://optuna:***@db.example:5432/optuna"
    )
    assert one_line(RuntimeError(text)) == (
        "API request to https://mlflow:***@mlflow.example:5000/api/2.0/x failed"
    )
    assert one_line(OSError()) == "OSError"
    assert one_line("x" * 500, limit=10) == "x" * 9 + "…"


@FAST
@given(
    user=st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z"),
    password=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="@?#"),
        min_size=4,
        max_size=20,
    ),
    scheme=st.sampled_from(["postgresql+psycopg2", "mysql+pymysql", "http", "https"]),
)
def test_mask_uri_never_shows_the_password(user: str, password: str, scheme: str) -> None:
    uri = f"{scheme}://{user}:{password}@db.example:5432/name"
    assert mask_uri(uri) == f"{scheme}://{user}:***@db.example:5432/name"
    assert mask_text(f"failed: {uri} refused") == f"failed: {mask_uri(uri)} refused"


# Where URLs are recorded -----------------------------------------------------------------


@pytest.fixture
def config_with_secrets(tmp_path: Path) -> dict[str, Any]:
    """A resolved config as a mapping, its URLs with passwords (as a flow parameter could be)."""
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(tmp_path / "data")},
        "study": {"name": "secrets"},
    }
    data = parse_config(raw).model_dump(mode="json")
    data["study"]["storage"], data["tracking"]["uri"] = STORAGE, TRACKING
    return data


def test_flattened_params_mask_urls(config_with_secrets: Any) -> None:
    from tasks.hpo.loop import flatten as _flatten

    flat = _flatten(config_with_secrets)

    assert flat["study.storage"] == mask_uri(STORAGE)
    assert flat["tracking.uri"] == mask_uri(TRACKING)
    assert not [key for key, value in flat.items() if SECRET in str(value)]


def test_the_study_runs_params_in_mlflow_hold_no_password(
    config_with_secrets: Any, tmp_path: Path
) -> None:
    """What the tune flow logs on the study's parent run: `_flatten` of the config."""
    from mlflow import MlflowClient

    from tasks.hpo.loop import flatten as _flatten

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    experiment = tracker.experiment_id("secrets", (tmp_path / "artifacts").as_uri())
    run_id = tracker.start_run(experiment, "study-secrets")
    tracker.log_params(run_id, _flatten(config_with_secrets))

    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["study.storage"] == mask_uri(STORAGE)
    assert params["tracking.uri"] == mask_uri(TRACKING)
    assert not [key for key, value in params.items() if SECRET in value]


@pytest.mark.parametrize(
    ("section", "key", "url"), [("study", "storage", STORAGE), ("tracking", "uri", TRACKING)]
)
def test_a_config_with_a_password_is_refused(
    config_with_secrets: dict[str, Any], section: str, key: str, url: str
) -> None:
    """Configs are saved in the run dir, logged and passed to stages: no password in them."""
    clean = {**config_with_secrets, "study": {**config_with_secrets["study"], "storage": None}}
    clean["tracking"] = {**config_with_secrets["tracking"], "uri": None}
    clean[section] = {**clean[section], key: url}
    with pytest.raises(
        ConfigError, match=rf"{section}\.{key}: holds a password.*prefect-secret://"
    ) as info:
        parse_config(clean)
    assert SECRET not in str(info.value)


def test_urls_from_the_environment_stay_out_of_the_saved_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGETUNE_STORAGE", STORAGE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    config = parse_config(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"root": str(tmp_path / "data")},
            "study": {"name": "env"},
        }
    )
    assert (config.storage_url, config.tracking_uri) == (STORAGE, TRACKING)  # read at use
    saved = dump_config(config)
    assert SECRET not in saved
    monkeypatch.delenv("EDGETUNE_STORAGE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "config.yaml").write_text(saved)
    again = load_config(tmp_path / "config.yaml")
    assert again.storage_url == f"sqlite:///{tmp_path / 'run' / 'optuna.db'}"


def test_a_tracking_error_masks_the_password_mlflow_quotes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    with pytest.raises(TrackingError) as caught:
        Tracker(f"http://mlflow:{SECRET}@127.0.0.1:1").experiment_id("x")

    message = str(caught.value)
    assert message.startswith("cannot use MLflow tracking at http://mlflow:***@127.0.0.1:1: ")
    assert "check tracking.uri (or --tracking-uri, $MLFLOW_TRACKING_URI)" in message
    assert SECRET not in message and "\n" not in message


# prefect-secret:// references ------------------------------------------------------------


def _blocks(**stored: Any) -> Any:
    def load(name: str) -> Any:
        if name not in stored:
            raise ValueError(f"Unable to find block document named {name} for block type secret")
        value = stored[name]
        if isinstance(value, BaseException):
            raise value
        return value

    return load


def test_plain_values_are_returned_unchanged() -> None:
    def load(name: str) -> Any:
        raise AssertionError("no block is read for a plain value")

    assert resolve_secret(STORAGE, key="study.storage", load=load) == STORAGE
    assert resolve_secret(None, key="study.storage", load=load) is None
    assert not is_secret_ref(STORAGE) and is_secret_ref("prefect-secret://optuna-db")


def test_a_reference_resolves_to_the_blocks_value() -> None:
    load = _blocks(**{"optuna-db": f" {STORAGE}\n"})
    assert resolve_secret("prefect-secret://optuna-db", key="study.storage", load=load) == STORAGE


@pytest.mark.parametrize(
    ("reference", "blocks", "message"),
    [
        (
            "prefect-secret://Optuna DB",
            {},
            r"^study\.storage: 'prefect-secret://Optuna DB' does not name a Prefect Secret "
            r"block; write prefect-secret://<name> with a block name of lowercase letters",
        ),
        (
            "prefect-secret://",
            {},
            r"^study\.storage: 'prefect-secret://' does not name a Prefect Secret block",
        ),
        (
            "prefect-secret://optuna-db",
            {},
            r"^study\.storage: no Prefect Secret block named 'optuna-db' on this Prefect server; "
            r"create it with Secret\(value=\.\.\.\)\.save\('optuna-db'\)",
        ),
        (
            "prefect-secret://optuna-db",
            {"optuna-db": {"url": STORAGE}},
            r"^study\.storage: the Prefect Secret block 'optuna-db' holds a dict; save the URL "
            r"itself as a string",
        ),
        (
            "prefect-secret://optuna-db",
            {"optuna-db": "  "},
            r"^study\.storage: the Prefect Secret block 'optuna-db' holds an empty string",
        ),
        (
            "prefect-secret://optuna-db",
            {"optuna-db": "prefect-secret://other"},
            r"^study\.storage: the Prefect Secret block 'optuna-db' holds another reference",
        ),
        (
            "prefect-secret://optuna-db",
            {"optuna-db": ConnectionError(f"cannot reach http://u:{SECRET}@prefect:4200/api\nx")},
            r"^study\.storage: cannot read the Prefect Secret block 'optuna-db' "
            r"\(ConnectionError: cannot reach http://u:\*\*\*@prefect:4200/api\); check that "
            r"the Prefect server at PREFECT_API_URL is running$",
        ),
    ],
    ids=["bad-name", "no-name", "missing", "not-a-string", "empty", "nested", "server-down"],
)
def test_unresolvable_references_are_one_line_errors(
    reference: str, blocks: dict[str, Any], message: str
) -> None:
    with pytest.raises(SecretError) as caught:
        resolve_secret(reference, key="study.storage", load=_blocks(**blocks))
    text = str(caught.value)
    assert "\n" not in text and SECRET not in text
    assert re.search(message, text), text


def test_block_names_are_checked() -> None:
    assert secret_block_name("prefect-secret://optuna-db/", key="k") == "optuna-db"
    with pytest.raises(SecretError, match=r"^k: '\.\./x' does not name"):
        secret_block_name("../x", key="k")


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_server")
def test_a_reference_resolves_through_the_prefect_api() -> None:
    from prefect.blocks.system import Secret

    Secret(value=STORAGE).save("edgetune-test-storage", overwrite=True)

    assert resolve_secret("prefect-secret://edgetune-test-storage", key="study.storage") == STORAGE
    with pytest.raises(SecretError, match=r"no Prefect Secret block named 'edgetune-test-nope'"):
        resolve_secret("prefect-secret://edgetune-test-nope", key="study.storage")


# SSH: host keys checked by default, commands quoted, paths inside work_dir ----------------


def test_host_key_checking_is_on_by_default(tmp_path: Path) -> None:
    options = SshOptions(host="192.0.2.10", user="pi")
    assert options.check_host_key is True
    device = DeviceConfig(runner="ssh", ssh=options)
    assert device.runner_options()["check_host_key"] is True

    runner = create_runner("ssh", **device.runner_options())
    assert isinstance(runner, SshRunner) and runner.check_host_key is True
    # () is asyncssh's "verify against ~/.ssh/known_hosts"; None would verify nothing
    assert runner._connect_options()["known_hosts"] == ()

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    pinned = create_runner("ssh", host="h", user="u", known_hosts=str(known_hosts))
    assert isinstance(pinned, SshRunner)
    assert pinned._connect_options()["known_hosts"] == str(known_hosts)
    unchecked = create_runner("ssh", host="h", user="u", check_host_key=False)
    assert isinstance(unchecked, SshRunner)
    assert unchecked._connect_options()["known_hosts"] is None  # only when asked for


def test_the_ssh_key_comes_from_a_file_not_the_config() -> None:
    fields = set(SshOptions.model_fields)
    assert "key_file" in fields
    assert not fields & {"password", "key", "private_key", "passphrase"}


awkward = st.text(
    st.characters(min_codepoint=0x01, max_codepoint=0x2FF, blacklist_categories=["Cs"]),
    max_size=12,
)


@FAST
@given(argv=st.lists(awkward, max_size=5))
def test_remote_command_lines_pass_every_argument_verbatim(
    argv: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("cmd")
    script = folder / "it's $(touch pwned) `x`; echo.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    runner = SshRunner(host="h", user="u", python=sys.executable, timeout_s=30)

    command = runner._command(str(script), argv)
    done = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=30, cwd=folder
    )

    assert done.returncode == 0, done.stderr
    pid, printed = done.stdout.splitlines()[:2]
    assert pid.isdigit()
    assert json.loads(printed) == argv
    assert not (folder / "pwned").exists()


def test_a_home_relative_python_is_quoted_after_home() -> None:
    runner = SshRunner(host="h", user="u", python="~/venv with space/bin/python3")
    command = runner._command("edgetune/evaluator/x.py", ["info"])
    assert "\"$HOME\"/'venv with space/bin/python3' edgetune/evaluator/x.py info" in command


@FAST
@given(
    parts=st.lists(
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="/"),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=4,
    ),
    absolute=st.booleans(),
    run_id=st.from_regex(r"\A[0-9a-f]{32}\Z"),
)
def test_remote_paths_stay_inside_the_work_dir(
    parts: list[str], absolute: bool, run_id: str
) -> None:
    work_dir = ("/" if absolute else "") + "/".join(parts)
    try:
        normal = check_work_dir(work_dir)
    except ValueError as exc:
        assert str(exc).startswith(f"device.ssh.work_dir {work_dir!r} ")
        assert ".." in parts or work_dir.startswith(("-", "~"))
        return
    assert ".." not in normal.split("/")
    layout = RemoteLayout(work_dir)
    for path in (layout.evaluator(), layout.bundle(run_id), layout.run(run_id), layout.runs):
        assert posixpath.normpath(path) == path
        assert path == normal or path.startswith(normal.rstrip("/") + "/") or normal == "."
        if normal == ".":
            assert not path.startswith(("/", ".."))
