"""Device runners: run the shipped evaluator (`edgetune_eval.py`) on a device.

`create_runner(name, **options)` is the factory the device stage uses; `RUNNERS` maps the
config's `device.runner` names to implementations.
"""

from __future__ import annotations

from typing import Any

from tasks.devices.base import (
    DeviceConfigError,
    DeviceError,
    DeviceResult,
    DeviceRunner,
    DeviceUnreachableError,
    evaluator_path,
    evaluator_version,
)
from tasks.devices.local import LocalRunner
from tasks.devices.ssh import RemoteLayout, SshRunner

RUNNERS: dict[str, type[DeviceRunner]] = {
    LocalRunner.name: LocalRunner,
    SshRunner.name: SshRunner,
}


def create_runner(name: str, **options: Any) -> DeviceRunner:
    """Build the runner registered as `name` with its options."""
    try:
        cls = RUNNERS[name]
    except KeyError:
        raise ValueError(
            f"unknown device runner {name!r}; known runners: {sorted(RUNNERS)} "
            "(set device.runner to one of them)"
        ) from None
    return cls(**options)


__all__ = [
    "RUNNERS",
    "DeviceConfigError",
    "DeviceError",
    "DeviceResult",
    "DeviceRunner",
    "DeviceUnreachableError",
    "LocalRunner",
    "RemoteLayout",
    "SshRunner",
    "create_runner",
    "evaluator_path",
    "evaluator_version",
]
