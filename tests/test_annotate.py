"""Value tests for what the detectors' crops and auto-annotation keep: class-agnostic NMS,
the --conf hint when no crop comes out, and the layout the classifier study accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.detection.metrics import box_iou
from tasks.detection.predict import conf_below, describe_model, select_boxes, study_gaps

SQUARE = [0.0, 0.0, 10.0, 10.0]


def rows(*boxes: tuple[list[float], float, int]) -> np.ndarray:
    """(n, 6) x1 y1 x2 y2 score class, as the evaluator's decoder returns them."""
    return np.array([[*box, score, cls] for box, score, cls in boxes], dtype=np.float32)


@pytest.mark.parametrize("first_class", [0, 1])
def test_agnostic_nms_keeps_the_better_of_two_classes_on_one_object(first_class: int) -> None:
    inner = [0.0, 0.0, 10.0, 8.0]
    assert box_iou(np.array([SQUARE]), np.array([inner]))[0, 0] == pytest.approx(0.8)
    # the weaker box comes first: the order of the rows must not decide
    found = rows((inner, 0.6, 1 - first_class), (SQUARE, 0.9, first_class))
    kept = select_boxes(found, conf=0.25, iou=0.7, max_det=300, agnostic=True)
    assert kept.tolist() == [[*SQUARE, pytest.approx(0.9), first_class]]


def test_agnostic_nms_keeps_two_classes_that_overlap_less_than_iou() -> None:
    inner = [0.0, 0.0, 10.0, 3.0]
    assert box_iou(np.array([SQUARE]), np.array([inner]))[0, 0] == pytest.approx(0.3)
    found = rows((SQUARE, 0.9, 0), (inner, 0.6, 1))
    kept = select_boxes(found, conf=0.25, iou=0.7, max_det=300, agnostic=True)
    assert kept[:, 5].tolist() == [0, 1]
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.6])


def test_class_aware_nms_keeps_both_classes_on_one_object() -> None:
    found = rows((SQUARE, 0.9, 0), ([0.0, 0.0, 10.0, 8.0], 0.6, 1))
    kept = select_boxes(found, conf=0.25, iou=0.7, max_det=300, agnostic=False)
    assert kept[:, 5].tolist() == [0, 1]


def test_agnostic_nms_is_greedy_a_dropped_box_drops_nothing() -> None:
    """A (0.9) drops B (0.8); B would drop C (0.7) but is gone, and A barely touches C."""
    a, b, c = SQUARE, [0.0, 2.0, 10.0, 12.0], [0.0, 8.0, 10.0, 18.0]
    overlap = box_iou(np.array([a, b, c]), np.array([a, b, c]))
    assert (overlap[0, 1], overlap[1, 2], overlap[0, 2]) == pytest.approx((2 / 3, 1 / 4, 1 / 9))
    found = rows((c, 0.7, 0), (b, 0.8, 1), (a, 0.9, 0))
    kept = select_boxes(found, conf=0.25, iou=0.2, max_det=300, agnostic=True)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.7])


def test_agnostic_nms_applies_conf_and_max_det() -> None:
    far = [[20.0 * i, 0.0, 20.0 * i + 10.0, 10.0] for i in range(4)]
    found = rows(
        *(
            (box, score, i % 2)
            for i, (box, score) in enumerate(zip(far, [0.3, 0.9, 0.2, 0.5], strict=True))
        )
    )
    assert select_boxes(found, 0.25, 0.7, 300, agnostic=True)[:, 4].tolist() == pytest.approx(
        [0.9, 0.5, 0.3]
    )
    assert select_boxes(found, 0.25, 0.7, 2, agnostic=True)[:, 4].tolist() == pytest.approx(
        [0.9, 0.5]
    )
    assert select_boxes(found, 0.95, 0.7, 300, agnostic=True).shape == (0, 6)
    assert select_boxes(found[:0], 0.25, 0.7, 300, agnostic=True).shape == (0, 6)


@pytest.mark.parametrize(
    ("score", "hint"),
    [(0.012348, "0.012"), (0.5, "0.49"), (0.031, "0.03"), (0.99, "0.98"), (2.5e-05, "2.4e-05")],
)
def test_the_conf_hint_is_a_round_value_just_below_the_best_score(score: float, hint: str) -> None:
    assert conf_below(score) == hint
    assert float(hint) < score


@given(st.floats(min_value=1e-9, max_value=1.0))
def test_the_conf_hint_lets_the_best_box_through_and_little_else(score: float) -> None:
    assert 0.8 * score <= float(conf_below(score)) < score


