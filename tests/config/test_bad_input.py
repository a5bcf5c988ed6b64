"""Bad input files give one line each: a config that is not UTF-8, a key given twice, an
alias inside its own anchor, a directory for a file, an image too large to open.

Each case is checked twice: the message the loader raises (exact), and what the real
``edgetune`` command prints in a terminal (one ``error:`` line, exit 2).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tasks.config import ConfigError, apply_overrides, load_config, read_yaml
from tasks.data import DataError, inspect_dataset, load_rgb

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
EXIT_BAD_INPUT = 2


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: Pillow refuses it
    at open, from its size alone, so the test needs no large image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _dataset(root: Path, odd: tuple[str, bytes] | None = None) -> Path:
    """Two classes, one 8 px image each in train/ and val/; ``odd`` is (name, bytes) of one
    more image in train/a."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "x.png")
    if odd:
        (root / "train" / "a" / odd[0]).write_bytes(odd[1])
    return root


BOMB = _png_header(20_000, 20_000)
BOMB_LIMIT = 2 * Image.MAX_IMAGE_PIXELS


# Not UTF-8 ------------------------------------------------------------------------------


def test_a_config_that_is_not_utf8_is_one_config_error_at_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin.yaml", "name: x\nnote: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == (
        f"{path}: not UTF-8 text (byte 0xe9 at line 2, column 10); save the file as UTF-8, "
        f"or pass the YAML config if this is another file"
    )


# Keys given twice ------------------------------------------------------------------------


def test_a_section_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path: Path) -> None:
    text = "train:\n  epochs: 3\ndata:\n  root: x\ntrain:\n  lr: 0.1\n"
    path = _write(tmp_path / "x.yaml", text)
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"{path}: key 'train' appears twice (lines 1 and 5); keep one"


def test_a_nested_key_given_three_times_names_every_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.yaml", "train:\n  lr: 1\n  epochs: 2\n  lr: 3\n  lr: 4\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"{path}: key 'lr' appears 3 times (lines 2, 4 and 5); keep one"


