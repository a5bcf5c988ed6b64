"""Checks that run before a study is created, so bad input creates nothing."""

from __future__ import annotations

from pathlib import Path

from tasks.config import ConfigError, EdgetuneConfig
from tasks.data import DatasetInfo, inspect_dataset


def preflight(config: EdgetuneConfig) -> DatasetInfo:
    """Dataset readable and consistent, weights present, toolchain installed."""
    from tasks.compilers import COMPILERS

    info = inspect_dataset(config.data.root)
    if config.model.weights and not Path(config.model.weights).is_file():
        raise ConfigError(
            f"model.weights: file {config.model.weights} not found; give a local weights file "
            f"or remove the key to train from scratch"
        )
    COMPILERS[config.compile.backend].check_available()
    return info