def test_model_references_read_as_models_uris() -> None:
    assert describe_model("s-ml") == "models:/s-ml@champion"
    assert describe_model("s-ml@staging") == "models:/s-ml@staging"
    assert describe_model("s-ml/3") == "models:/s-ml/3"
    assert describe_model("runs/x/model.onnx") == "runs/x/model.onnx"


@pytest.mark.parametrize(
    ("folders", "gaps"),
    [
        ({"train/a": 3, "train/b": 2, "val/a": 1, "val/b": 1, "unmatched": 4}, []),
        ({"train/a": 3, "train/b": 2, "val/a": 1, "val/b": 1, "test/a": 1}, []),
        (
            {"train/broken": 24, "val/broken": 8, "unmatched": 1},
            ["train/ has crops of one class only (broken)"],
        ),
        ({"train/a": 3, "train/b": 2}, ["val/ has no crops"]),
        ({"train/a": 3, "train/b": 2, "val/a": 1}, ["val/ has no b crops"]),
        (
            {"train/a": 3, "train/b": 2, "val/a": 1, "val/c": 1},
            ["val/ has no b crops", "train/ has no c crops"],
        ),
        ({"unmatched": 6}, ["train/ has no crops", "val/ has no crops"]),
        ({"train/a": 3, "train/b": 0, "val/a": 1}, ["train/ has crops of one class only (a)"]),
    ],
)
def test_study_gaps_name_every_split_and_class_the_classifier_study_lacks(
    folders: dict[str, int], gaps: list[str]
) -> None:
    assert study_gaps(folders) == gaps


# ------------------------------------------------ the commands, on a fixed-output detector

CLASSES = ["healthy", "broken"]
# name: (xyxy in the 64 px input and image, class, score). B and C lie on A's object with the
# other class (IoU 0.9 and 0.6 with A; 2/3 between B and C); D is alone and weak.
BOXES = {
    "A": ([10.0, 10.0, 30.0, 30.0], 0, 0.9),
    "B": ([10.0, 10.0, 30.0, 28.0], 1, 0.8),
    "C": ([10.0, 10.0, 30.0, 22.0], 1, 0.6),
    "D": ([40.0, 40.0, 60.0, 60.0], 0, 0.3),
}
LINES = {  # their YOLO label lines on a 64 x 64 image
    "A": "0 0.312500 0.312500 0.312500 0.312500",
    "B": "1 0.312500 0.296875 0.312500 0.281250",
    "C": "1 0.312500 0.250000 0.312500 0.187500",
    "D": "0 0.781250 0.781250 0.312500 0.312500",
}


def fixed_detector(path: Path, boxes: list[tuple[list[float], int, float]]) -> Path:
    """A detector ONNX whose output is the same candidate boxes for every image, in
    Ultralytics' (1, 4 + classes, anchors) layout, with the class names in its metadata: a
    stand-in for a trained detector, so that a test chooses the boxes. Decoding, NMS and the
    writers that read it are the real ones."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.zeros((1, 4 + len(CLASSES), len(boxes)), dtype=np.float32)
    for i, ((x1, y1, x2, y2), cls, score) in enumerate(boxes):
        table[0, :4, i] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        table[0, 4 + cls, i] = score
    nodes = [  # output = table + 0 * mean(image): the image is an input, as in a detector
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["table", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(table.shape))],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": str(dict(enumerate(CLASSES)))})
    onnx.save(model, path)
    return path


@pytest.fixture
def fixed(tmp_path: Path) -> tuple[Path, Path]:
    """(the fixed detector with BOXES, a folder of three 64 x 64 images)."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(images / f"{i}.png")
    return fixed_detector(tmp_path / "fixed.onnx", list(BOXES.values())), images


def run(*args: str) -> Any:
    from typer.testing import CliRunner

    from edgetune.cli import app

    return CliRunner().invoke(app, ["detect", *args])


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ([], "ACD"),  # B drops (IoU 0.9 with A, across classes); C stays (0.6 <= 0.7)
        (["--no-agnostic"], "ABCD"),
        (["--iou", "0.5"], "AD"),
        (["--iou", "0.5", "--no-agnostic"], "ABD"),  # C drops: B, same class, 2/3 > 0.5
        (["--conf", "0.35"], "AC"),
        (["--conf", "0.35", "--iou", "0.5", "--agnostic"], "A"),
    ],
)
def test_annotate_writes_the_boxes_that_conf_iou_and_agnostic_keep(
    fixed: tuple[Path, Path], tmp_path: Path, options: list[str], kept: str
) -> None:
    import xml.etree.ElementTree as ET

    model, images = fixed
    out = tmp_path / "out"
    result = run("annotate", str(model), str(images), str(out), *options)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{3 * len(kept)} boxes on 3 images in {out}")
    for i in range(3):
        assert (out / "labels" / f"{i}.txt").read_text().splitlines() == [LINES[k] for k in kept]
    boxes = list(ET.parse(out / "annotations.xml").iter("box"))
    scores = [f"{BOXES[k][2]:.3f}" for k in kept] * 3
    assert [box.findtext("attribute") for box in boxes] == scores
    assert [box.get("label") for box in boxes] == [CLASSES[BOXES[k][1]] for k in kept] * 3