def test_keys_equal_as_values_are_the_same_key(tmp_path: Path) -> None:
    """``1`` and ``0x1`` are one key of the mapping: the later would drop the earlier."""
    path = _write(tmp_path / "x.yaml", "a:\n  1: x\n  0x1: y\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"{path}: key 1 appears twice (lines 2 and 3); keep one"


def test_merge_keys_are_not_duplicates_and_the_own_key_wins(tmp_path: Path) -> None:
    """A key merged in with ``<<`` and given again is YAML's way to override it; a merge
    source merged twice (and itself merging) is not a repetition either."""
    text = (
        "base: &base {lr: 0.1, epochs: 2}\n"
        "inner: &inner {<<: *base, epochs: 3}\n"
        "train:\n  <<: *inner\n  lr: 0.5\n"
        "again:\n  <<: [*inner, *base]\n"
    )
    raw = read_yaml(_write(tmp_path / "x.yaml", text))
    assert raw["train"] == {"lr": 0.5, "epochs": 3}
    assert raw["inner"] == {"lr": 0.1, "epochs": 3}
    assert raw["again"] == {"lr": 0.1, "epochs": 3}


def test_a_key_given_twice_in_a_search_space_file_names_that_file(
    tmp_path: Path, digits_root: Path
) -> None:
    space = _write(
        tmp_path / "space.yaml",
        "params:\n  lr: {type: float, low: 0.01, high: 0.1}\n  lr: {type: float, low: 1, high: 2}\n",
    )
    raw = tiny_config(digits_root, tmp_path / "run")
    raw["study"]["search_space"] = "space.yaml"
    config = _write(tmp_path / "study.yaml", yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(caught.value) == f"{space}: key 'lr' appears twice (lines 2 and 3); keep one"


def test_an_override_value_with_a_key_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, ["train={epochs: 1, epochs: 2}"])
    assert str(caught.value) == (
        "override 'train={epochs: 1, epochs: 2}': key 'epochs' appears twice "
        "(line 1 column 2 and line 1 column 13); keep one"
    )


# Recursive aliases ------------------------------------------------------------------------


def test_an_alias_inside_its_own_anchor_is_one_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.yaml", "data:\n  root: x\ntrain: &t\n  nested: [1, *t]\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    assert str(caught.value) == (
        f"{path}: alias *t at line 4 is inside its own anchor &t (line 3), so the value would "
        f"contain itself; write out the values it should repeat instead"
    )


def test_an_alias_after_its_anchor_is_still_read(tmp_path: Path) -> None:
    raw = read_yaml(_write(tmp_path / "x.yaml", "a: &a [1, 2]\nb: [*a, *a]\n"))
    assert raw == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


# Directories -------------------------------------------------------------------------------


def test_a_directory_for_a_config_suggests_the_config_in_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run / "a.yaml", "x: 1\n")
    _write(run / "config.yaml", "x: 1\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(run)
    assert str(caught.value) == (
        f"config path '{run}' is a directory, not a file; pass a YAML file in it, "
        f"e.g. '{run / 'config.yaml'}'"
    )


def test_a_directory_without_yaml_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as caught:
        read_yaml(tmp_path / "empty")
    assert str(caught.value) == (
        f"config path '{tmp_path / 'empty'}' is a directory with no YAML file in it; pass "
        f"the path of a YAML file, e.g. configs/quickstart.yaml"
    )


def test_a_directory_for_the_search_space_file_says_so(tmp_path: Path, digits_root: Path) -> None:
    _write(tmp_path / "spaces" / "lr.yml", "params: {}\n")
    raw = tiny_config(digits_root, tmp_path / "run")
    raw["study"]["search_space"] = "spaces"
    config = _write(tmp_path / "study.yaml", yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    spaces = tmp_path / "spaces"
    assert str(caught.value) == (
        f"study.search_space: '{spaces}' is a directory, not a file; pass a YAML file in it, "
        f"e.g. '{spaces / 'lr.yml'}'"
    )


# Images too large to open -------------------------------------------------------------------


def test_an_image_over_pillows_limit_is_a_data_error_naming_it(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", ("huge.png", BOMB))
    with pytest.raises(DataError) as caught:
        inspect_dataset(root)
    assert str(caught.value) == (
        f"image {root / 'train' / 'a' / 'huge.png'} is too large to open: Image size "
        f"(400000000 pixels) exceeds limit of {BOMB_LIMIT} pixels (Pillow's guard against "
        f"decompression bombs); downscale it (every image is resized to data.image_size "
        f"anyway) or remove it"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (BOMB, "is too large to open: Image size (400000000 pixels)"),
        (b"not an image", "corrupt image"),
    ],
    ids=["too large", "corrupt"],
)
def test_loading_an_unverified_image_gives_the_same_data_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """``evaluate`` and training read images without verifying the dataset first."""
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_rgb(path, 8)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_detector_image_over_pillows_limit_is_a_dataset_error_naming_it(
    tmp_path: Path,
) -> None:
    from tasks.detection.dataset import DatasetError, read_rgb

    path = tmp_path / "huge.png"
    path.write_bytes(BOMB)
    with pytest.raises(DatasetError) as caught:
        read_rgb(path)
    assert str(caught.value).startswith(f"image {path} is too large to open: Image size")


# The real command: one error line, exit 2 ---------------------------------------------------


def _run(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(cwd / ".prefect")}
    done = subprocess.run(
        [sys.executable, "-m", "edgetune.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def _config_with_image(tmp: Path, digits: Path) -> Path:
    root = _dataset(tmp / "data", ("huge.png", BOMB))
    return _write(tmp / "study.yaml", yaml.safe_dump(tiny_config(root, tmp / "run")))


def _train_twice(tmp: Path, digits: Path) -> tuple[Path, str]:
    """The test config with a second ``train:`` section appended."""
    lines = yaml.safe_dump(tiny_config(digits, tmp / "run"), sort_keys=False).splitlines()
    first = lines.index("train:") + 1
    path = _write(tmp / "c.yaml", "\n".join([*lines, "train:", "  epochs: 1", ""]))
    return (
        path,
        f"{{path}}: key 'train' appears twice (lines {first} and {len(lines) + 1}); keep one",
    )


#: case -> (what to pass to ``validate``, the error line's start after ``error: PATH: ``).
CLI_CASES: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "not UTF-8": lambda tmp, _: (
        _write(tmp / "c.yaml", b"name: x\n\xff: 1\n"),
        "{path}: not UTF-8 text (byte 0xff at line 2, column 1)",
    ),
    "recursive alias": lambda tmp, _: (
        _write(tmp / "c.yaml", "a: &a [*a]\n"),
        "{path}: alias *a at line 1 is inside its own anchor &a (line 1)",
    ),
    "key twice": lambda tmp, digits: _train_twice(tmp, digits),
    "directory": lambda tmp, _: (
        _write(tmp / "run" / "config.yaml", "x: 1\n").parent,
        "config path '{path}' is a directory, not a file; pass a YAML file in it, "
        "e.g. '{path}/config.yaml'",
    ),
    "image too large": lambda tmp, digits: (
        _config_with_image(tmp, digits),
        "image {tmp}/data/train/a/huge.png is too large to open: Image size (400000000 pixels)",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_validate_prints_one_error_line_and_exits_2(
    case: str, tmp_path: Path, digits_root: Path
) -> None:
    path, message = CLI_CASES[case](tmp_path, digits_root)
    code, stdout, stderr = _run(["validate", str(path)], tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert (code, stdout) == (EXIT_BAD_INPUT, ""), stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: " + message.format(path=path, tmp=tmp_path)), lines[0]
