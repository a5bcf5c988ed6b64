"""Several variants of one study run: architectures or settings, each searched or trained once.

A config's ``variants:`` list names them::

    variants:
      - name: tiny                      # searched with the study's space
        set: {model.arch: tinycnn}
      - name: mobilenet                 # trained once with these settings
        set: {model.arch: mobilenet_v3_small, train.lr: 0.01}
        search: false

Each variant is a study of its own, ``<study>-<variant>``, built from the config with the
variant's ``set`` over it. The variants share the run directory, the Optuna storage, the
MLflow experiment and the registered model; each keeps its ``hpo/`` and ``plots/`` in
``<run_dir>/<study>-<variant>/``. A classifier variant's best trial is registered with the
alias ``<variant>``; the best of the variants by the study's champion rule takes
``champion``. A detector's champion stays the best of all its runs, as for ``detect train``.

What every variant must share to be compared is fixed: data, board, objectives, limits,
champion rule, storage and tracking.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tasks.config.loading import format_errors, in_space_file, inline_search_space
from tasks.config.schema import ConfigError, VariantSpec

#: Keys (and the sections under them) a variant may not set, and why.
FIXED = {
    "variants": "variants do not nest",
    "run_dir": "the variants share one run directory",
    "tracking": "the variants share one experiment and registered model",
    "data": "variants are compared on the same data",
    "device": "variants are compared on the same board",
    "name": "a detector's variants are runs of the same detector",
    "study.name": "each variant's study is named <study.name>-<variant>",
    "study.storage": "the variants share one Optuna storage",
    "study.parallel": "the variants share the GPU slots of study.parallel",
    "study.max_pending": "the variants share the queue of study.max_pending",
    "study.objectives": "variants are compared on the same objectives",
    "study.max_latency_ms": "variants are held to the same limits",
    "study.max_size_mb": "variants are held to the same limits",
    "study.champion": "one rule picks the champion across variants",
    "study.champion_weights": "one rule picks the champion across variants",
    "study.retrain": "the retraining after the run is the winning variant's",
    "study.derived_from": "set by edgetune",
    "study.variant_of": "set by edgetune",
    "study.search_space_file": "set by edgetune; set study.search_space instead",
}

#: Study settings reset for a variant trained once: nothing is sampled, nothing stops early.
ONCE: dict[str, Any] = {
    "search_space": {},
    "constraints": [],
    "search_space_file": None,
    "n_trials": 1,
    "sampler": "random",
    "pruner": "none",
    "time_budget": None,
    "hpo_time_ratio": None,
    "patience": None,
}


def _fixed(key: str) -> str | None:
    for prefix, why in FIXED.items():
        if key == prefix or key.startswith(f"{prefix}."):
            return why
    return None


def _refusal(spec: VariantSpec) -> str | None:
    """Why a variant's ``set`` cannot be run (None: it can), naming the key."""
    for key in spec.set:
        why = _fixed(key)
        if why:
            return f"set.{key}: {why}; remove it from the variant"
        if not spec.search and key.startswith("study."):
            return (
                f"set.{key}: a variant with search: false trains once and searches nothing; "
                f"remove the key or set search: true"
            )
    return None


def _not_sections(base: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """Why a dotted key cannot be set (a part of it is a value or empty), or None."""
    for key in settings:
        parts = key.split(".")
        if not all(parts):
            return f"set.{key}: not a dotted key; write section.key, e.g. model.arch"
        node: Any = base
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                where = ".".join(parts[: depth + 1])
                return f"set.{key}: {where} is a value, not a section; set {where} itself"
    return None


def variant_name(config: Any) -> str | None:
    """The variant a study config is (None: not a variant)."""
    base = config.study.variant_of
    return None if base is None else str(config.study.name).removeprefix(f"{base}-")


def expand(config: Any) -> list[tuple[VariantSpec, Any]]:
    """The study config of each variant, in the order listed; errors name the variant."""
    kind: type[BaseModel] = type(config)
    base = config.model_dump(mode="json")
    base["variants"] = []
    names = [spec.name for spec in config.variants]
    out = []
    for index, spec in enumerate(config.variants):
        where = f"variants[{index}] ({spec.name})"
        if names.index(spec.name) != index:
            raise ConfigError(f"{where}: name {spec.name!r} is listed twice; name each once")
        refusal = _refusal(spec) or _not_sections(base, spec.set)
        if refusal:
            raise ConfigError(f"{where}: {refusal}")
        raw = copy.deepcopy(base)
        for key, value in spec.set.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(value)
        study = raw["study"]
        if "study.search_space" in spec.set:
            # a space of its own brings its own constraints: its file's, or those set beside it
            study["search_space_file"] = None
            if "study.constraints" not in spec.set:
                study["constraints"] = []
        study.update(
            name=f"{config.study.name}-{spec.name}",
            variant_of=config.study.name,
            **(ONCE if not spec.search else {}),
        )
        raw["tracking"].update(
            experiment=config.experiment_name, registered_model=config.registered_model_name
        )
        raw["run_dir"] = str(config.run_path)
        try:
            raw = inline_search_space(raw, config.study.tunable)
            out.append((spec, kind.model_validate(raw)))
        except ValidationError as exc:
            message = in_space_file(format_errors(exc, kind), raw)
            raise ConfigError(f"{where}: {message}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


def check_variants(config: Any) -> None:
    """Validate every variant of a validated config; a ConfigError names the variant.

    Runs after the config's own validation (each variant is a whole config validated
    again), never from a validator: the schema checks shape only.
    """
    if config.variants:
        expand(config)


def settings_text(settings: dict[str, Any]) -> str:
    """A variant's settings in one short line (``model.arch=tinycnn, train.lr=0.01``); a
    search space written inline shows its parameters' names (``{lr, momentum}``)."""

    def shown(key: str, value: Any) -> str:
        if key == "study.search_space" and isinstance(value, dict):
            return "{" + ", ".join(value) + "}"
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

    return ", ".join(f"{key}={shown(key, value)}" for key, value in settings.items())