@pytest.mark.parametrize(
    ("options", "summary"),
    [([], "9 crops from 3 images"), (["--no-agnostic"], "12 crops from 3 images")],
)
def test_crops_take_one_crop_per_object_unless_told_otherwise(
    fixed: tuple[Path, Path], tmp_path: Path, options: list[str], summary: str
) -> None:
    model, images = fixed
    out = tmp_path / "out"
    result = run("crops", str(model), str(images), str(out), "--min-size", "1", *options)
    assert result.exit_code == 0, result.output
    broken = 3 if not options else 6  # C, or B and C, on each image
    assert result.stdout == f"{summary} in {out}: broken {broken}, healthy 6\n"
    assert len(list((out / "broken").glob("*.png"))) == broken


def test_crops_that_no_box_passes_name_the_threshold_and_write_nothing(
    fixed: tuple[Path, Path], tmp_path: Path
) -> None:
    model, images = fixed
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("crops", str(model), str(images), str(out), "--conf", "0.95")
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    assert result.stderr == (
        f"error: no crop passes the thresholds on 3 images: no box of {model} scores above "
        "--conf 0.95 (the highest score is 0.9); lower --conf below the best box's score "
        f"(e.g. --conf 0.89), check that {model} is the detector you meant, or train it longer "
        "(more train.epochs)\n"
    )
    result = run("crops", str(model), str(images), str(out), "--min-size", "100")
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    assert result.stderr == (
        f"error: no crop passes the thresholds on 3 images: 9 boxes of {model} score above "
        "--conf 0.25, but none gives a crop of --min-size 100 px on each side (the largest "
        "gives 24 px); lower --min-size to 24 or pass larger images\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no .out.partial-*
    result = run("crops", str(model), str(images), str(out), "--conf", "0.89", "--min-size", "24")
    assert result.stdout == f"3 crops from 3 images in {out}: healthy 3\n", result.output


@pytest.mark.parametrize(
    ("options", "warning"),
    [
        ([], None),
        (
            ["--val-fraction", "0"],
            "val/ has no crops; fix: raise --val-fraction (now 0.0) or crop more images",
        ),
        (
            ["--conf", "0.85"],
            "train/ has crops of one class only (healthy); fix: crop more images that show "
            "every class, or check the labeller ({model} labelled 3 of 3 crops)",
        ),
    ],
)
def test_labelled_crops_warn_when_the_classifier_study_would_refuse_them(
    fixed: tuple[Path, Path], tmp_path: Path, options: list[str], warning: str | None
) -> None:
    from tasks.data import DataError, inspect_dataset

    model, images = fixed
    out = tmp_path / "out"
    result = run(
        "crops",
        str(model),
        str(images),
        str(out),
        "--label-with",
        str(model),
        "--min-size",
        "1",
        *options,
    )
    assert result.exit_code == 0, result.output
    if warning is None:
        assert result.stderr == ""
        assert inspect_dataset(out).counts() == {"train": 6, "val": 3}
        return
    head = (
        f"warning: {out} is not a dataset the classifier study accepts yet (train/ and val/ "
        "with the same 2 or more class folders): "
    )
    assert result.stderr == head + warning.format(model=model) + "\n"
    with pytest.raises(DataError):
        inspect_dataset(out)


def test_nms_compares_boxes_clipped_to_the_image(tmp_path: Path) -> None:
    """Two boxes of one class: IoU 0.5 as the model gives them, one box once clipped."""
    from tasks.detection.predict import OnnxDetector

    past_edge = ([-20.0, 40.0, 20.0, 60.0], 0, 0.5)
    inside = ([0.0, 40.0, 20.0, 60.0], 0, 0.45)
    model = fixed_detector(tmp_path / "edge.onnx", [past_edge, inside])
    for agnostic in (False, True):
        detector = OnnxDetector(model, conf=0.25, iou=0.7, agnostic=agnostic)
        boxes, scores, _ = detector.predict(np.zeros((64, 64, 3), dtype=np.uint8))
        assert boxes.tolist() == [[0.0, 40.0, 20.0, 60.0]]
        assert scores.tolist() == pytest.approx([0.5])
