"""Reading configs: YAML files, overrides, search-space files, relative paths, and
validation errors in one line each."""

from __future__ import annotations

import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
)

from tasks.config.schema import (
    AUTO,
    TUNABLE,
    ConfigError,
    EdgetuneConfig,
    SearchParam,
    TrainConfig,
    _Loader,
    _Strict,
    _suggest,
    check_space,
)

# Strict YAML -----------------------------------------------------------------------------


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but cannot be one config; ``problem`` is the whole message: what,
    where and the fix."""


class _StrictLoader(_Loader):
    """The config loader, refusing what plain YAML lets through without a word: a key given
    twice (the later one would drop the first, and a later error would mislead) and an alias
    inside its own anchor (a value that contains itself: no config means that, and copying
    it recursed without end)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open_anchors: list[tuple[str, int]] = []  # (anchor, line) being read
        self._checked: set[int] = set()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._refuse_inside(event)
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is None:
            return super().compose_node(parent, index)
        self._open_anchors.append((anchor, event.start_mark.line + 1))
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()

    def _refuse_inside(self, alias: Any) -> None:
        """An alias to an anchor still being read would make a value that contains itself."""
        for anchor, line in self._open_anchors:
            if anchor == alias.anchor:
                raise _Refused(
                    problem=f"alias *{anchor} at line {alias.start_mark.line + 1} is inside its "
                    f"own anchor &{anchor} (line {line}), so the value would contain itself; "
                    f"write out the values it should repeat instead"
                )

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked once, before its merge keys are flattened into it: a key merged in with
        # ``<<`` and written again is YAML's override, not a repetition.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            _refuse_repeated_keys(self, node)
        super().flatten_mapping(node)


def _refuse_repeated_keys(loader: _StrictLoader, node: yaml.MappingNode) -> None:
    seen: dict[Any, list[Any]] = {}  # key -> the marks where it is written
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        seen.setdefault(key, []).append(key_node.start_mark)
    for key, marks in seen.items():
        if len(marks) > 1:
            times = "twice" if len(marks) == 2 else f"{len(marks)} times"
            raise _Refused(problem=f"key {key!r} appears {times} ({_places(marks)}); keep one")


def _places(marks: list[Any]) -> str:
    """``lines 3 and 12``, or with columns where two share a line."""
    lines = [mark.line + 1 for mark in marks]
    if len(set(lines)) == len(lines):
        return f"lines {_listed([str(line) for line in lines])}"
    return _listed([f"line {mark.line + 1} column {mark.column + 1}" for mark in marks])


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _strict_load(text: str) -> Any:
    """YAML as a config reads it (``1e-3`` a number), refusing repeated keys and
    self-containing aliases (``_Refused``, a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)


# Loading -----------------------------------------------------------------------------------


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for listing allowed keys).

    Follows ``Model``, ``Model | None`` and ``dict[str, Model]`` fields (in a dict, the
    next part of ``loc`` is an entry's name, e.g. ``study.search_space.lr``).
    """
    model: Any = root
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[-1]
            if not parts:
                return None
            parts.pop(0)  # the entry's name
        elif typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
            if parts and isinstance(parts[0], int):
                parts.pop(0)  # the item's index
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = members[0] if len(members) == 1 else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _describe(error: Any, root: type[BaseModel]) -> str:
    loc = tuple(p for p in error["loc"] if p not in ("function-after",))
    path = ".".join(str(p) for p in loc) or "<root>"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1], root)
        allowed = sorted(owner.model_fields) if owner else []
        hint = _suggest(str(loc[-1]), allowed)
        return f"{path}: unknown key{hint}; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "value_error":
        # Our validators state the values themselves; some name a key below ``loc``.
        if re.match(r"^[A-Za-z_][\w.]*: ", message) or message.startswith("variants["):
            return message if path == "<root>" else f"{path}.{message}"
        return f"{path}: {message}"
    return f"{path}: {message}, but got {value!r}"


def format_errors(error: ValidationError, root: type[BaseModel]) -> str:
    """Every validation error of a config rooted at `root`, each with its dotted key."""
    return "; ".join(_describe(e, root) for e in error.errors())


class OverrideWarning(UserWarning):
    """An override replaced a setting of some variants (the command line applies to all)."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars).

    An override applies to every variant too: it beats a variant's ``set`` of the same key
    (an ``OverrideWarning`` names the variants), and it is refused when it leaves two
    variants the same.
    """
    merged = _deep_copy(raw)
    before = _variant_settings(merged)
    parsed = [(item, *_parse_override(item)) for item in overrides]
    new_variants = any(key == "variants" for _, key, _ in parsed)  # given whole: as given
    replaced: dict[str, list[tuple[str, str]]] = {}
    for item, key, value in parsed:
        _set_key(merged, key, value, item)
        replaced[item] = [] if new_variants else _over_variants(merged, key, value)
    if not new_variants:
        _refuse_same_variants(before, _variant_settings(merged), replaced)
    for item, where in replaced.items():
        if where:
            shown = ", ".join(f"variant {name}'s set.{set_key}" for name, set_key in where)
            warnings.warn(
                f"override {item} applies to every variant: it replaces {shown}",
                OverrideWarning,
                stacklevel=2,
            )
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=10")
    try:
        return key, _strict_load(text) if text else ""
    except _Refused as exc:
        raise ConfigError(f"override {item!r}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"override {item!r}: value is not valid YAML ({problem}); quote the whole "
            f"override in the shell and fix the value, e.g. 'key={{a: 1, b: 2}}'"
        ) from None


