"""The embedded mode as a user starts it: no Prefect server, the installed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config

EDGETUNE = str(Path(sys.executable).parent / "edgetune")


def test_the_version_is_the_installed_packages(tmp_path: Path) -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [EDGETUNE, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, f"edgetune {version('edgetune')}\n")
    assert list(tmp_path.iterdir()) == []  # nothing written, no Prefect state made


@pytest.mark.integration
@pytest.mark.slow
def test_an_embedded_study_keeps_its_prefect_state_in_the_project(
    digits_root: Path, tmp_path: Path
) -> None:
    """Not in ~/.prefect, shared with every other study of the machine: the temporary
    Prefect server of an embedded run keeps its runs in the project's .prefect/."""
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    raw = tiny_config(digits_root, project / "runs" / "emb", study={"n_trials": 1, "parallel": 1})
    (project / "emb.yaml").write_text(yaml.safe_dump(raw))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") or key == "PREFECT_SERVER_ANALYTICS_ENABLED"
    }
    env["HOME"] = str(home)
    done = subprocess.run(
        [EDGETUNE, "tune", "emb.yaml", "--json"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (project / ".prefect" / "prefect.db").stat().st_size > 0
    assert not (home / ".prefect" / "prefect.db").exists()

    import sqlite3

    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        names = [row[0] for row in db.execute("select name from flow_run")]
    assert "tune-emb" in names
