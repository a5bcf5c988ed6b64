"""The systemd unit of the workers (``infra/systemd/edgetune-worker@.service``): each
instance starts the worker of its pool, one per GPU slot where the instance names one.

The unit's command line is run as systemd would run it (its specifiers and ``$$`` resolved,
its words split), with the installed ``edgetune`` and ``prefect`` replaced by scripts that
print what they were called with.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "infra" / "systemd" / "edgetune-worker@.service"
VENV_BIN = "/opt/edgetune/.venv/bin/"


def _values(key: str) -> list[str]:
    return [
        line.partition("=")[2]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def _resolved(value: str, instance: str, host: str) -> list[str]:
    """A command line's words as systemd runs them for ``instance`` on ``host``."""
    specifiers = {"i": instance, "H": host, "%": "%"}
    line = re.sub(r"%(.)", lambda m: specifiers[m.group(1)], value)
    return [word.replace("$$", "$") for word in shlex.split(line)]


def _started(instance: str, tmp_path: Path) -> list[str]:
    """What the unit's ExecStart starts for ``instance``: the program's name and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("edgetune", "prefect"):
        stub = bin_dir / name
        stub.write_text('#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@"\n')
        stub.chmod(0o755)
    [exec_start] = _values("ExecStart")
    words = [w.replace(VENV_BIN, f"{bin_dir}/") for w in _resolved(exec_start, instance, "h1")]
    done = subprocess.run(words, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    ("instance", "started"),
    [
        (
            "controller",
            "prefect worker start --pool controller --type process --name controller-h1",
        ),
        ("gpu", "edgetune worker --pool gpu --name gpu-h1 --limit 1 --poll 1"),
        ("gpu-1", "edgetune worker --pool gpu --name gpu-1-h1 --limit 1 --poll 1"),
        ("gpu-2", "edgetune worker --pool gpu --name gpu-2-h1 --limit 1 --poll 1"),
        ("compile", "edgetune worker --pool compile --name compile-h1 --limit 1 --poll 0.25"),
        ("edge", "edgetune worker --pool edge --name edge-h1 --limit 1 --poll 0.25"),
    ],
)
def test_each_instance_starts_the_worker_of_its_pool(
    instance: str, started: str, tmp_path: Path
) -> None:
    assert _started(instance, tmp_path) == started.split()


def test_a_gpu_slot_reads_its_own_settings_after_the_shared_ones() -> None:
    # CUDA_VISIBLE_DEVICES of gpu-2 comes from worker-gpu-2.env; the file is optional ("-").
    assert [_resolved(v, "gpu-2", "h1") for v in _values("EnvironmentFile")] == [
        ["/etc/edgetune/services.env"],
        ["-/etc/edgetune/worker-gpu-2.env"],
    ]
    # Each slot keeps its own state (Prefect's home): two slots never share one.
    assert _resolved(_values("StateDirectory")[0], "gpu-2", "h1") == ["edgetune/worker-gpu-2"]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "edgetune-worker@gpu-2.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
