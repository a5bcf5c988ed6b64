"""Classifier configs in: shape validated by the models, then what spans several of
them (variants), then paths made absolute."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from tasks.config.loading import PATH_KEYS, overridden, read_yaml, validate_config
from tasks.config.schema import TUNABLE, ConfigError, EdgetuneConfig
from tasks.config.variants import check_variants


def parse_config(raw: dict[str, Any], *, source: str = "config") -> EdgetuneConfig:
    """A classifier config from its raw mapping: shape, then variants, then paths."""
    return _resolve_paths(validate_study(EdgetuneConfig, raw, source, TUNABLE))


_M = TypeVar("_M", bound=BaseModel)


def validate_study(
    model: type[_M], raw: dict[str, Any], source: str, tunable: tuple[str, ...]
) -> _M:
    """``raw`` validated as ``model``, then each of its variants as a whole config.

    The variants are checked here, after validation, rather than from a validator: each
    is a config of its own, validated again with the variant's settings over the base.
    """
    config = validate_config(model, raw, source, tunable)
    if getattr(config, "study", None) is not None:
        try:
            check_variants(config)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> EdgetuneConfig:
    """Read, override and validate a study config.

    Relative paths written in the file are relative to the file's folder, so the config
    means the same wherever it is read (a worker runs in a temporary folder); paths given
    as overrides are relative to the current folder.
    """
    raw = overridden(read_yaml(path), path, overrides or [], PATH_KEYS)
    return parse_config(raw, source=str(path))


def _resolve_paths(config: EdgetuneConfig) -> EdgetuneConfig:
    """Make every path absolute so the saved config re-runs from anywhere."""
    data = config.data.model_copy(update={"root": str(Path(config.data.root).resolve())})
    model = config.model
    if model.weights:
        model = model.model_copy(update={"weights": str(Path(model.weights).resolve())})
    return config.model_copy(
        update={"data": data, "model": model, "run_dir": str(config.run_path.resolve())}
    )
