"""The imports ``edgetune tune`` makes in the background while it waits (``edgetune.warmup``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_the_thread_imports_what_it_can_and_leaves_a_failure_to_the_command() -> None:
    found = _run(
        "import sys\n"
        "from edgetune import warmup\n"
        "thread = warmup.start(['no_such_module_here', 'colorsys', 'wave'])\n"
        "warmup.wait(60)\n"
        "print(thread.daemon, thread.is_alive(), 'colorsys' in sys.modules, 'wave' in sys.modules)\n"
    )
    assert found == ["True", "False", "True", "True"]


def test_every_module_named_for_tune_exists() -> None:
    """A renamed module would be skipped in silence; the list stays true to the code."""
    import importlib
    from importlib.util import find_spec

    from edgetune.warmup import TUNE_MODULES

    names = [name.partition(":") for name in TUNE_MODULES]
    assert [module for module, _, _ in names if find_spec(module) is None] == []
    steps = [(module, call) for module, _, call in names if call]
    assert all(callable(getattr(importlib.import_module(m), c)) for m, c in steps), steps


def test_the_command_line_alone_imports_no_torch() -> None:
    """Only ``tune`` starts the imports: ``--help`` and the other commands stay light."""
    found = _run(
        "import sys, threading\n"
        "import edgetune.cli\n"
        "print('torch' in sys.modules, [t.name for t in threading.enumerate()])\n"
    )
    assert found == ["False", "['MainThread']"]
