"""Config parsing: typed models, path-precise errors, overrides, the resolved file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tasks.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    parse_config,
    trial_train_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _base(tmp_path: Path) -> dict:
    return yaml.safe_load((CONFIGS / "quickstart.yaml").read_text()) | {"run_dir": str(tmp_path)}


@pytest.mark.parametrize("name", ["quickstart.yaml", "hi4lines-classifier.yaml"])
def test_shipped_configs_parse(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.study.n_trials >= 8
    assert Path(config.data.root).is_absolute()


def test_hi4lines_is_the_original_study() -> None:
    config = load_config(CONFIGS / "hi4lines-classifier.yaml")
    assert (config.model.arch, config.data.image_size, config.train.batch_size) == (
        "mobilenet_v2",
        224,
        16,
    )
    assert (config.train.epochs, config.study.n_trials, config.compile.backend) == (
        200,
        400,
        "hailo",
    )
    space = config.study.search_space
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-3, 1e-1, True)
    assert (space["swa_start"].low, space["swa_start"].high) == (65, 150)
    assert (space["momentum"].low, space["momentum"].high) == (0.85, 0.99)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.lrr=0.1"],
            r"train\.lrr: unknown key \(did you mean 'lr'\?\); allowed keys here: .*lr",
        ),
        (["trian.epochs=3"], r"trian: unknown key \(did you mean 'train'\?\)"),
        (["train.epochs=0"], r"train\.epochs: .*greater than 0, but got 0"),
        (["train.batch_size=-4"], r"train\.batch_size: .*greater than 0, but got -4"),
        (["train.epochs=many"], r"train\.epochs: .*valid integer, but got 'many'"),
        (
            ["study.search_space.lr.low=0.5"],
            r"study\.search_space\.lr: low <= high must hold, but got low=0\.5, high=0\.1",
        ),
        (["study.search_space.lr.low=0"], r"study\.search_space\.lr: log scale needs low > 0"),
        (
            ["study.search_space.lr={type: float}"],
            r"study\.search_space\.lr: float needs both 'low' and 'high'",
        ),
        (
            ["study.search_space.lrate={type: float, low: 1, high: 2}"],
            r"study\.search_space\.lrate: not a tunable parameter",
        ),
        (
            ["compile.backend=tensorrt"],
            r"compile\.backend: .*'onnxruntime-int8' or 'hailo', but got 'tensorrt'",
        ),
        (
            ["model.arch=resnet19"],
            r"model\.arch: unknown architecture 'resnet19'; choose one of .*resnet18",
        ),
        (
            ["study.search_space.swa_start.high=10"],
            r"train\.swa_start: SWA must start before the last epoch",
        ),
        (["device.name=my board"], r"device\.name: .*pattern"),
    ],
)
def test_bad_values_name_the_path_and_the_value(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_config(apply_overrides(_base(tmp_path), overrides))
    assert "\n" not in str(error.value)


def test_missing_section_and_malformed_yaml(tmp_path: Path) -> None:
    raw = _base(tmp_path)
    del raw["data"]
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        parse_config(raw)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: [3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: malformed YAML at line \d+"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml' not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_scalars_and_nest(tmp_path: Path) -> None:
    raw = apply_overrides(
        _base(tmp_path),
        ["train.epochs=10", "train.lr=1e-2", "data.augment.hflip=true", "study.name=other"],
    )
    config = parse_config(raw)
    assert config.train.epochs == 10 and config.train.lr == 0.01
    assert config.data.augment.hflip is True and config.study.name == "other"
    with pytest.raises(ConfigError, match=r"train\.epochs is a value, not a section"):
        apply_overrides(raw, ["train.epochs.x=1"])


def test_integer_stands_for_float_but_not_string(tmp_path: Path) -> None:
    config = parse_config(apply_overrides(_base(tmp_path), ["train.lr=1"]))
    assert config.train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.lr: .*valid number, but got '0\.1'"):
        parse_config(apply_overrides(_base(tmp_path), ["train.lr='0.1'"]))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "quickstart.yaml", [f"run_dir={tmp_path}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(config))
    again = load_config(saved)
    assert again == config
    assert again.storage_url == f"sqlite:///{tmp_path / 'optuna.db'}"


def test_trial_params_override_training(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "quickstart.yaml", [f"run_dir={tmp_path}"])
    train = trial_train_config(config, {"lr": 0.003, "swa_start": 3})
    assert (train.lr, train.swa_start, train.epochs) == (0.003, 3, config.train.epochs)
    with pytest.raises(ConfigError, match="not tunable"):
        trial_train_config(config, {"dropout": 0.1})


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(low=finite, high=finite, log=st.booleans())
def test_float_ranges_accept_exactly_the_valid_ones(low: float, high: float, log: bool) -> None:
    from tasks.config import SearchParam

    valid = low <= high and (not log or low > 0)
    try:
        SearchParam(type="float", low=low, high=high, log=log)
    except ValueError as exc:
        assert not valid, exc
    else:
        assert valid


def test_paths_in_a_file_are_relative_to_the_file_and_overrides_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "studies"
    folder.mkdir()
    raw = _base(tmp_path) | {"run_dir": "runs/here"}
    raw["data"] = dict(raw["data"], root="../datasets/digits")
    (folder / "s.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "s.yaml")
    assert config.data.root == str(tmp_path / "datasets" / "digits")
    assert config.run_dir == str(folder / "runs" / "here")
    overridden = load_config(folder / "s.yaml", ["data.root=mine"])
    assert overridden.data.root == str(elsewhere / "mine")


# Overrides: paths, variants, Ultralytics' flat keys ----------------------------------------


def _space(lr_high: float) -> dict:
    return {"params": {"lr": {"type": "float", "low": 0.001, "high": lr_high, "log": True}}}


def test_a_space_file_on_the_command_line_is_relative_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, here = tmp_path / "studies", tmp_path / "here"
    folder.mkdir()
    here.mkdir()
    (folder / "s.yaml").write_text(yaml.safe_dump(_base(tmp_path)))
    (folder / "space.yaml").write_text(yaml.safe_dump(_space(0.2)))  # beside the config
    (here / "space.yaml").write_text(yaml.safe_dump(_space(0.3)))  # where the user stands
    monkeypatch.chdir(here)
    config = load_config(folder / "s.yaml", ["study.search_space=space.yaml"])
    assert config.study.search_space["lr"].high == 0.3
    assert config.study.search_space_file == str(here / "space.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(folder / "s.yaml", ["study.search_space=none.yaml"])
    assert str(error.value) == (
        f"study.search_space: file '{here / 'none.yaml'}' not found; give the path of a "
        f"search-space file (in the config, relative to the config's folder; on the command "
        f"line, relative to the current folder), or write the space inline"
    )


def _with_variants(tmp_path: Path) -> Path:
    raw = _base(tmp_path)
    raw["variants"] = [
        {"name": "tiny", "set": {"model.arch": "tinycnn", "train.lr": 0.02}},
        {
            "name": "r18",
            "set": {
                "model.arch": "resnet18",
                "study.search_space": {"lr": {"type": "float", "low": 0.01, "high": 0.1}},
            },
        },
    ]
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_command_line_override_beats_the_variants_set_and_says_so(tmp_path: Path) -> None:
    from tasks.config import expand

    path = _with_variants(tmp_path)
    with pytest.warns(UserWarning) as shown:
        config = load_config(path, ["train.lr=0.05", "study.search_space.lr.high=0.2"])
    (_, tiny), (_, r18) = expand(config)
    assert (tiny.model.arch, tiny.train.lr) == ("tinycnn", 0.05)
    assert (r18.model.arch, r18.train.lr) == ("resnet18", 0.05)
    assert r18.study.search_space["lr"].high == 0.2  # inside the variant's own space
    assert [str(w.message) for w in shown] == [
        "override train.lr=0.05 applies to every variant: it replaces variant tiny's set.train.lr",
        "override study.search_space.lr.high=0.2 applies to every variant: it replaces "
        "variant r18's set.study.search_space",
    ]


def test_an_override_that_makes_two_variants_the_same_is_refused(tmp_path: Path) -> None:
    path = _with_variants(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["variants"][0]["set"] = {"model.arch": "tinycnn"}
    raw["variants"][1]["set"] = {"model.arch": "resnet18"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_config(path, ["model.arch=resnet18"])
    assert str(error.value) == (
        "override model.arch=resnet18 replaces what tells variants tiny and r18 apart (their "
        "set:), so both would be the same run; drop the override to compare them, or add "
        "variants=[] to run one study with it"
    )
    assert load_config(path, ["model.arch=resnet18", "variants=[]"]).variants == []


def test_ultralytics_flat_keys_name_the_detector_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.detection.config import load_detector_config

    monkeypatch.chdir(tmp_path)
    path = CONFIGS / "detectors" / "s-ml.yaml"
    flat = ["data=ds/data.yaml", "epochs=1", "imgsz=320", "batch=4", "model=w/best.pt"]
    config = load_detector_config(path, flat)
    assert config.data.yaml == str(tmp_path / "ds" / "data.yaml")
    assert (config.train.epochs, config.train.imgsz, config.train.batch) == (1, 320, 4)
    assert config.model.weights == str(tmp_path / "w" / "best.pt")
    assert config.model.arch == "yolo11n.yaml"  # the file's
    assert load_detector_config(path, ["model=yolov8s.yaml"]).model.arch == "yolov8s.yaml"
    sections = load_detector_config(path, ["data={yaml: d.yaml, max_eval_images: 5}"])
    assert (sections.data.yaml, sections.data.max_eval_images) == (str(tmp_path / "d.yaml"), 5)
