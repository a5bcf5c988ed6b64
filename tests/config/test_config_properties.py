"""Properties of the config and search-space parser, checked on generated inputs.

Valid ranges parse and survive the saved config; every broken range, unknown key or bad
override is refused with a ConfigError that names the dotted path of the fault.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tasks.config import (
    TUNABLE,
    AugmentConfig,
    ConfigError,
    DataConfig,
    EdgetuneConfig,
    SearchParam,
    StudyConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_config,
    yaml_load,
)

FAST = settings(max_examples=40, deadline=None)
#: Float parameters whose range has no cross-field rule (unlike swa_start vs epochs).
FLOAT_PARAMS = ("lr", "momentum", "weight_decay", "rho", "swa_lr")

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-8, max_value=1e6, allow_nan=False, allow_infinity=False)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
key_names = st.from_regex(r"\A[a-z][a-z0-9_]{0,11}\Z")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


def _raw(folder: Path, space: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run_dir": str(folder / "run"),
        "data": {"root": str(folder / "data")},
        "study": {"name": "prop"},
    }
    if space is not None:
        raw["study"]["search_space"] = space
    return raw


def _refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


# Valid ranges ----------------------------------------------------------------------------


@st.composite
def float_ranges(draw: st.DrawFn) -> dict[str, Any]:
    log = draw(st.booleans())
    low = draw(positive if log else finite)
    high = draw(st.floats(min_value=low, max_value=max(low, 1e6) * 2, allow_nan=False))
    spec: dict[str, Any] = {"type": "float", "low": low, "high": high, "log": log}
    if not log and draw(st.booleans()):
        count = draw(st.integers(min_value=1, max_value=50))
        step = (high - low) / count
        assume(step > 0)
        spec["step"] = step  # divides the range into `count` steps
    return spec


@FAST
@given(name=st.sampled_from(FLOAT_PARAMS), spec=float_ranges())
def test_valid_float_ranges_parse_and_round_trip(
    folder: Path, name: str, spec: dict[str, Any]
) -> None:
    config = parse_config(_raw(folder, {name: spec}))
    param = config.study.search_space[name]
    assert (param.type, param.low, param.high, param.log) == (
        "float",
        spec["low"],
        spec["high"],
        spec["log"],
    )
    assert param.step == spec.get("step")

    saved = folder / "saved.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved) == config
    assert parse_config(yaml_load(dump_config(config))) == config


@FAST
@given(
    low=st.integers(min_value=1, max_value=512),
    width=st.integers(min_value=0, max_value=512),
    step=st.none() | st.integers(min_value=1, max_value=64),
)
def test_valid_int_ranges_parse_and_round_trip(
    folder: Path, low: int, width: int, step: int | None
) -> None:
    spec: dict[str, Any] = {"type": "int", "low": low, "high": low + width}
    if step is not None:
        spec["step"] = step
    config = parse_config(_raw(folder, {"batch_size": spec}))
    param = config.study.search_space["batch_size"]
    assert (param.low, param.high, param.step) == (low, low + width, step)
    assert parse_config(yaml_load(dump_config(config))) == config


@FAST
@given(
    choices=st.lists(
        st.one_of(st.integers(-100, 100), finite, st.booleans(), key_names),
        min_size=1,
        max_size=6,
    )
)
def test_categorical_choices_round_trip(folder: Path, choices: list[Any]) -> None:
    config = parse_config(_raw(folder, {"lr": {"type": "categorical", "choices": choices}}))
    assert config.study.search_space["lr"].choices == choices
    assert parse_config(yaml_load(dump_config(config))) == config


# Broken ranges ---------------------------------------------------------------------------


@FAST
@given(name=st.sampled_from(FLOAT_PARAMS), a=finite, b=finite, log=st.booleans())
def test_inverted_ranges_are_refused_naming_the_path(
    folder: Path, name: str, a: float, b: float, log: bool
) -> None:
    assume(a != b)
    low, high = max(a, b), min(a, b)
    message = _refused(_raw(folder, {name: {"type": "float", "low": low, "high": high}}))
    assert f"study.search_space.{name}: low <= high must hold" in message
    assert f"low={low}, high={high}; swap them" in message


@FAST
@given(
    name=st.sampled_from(FLOAT_PARAMS),
    bad=non_finite,
    other=finite,
    bad_is_low=st.booleans(),
)
def test_non_finite_bounds_are_refused_naming_the_path(
    folder: Path, name: str, bad: float, other: float, bad_is_low: bool
) -> None:
    low, high = (bad, other) if bad_is_low else (other, bad)
    message = _refused(_raw(folder, {name: {"type": "float", "low": low, "high": high}}))
    assert f"study.search_space.{name}: low and high must be finite" in message


@FAST
@given(name=st.sampled_from(FLOAT_PARAMS), low=st.floats(-1e6, 0.0), high=positive)
def test_log_ranges_from_zero_or_below_are_refused(
    folder: Path, name: str, low: float, high: float
) -> None:
    spec = {"type": "float", "low": low, "high": high, "log": True}
    message = _refused(_raw(folder, {name: spec}))
    assert f"study.search_space.{name}: log scale needs low > 0" in message


@FAST
@given(step=st.floats(-10.0, 0.0), low=st.floats(0.0, 1.0))
def test_non_positive_steps_are_refused(folder: Path, step: float, low: float) -> None:
    spec = {"type": "float", "low": low, "high": low + 1, "step": step}
    assert "study.search_space.momentum: step must be > 0" in _refused(
        _raw(folder, {"momentum": spec})
    )


@FAST
@given(low=st.floats(1.0, 100.0), extra=st.floats(0.01, 100.0))
def test_int_ranges_need_whole_bounds(folder: Path, low: float, extra: float) -> None:
    high = low + extra
    assume(not (low.is_integer() and high.is_integer()))
    spec = {"type": "int", "low": low, "high": high}
    message = _refused(_raw(folder, {"batch_size": spec}))
    assert "study.search_space.batch_size: int bounds must be whole numbers" in message


@FAST
@given(name=st.sampled_from(FLOAT_PARAMS), which=st.sampled_from(["low", "high", "both"]))
def test_empty_ranges_are_refused(folder: Path, name: str, which: str) -> None:
    spec: dict[str, Any] = {"type": "float", "low": 0.1, "high": 0.2}
    for bound in ("low", "high") if which == "both" else (which,):
        del spec[bound]
    message = _refused(_raw(folder, {name: spec}))
    assert f"study.search_space.{name}: float needs both 'low' and 'high'" in message
    empty = _refused(_raw(folder, {name: {"type": "categorical", "choices": []}}))
    assert f"study.search_space.{name}: categorical needs a non-empty 'choices' list" in empty


@FAST
@given(name=key_names)
def test_untunable_search_parameters_are_refused(folder: Path, name: str) -> None:
    assume(name not in TUNABLE)
    spec = {"type": "float", "low": 0.1, "high": 0.2}
    message = _refused(_raw(folder, {name: spec}))
    assert f"study.search_space.{name}: not a tunable parameter" in message


# Unknown keys ----------------------------------------------------------------------------

SECTIONS: dict[str, type] = {
    "": EdgetuneConfig,
    "data": DataConfig,
    "data.augment": AugmentConfig,
    "train": TrainConfig,
    "study": StudyConfig,
    "study.search_space.lr": SearchParam,
}


@FAST
@given(where=st.sampled_from(sorted(SECTIONS)), key=key_names)
def test_unknown_keys_are_refused_naming_the_key(folder: Path, where: str, key: str) -> None:
    model = SECTIONS[where]
    assume(key not in model.model_fields)
    raw = _raw(folder, {"lr": {"type": "float", "low": 0.01, "high": 0.1}})
    node = raw
    for part in where.split(".") if where else []:
        node = node.setdefault(part, {})
    node[key] = 1
    message = _refused(raw)
    path = f"{where}.{key}" if where else key
    assert f"{path}: unknown key" in message
    allowed = ", ".join(sorted(model.model_fields))
    assert f"allowed keys here: {allowed}" in message


@FAST
@given(key=key_names)
def test_unknown_keys_in_overrides_are_refused(folder: Path, key: str) -> None:
    assume(key not in TrainConfig.model_fields)
    with pytest.raises(ConfigError, match=rf"train\.{key}: unknown key"):
        parse_config(apply_overrides(_raw(folder), [f"train.{key}=1"]))


# Overrides -------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.from_regex(r"\A[a-z][a-z0-9_-]{0,15}\Z").filter(
        lambda s: yaml.safe_load(s) == s and yaml_load(s) == s
    ),
)


@FAST
@given(path=st.lists(key_names, min_size=1, max_size=4), value=scalars)
def test_overrides_parse_yaml_scalars_like_the_file_does(path: list[str], value: Any) -> None:
    text = yaml.safe_dump(value, default_style=None).removesuffix("\n...\n").strip()
    key = ".".join(path)

    merged = apply_overrides({}, [f"{key}={text}"])

    node: Any = merged
    for part in path:
        node = node[part]
    assert node == value and type(node) is type(value)
    in_a_file = yaml_load(f"{path[0]}: {text}")[path[0]]
    assert type(in_a_file) is type(value) and in_a_file == value


#: Characters YAML reads as themselves inside a single-quoted scalar.
printable = st.characters(
    min_codepoint=0x20,
    max_codepoint=0xD7FF,
    blacklist_categories=["Cc", "Cf", "Cs", "Cn", "Zl", "Zp"],
)


@FAST
@given(left=st.text(printable, max_size=10), right=st.text(printable, max_size=10))
def test_an_override_splits_at_the_first_equals_sign(left: str, right: str) -> None:
    value = f"{left}={right}"
    quoted = "'" + value.replace("'", "''") + "'"
    merged = apply_overrides({"a": {"b": 0}}, [f"a.b={quoted}"])
    assert merged == {"a": {"b": value}}


@FAST
@given(item=st.sampled_from(["", "=1", "train", "train.=1", ".epochs=1", "train..lr=1"]))
def test_malformed_overrides_are_refused(item: str) -> None:
    with pytest.raises(ConfigError, match=r"expected section\.key=value, e\.g\. train\.epochs=10"):
        apply_overrides({}, [item])


@FAST
@given(original=st.integers(1, 10**6), value=st.integers(1, 10**6))
def test_overrides_never_change_their_input(original: int, value: int) -> None:
    raw = {"train": {"epochs": original}}
    merged = apply_overrides(raw, [f"train.epochs={value}"])
    assert raw == {"train": {"epochs": original}}
    assert merged == {"train": {"epochs": value}}
