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
    check_shared_services(config)
    return info


def check_shared_services(config: EdgetuneConfig) -> None:
    """Stages on work pools run on other hosts: storage and tracking must be servers."""
    from tasks.config import STORAGE_ENV, TRACKING_ENV
    from tasks.tracking import mask_uri

    if config.orchestration.mode != "deployments":
        return
    for key, url, env in (
        ("study.storage", config.storage_url, STORAGE_ENV),
        ("tracking.uri", config.tracking_uri, TRACKING_ENV),
    ):
        if url.startswith(("sqlite:", "file:")) or "://" not in url:
            raise ConfigError(
                f"{key}: orchestration.mode 'deployments' runs stages on other hosts, but "
                f"{key} resolves to the local file {mask_uri(url)}; set {key} or ${env} to a "
                f"server (see infra/services.sh env)"
            )