def _set_key(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    node[leaf] = value


def _over_variants(raw: dict[str, Any], key: str, value: Any) -> list[tuple[str, str]]:
    """Put the override ``key`` over each variant's ``set``: a set key it names (or one
    under it) goes, so the variant takes the overridden base value; a mapping set above it
    takes the value inside. Returns the (variant, set key) pairs it replaced."""
    variants = raw.get("variants")
    replaced = []
    for variant in variants if isinstance(variants, list) else []:
        settings = variant.get("set") if isinstance(variant, dict) else None
        if not isinstance(settings, dict):
            continue
        for set_key in list(settings):
            inside = key.removeprefix(f"{set_key}.") if key.startswith(f"{set_key}.") else None
            if set_key == key or set_key.startswith(f"{key}."):
                del settings[set_key]
            elif inside is None or not _put(settings[set_key], inside, value):
                continue
            replaced.append((str(variant.get("name")), set_key))
    return replaced


def _put(node: Any, key: str, value: Any) -> bool:
    """Set dotted ``key`` inside the mapping ``node``; False if a part of it is a value."""
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node, dict):
            return False
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        return False
    node[leaf] = _deep_copy(value)
    return True


def _variant_settings(raw: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Each variant's name, ``set`` and ``search``, to compare the variants."""
    variants = raw.get("variants")
    return [
        (str(v.get("name")), _deep_copy(v.get("set")), v.get("search", True))
        for v in (variants if isinstance(variants, list) else [])
        if isinstance(v, dict)
    ]


def _refuse_same_variants(
    before: list[tuple[str, Any, Any]],
    after: list[tuple[str, Any, Any]],
    replaced: dict[str, list[tuple[str, str]]],
) -> None:
    """Two variants that differed only in what an override replaced would be one run twice."""
    for i, (name, *mine) in enumerate(after):
        for j in range(i + 1, len(after)):
            other, *theirs = after[j]
            if mine != theirs or before[i][1:] == before[j][1:]:
                continue
            items = [
                item
                for item, where in replaced.items()
                if any(variant in (name, other) for variant, _ in where)
            ]
            raise ConfigError(
                f"override {', '.join(items)} replaces what tells variants {name} and {other} "
                f"apart (their set:), so both would be the same run; drop the override to "
                f"compare them, or add variants=[] to run one study with it"
            )


def overridden(
    raw: dict[str, Any], path: str | Path, overrides: list[str], keys: tuple[tuple[str, ...], ...]
) -> dict[str, Any]:
    """A config file's raw mapping with the overrides over it, its path-valued ``keys``
    absolute: relative paths written in the file are relative to the file's folder (it means
    the same wherever it is read); those given as overrides, to the current folder (where
    the user stands)."""
    anchored = anchor_paths(raw, Path(path).resolve().parent, keys)
    return anchor_paths(apply_overrides(anchored, overrides), Path.cwd(), keys)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; anything else is one ``ConfigError`` line."""
    source = Path(path)
    if source.is_dir():
        raise ConfigError(f"config path {str(source)!r} {_a_directory(source)}")
    if not source.is_file():
        raise ConfigError(f"config file {str(source)!r} not found; pass the path of a YAML file")
    try:
        raw = _strict_load(_read_text(source))
    except _Refused as exc:
        raise ConfigError(f"{source}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}; fix the syntax") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: nested too deeply to read; flatten the nesting (a config needs a few "
            f"levels)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections at the top (data:, study:, ...), got "
            f"{raw!r}; start from configs/quickstart.yaml"
        )
    return raw


def _read_text(source: Path) -> str:
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot be read ({exc.strerror}); check its permissions"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, column "
            f"{column}); save the file as UTF-8, or pass the YAML config if this is another file"
        ) from None


def _a_directory(source: Path, example: str = "configs/quickstart.yaml") -> str:
    """The rest of the message for a directory given as a file: the YAML file in it to pass
    instead (a run directory's ``config.yaml`` first), else ``example``."""
    try:
        found = sorted(p for p in source.iterdir() if p.suffix in (".yaml", ".yml"))
    except OSError:
        found = []
    found = sorted((p for p in found if p.is_file()), key=lambda p: p.name != "config.yaml")
    if not found:
        return (
            f"is a directory with no YAML file in it; pass the path of a YAML file, e.g. {example}"
        )
    return f"is a directory, not a file; pass a YAML file in it, e.g. {str(found[0])!r}"


_M = typing.TypeVar("_M", bound=BaseModel)


def validate_config(
    model: type[_M], raw: dict[str, Any], source: str, tunable: tuple[str, ...]
) -> _M:
    """``raw`` as a ``model`` config, its search-space file read in; errors in one line,
    those inside the space file named at the file and its key."""
    raw = inline_search_space(raw, tunable)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        message = in_space_file(format_errors(exc, model), raw)
        raise ConfigError(f"{source}: {message}") from None


#: Path-valued keys; in a file they are relative to the file's folder (like docker compose).
PATH_KEYS = (("data", "root"), ("model", "weights"), ("run_dir",), ("study", "search_space"))


class SpaceFile(_Strict):
    """A search-space file (``configs/search_spaces/*.yaml``): ``params`` and ``constraints``."""

    params: dict[str, SearchParam]
    constraints: list[str] = Field(default_factory=list)


def read_space_file(path: str | Path, tunable: tuple[str, ...]) -> SpaceFile:
    """Read and check a search-space file; errors name the file and the key in it."""
    source = Path(path)
    if source.is_dir():
        example = "configs/search_spaces/fmfp.yaml"
        raise ConfigError(f"study.search_space: {str(source)!r} {_a_directory(source, example)}")
    if not source.is_file():
        raise ConfigError(
            f"study.search_space: file {str(source)!r} not found; give the path of a search-"
            f"space file (in the config, relative to the config's folder; on the command line, "
            f"relative to the current folder), or write the space inline"
        )
    raw = read_yaml(source)
    try:
        space = SpaceFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_errors(exc, SpaceFile)}") from None
    refusal = check_space(space.params, tunable, space.constraints)
    if refusal:
        raise ConfigError(f"{source}: {refusal.replace('search_space.', 'params.', 1)}")
    return space


def inline_search_space(raw: dict[str, Any], tunable: tuple[str, ...]) -> dict[str, Any]:
    """A raw config whose ``study.search_space`` names a file, with that file's space in it.

    The file's constraints come before the config's own ``study.constraints``; the file's
    path is kept in ``study.search_space_file`` for errors and for the record.
    """
    study = raw.get("study")
    if not isinstance(study, dict) or not isinstance(study.get("search_space"), str):
        return raw
    path = study["search_space"]
    space = read_space_file(path, tunable)
    own = study.get("constraints") or []
    dumped = space.model_dump(mode="json", exclude_defaults=True)
    merged = {
        **study,
        "search_space": dumped["params"],
        "constraints": [*space.constraints, *(own if isinstance(own, list) else [own])],
        "search_space_file": path,
    }
    return {**raw, "study": merged}


def in_space_file(message: str, raw: dict[str, Any]) -> str:
    """Point errors about a space read from a file at the file and its key."""
    study = raw.get("study")
    path = study.get("search_space_file") if isinstance(study, dict) else None
    return at_space_file(message, path if isinstance(path, str) else None)


def at_space_file(message: str, path: str | None) -> str:
    if not path:
        return message
    return re.sub(r"\bstudy\.search_space\.", f"{path}: params.", message)


def anchor_paths(
    raw: dict[str, Any], base: Path, keys: tuple[tuple[str, ...], ...] = PATH_KEYS
) -> dict[str, Any]:
    """Make the path-valued `keys` of a raw config absolute against `base`."""
    anchored = _deep_copy(raw)
    for path in keys:
        node = anchored
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(path[-1]) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(value, str) and value:
            node[path[-1]] = str((base / Path(value).expanduser()).resolve())
    variants = anchored.get("variants")
    for variant in variants if isinstance(variants, list) else []:
        settings = variant.get("set") if isinstance(variant, dict) else None
        if not isinstance(settings, dict):
            continue
        for key, value in settings.items():
            if tuple(str(key).split(".")) in keys and isinstance(value, str) and value:
                settings[key] = str((base / Path(value).expanduser()).resolve())
    return anchored


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML: enough to re-run it from this one file."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def trial_train_config(config: EdgetuneConfig, params: dict[str, Any]) -> TrainConfig:
    """The training settings of one trial: the config's, overridden by the sampled params."""
    unknown = set(params) - set(TUNABLE)
    if unknown:
        raise ConfigError(f"trial params {sorted(unknown)} are not tunable; use {TUNABLE}")
    merged = {**config.train.model_dump(), **params}
    for name in ("epochs", "batch_size", "swa_start"):
        if not (name == "batch_size" and merged[name] == AUTO):
            merged[name] = int(merged[name])
    for name in ("lr", "momentum", "weight_decay", "rho", "swa_lr"):
        merged[name] = float(merged[name])
    return TrainConfig.model_validate(merged)
