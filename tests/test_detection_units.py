"""Value tests for tasks.detection: detection metrics and the annotation writers."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.detection.annotate import (
    ImageDetections,
    crop_box,
    cvat_xml,
    write_cvat_xml,
    write_yolo_labels,
    yolo_label_lines,
)
from tasks.detection.metrics import (
    IOU_THRESHOLDS,
    DetectionMetrics,
    average_precision,
    box_iou,
    detection_metrics,
    gap_to_float,
)

# --------------------------------------------------------------------------- metrics


def det_row(image: int, box: tuple[float, float, float, float], score: float, cls: int) -> list:
    return [image, *box, score, cls]


def gt_row(image: int, cls: int, box: tuple[float, float, float, float]) -> list:
    return [image, cls, *box]


def test_iou_thresholds() -> None:
    assert IOU_THRESHOLDS.shape == (10,)
    assert IOU_THRESHOLDS[0] == 0.5
    assert IOU_THRESHOLDS[-1] == pytest.approx(0.95)


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]], dtype=float)
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    # a0: identical; half overlap 50/(100+100-50); disjoint; contained 25/100.
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.25])
    # a1 with b0: 25/175; with b1: 50/150; disjoint; corner touch at (5,5) only -> 0.
    np.testing.assert_allclose(iou[1], [25 / 175, 50 / 150, 0.0, 0.0])


def test_box_iou_degenerate_and_empty() -> None:
    zero = np.array([[3, 3, 3, 3]], dtype=float)
    assert box_iou(zero, zero)[0, 0] == 0.0
    assert box_iou(np.zeros((0, 4)), zero).shape == (0, 1)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou(np.zeros((2, 5)), zero)


def test_average_precision_perfect() -> None:
    recall = np.array([0.25, 0.5, 0.75, 1.0])
    precision = np.ones(4)
    assert average_precision(recall, precision) == 1.0


def test_average_precision_false_positive_first() -> None:
    # One ground truth; ranks: FP then TP. recall [0, 1], precision [0, 1/2].
    # The envelope is 1/2 everywhere, and every level 0.00..1.00 is reached -> AP = 0.5.
    assert average_precision([0.0, 1.0], [0.0, 0.5]) == pytest.approx(0.5)


def test_average_precision_envelope_by_hand() -> None:
    # Two ground truths; ranks: TP, FP, TP. recall [.5, .5, 1], precision [1, .5, 2/3].
    # Envelope [1, 2/3, 2/3]: levels 0.00..0.50 (51 of them) read 1, levels 0.51..1.00
    # (50 of them) read 2/3 -> AP = (51 + 50 * 2/3) / 101.
    ap = average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3])
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_average_precision_partial_recall_and_empty() -> None:
    # Recall stops at 0.5: levels above 0.5 read 0 -> 51/101.
    assert average_precision([0.5], [1.0]) == pytest.approx(51 / 101)
    assert average_precision([], []) == 0.0
    with pytest.raises(ValueError, match="non-decreasing"):
        average_precision([1.0, 0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        average_precision([1.0, 0.5], [1.0])


def test_perfect_detector() -> None:
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10)), gt_row(1, 1, (5, 5, 20, 30))], dtype=float)
    det = np.array(
        [det_row(0, (0, 0, 10, 10), 0.9, 0), det_row(1, (5, 5, 20, 30), 0.8, 1)], dtype=float
    )
    m = detection_metrics(det, gt, num_classes=2, n_images=2)
    assert m.map50 == 1.0
    assert m.map50_95 == 1.0
    assert m.precision == 1.0
    assert m.recall == 1.0
    assert m.ap50 == {0: 1.0, 1: 1.0}
    assert m.n_images == 2 and m.n_boxes == 2 and m.n_detections == 2


def test_iou_0_6_counts_only_at_the_first_three_thresholds() -> None:
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10))], dtype=float)
    det = np.array([det_row(0, (0, 0, 10, 6), 0.9, 0)], dtype=float)  # IoU 60/100
    assert box_iou(det[:, 1:5], gt[:, 2:6])[0, 0] == pytest.approx(0.6)
    m = detection_metrics(det, gt, num_classes=1, n_images=1)
    assert m.map50 == 1.0
    assert m.map50_95 == pytest.approx(0.3)
    assert m.ap50_95 == {0: pytest.approx(0.3)}


def test_classes_without_ground_truth_are_left_out() -> None:
    gt = np.array([gt_row(0, 2, (0, 0, 10, 10))], dtype=float)
    det = np.array(
        [det_row(0, (0, 0, 10, 10), 0.9, 2), det_row(0, (50, 50, 60, 60), 0.95, 0)], dtype=float
    )
    m = detection_metrics(det, gt, num_classes=3, n_images=1)
    assert set(m.ap50) == {2} and set(m.ap50_95) == {2}
    assert m.map50 == 1.0  # class 0's false positive does not enter any mean
    assert m.precision == 1.0 and m.recall == 1.0
    d = m.as_dict(["cat", "dog", "bird"])
    assert d == {
        "map50": 1.0,
        "map50_95": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "ap50_95/bird": 1.0,
        "ap50/bird": 1.0,
        "n_detections": 2.0,
    }


def test_as_dict_needs_a_name_for_every_class() -> None:
    m = DetectionMetrics(0.5, 0.4, 0.5, 0.5, {3: 0.5}, {3: 0.4}, 1, 1, 1)
    with pytest.raises(ValueError, match="class id 3"):
        m.as_dict(["a", "b"])


def test_no_detections_gives_zeros() -> None:
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10)), gt_row(0, 1, (0, 0, 5, 5))], dtype=float)
    m = detection_metrics(np.zeros((0, 7)), gt, num_classes=2, n_images=1)
    assert (m.map50, m.map50_95, m.precision, m.recall) == (0.0, 0.0, 0.0, 0.0)
    assert m.ap50 == {0: 0.0, 1: 0.0}
    assert m.ap50_95 == {0: 0.0, 1: 0.0}
    assert m.n_detections == 0 and m.n_boxes == 2


def test_no_ground_truth_raises() -> None:
    det = np.array([det_row(0, (0, 0, 10, 10), 0.9, 0)], dtype=float)
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        detection_metrics(det, np.zeros((0, 6)), num_classes=1, n_images=1)


def test_class_mismatch_never_matches() -> None:
    gt = np.array([gt_row(0, 1, (0, 0, 10, 10))], dtype=float)
    det = np.array([det_row(0, (0, 0, 10, 10), 0.9, 0)], dtype=float)
    m = detection_metrics(det, gt, num_classes=2, n_images=1)
    assert m.ap50 == {1: 0.0}
    assert m.map50 == 0.0 and m.precision == 0.0 and m.recall == 0.0


def test_other_image_never_matches() -> None:
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10))], dtype=float)
    det = np.array([det_row(1, (0, 0, 10, 10), 0.9, 0)], dtype=float)
    assert detection_metrics(det, gt, num_classes=1, n_images=2).map50 == 0.0


def test_duplicate_detection_is_a_false_positive() -> None:
    # Two detections on one box: the higher score matches, the other is an FP ranked second.
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10))], dtype=float)
    det = np.array(
        [det_row(0, (0, 0, 10, 10), 0.9, 0), det_row(0, (0, 0, 10, 9), 0.8, 0)], dtype=float
    )
    m = detection_metrics(det, gt, num_classes=1, n_images=1)
    assert m.map50 == 1.0  # the FP after full recall does not lower the envelope
    # Best F1 keeps only the first detection.
    assert m.precision == 1.0 and m.recall == 1.0


def test_false_positive_ranked_first_in_detection_metrics() -> None:
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10))], dtype=float)
    det = np.array(
        [det_row(0, (50, 50, 60, 60), 0.9, 0), det_row(0, (0, 0, 10, 10), 0.8, 0)], dtype=float
    )
    m = detection_metrics(det, gt, num_classes=1, n_images=1)
    assert m.map50 == pytest.approx(0.5)
    assert m.map50_95 == pytest.approx(0.5)
    # Threshold 0.8 keeps both: P = 1/2, R = 1, F1 = 2/3 beats threshold 0.9 (F1 0).
    assert m.precision == pytest.approx(0.5) and m.recall == 1.0


def test_greedy_matching_takes_highest_iou() -> None:
    # One detection overlaps two ground truths; it takes the one with the higher IoU,
    # and the second detection gets the other one.
    gt = np.array([gt_row(0, 0, (0, 0, 10, 10)), gt_row(0, 0, (2, 0, 12, 10))], dtype=float)
    det = np.array(
        [det_row(0, (1, 0, 11, 10), 0.9, 0), det_row(0, (0, 0, 10, 10), 0.8, 0)], dtype=float
    )
    m = detection_metrics(det, gt, num_classes=1, n_images=1)
    assert m.map50 == 1.0
    assert m.recall == 1.0


@pytest.mark.parametrize(
    ("det", "gt", "match"),
    [
        (np.zeros((1, 6)), np.zeros((1, 6)), r"detections must be an \(N, 7\) array"),
        (np.zeros((1, 7)), np.zeros((1, 5)), r"ground_truth must be an \(N, 6\) array"),
        (
            [det_row(0, (0, 0, 1, 1), 0.5, 3)],
            [gt_row(0, 0, (0, 0, 1, 1))],
            r"detections class_id 3 is outside \[0, 2\)",
        ),
        (
            [det_row(0, (0, 0, 1, 1), 0.5, 0)],
            [gt_row(0, -1, (0, 0, 1, 1))],
            r"ground_truth class_id -1 is outside",
        ),
        (
            [det_row(5, (0, 0, 1, 1), 0.5, 0)],
            [gt_row(0, 0, (0, 0, 1, 1))],
            r"detections image_index 5 is outside \[0, 3\)",
        ),
        (
            [det_row(0, (0, 0, 1, 1), 0.5, 0)],
            [gt_row(3, 0, (0, 0, 1, 1))],
            r"ground_truth image_index 3 is outside",
        ),
        (
            [[0, 0, 0, 1, 1, 0.5, 0.5]],
            [gt_row(0, 0, (0, 0, 1, 1))],
            "whole numbers",
        ),
        (
            [det_row(0, (0, 0, 1, float("nan")), 0.5, 0)],
            [gt_row(0, 0, (0, 0, 1, 1))],
            "NaN",
        ),
    ],
)
def test_bad_inputs_raise(det: object, gt: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detection_metrics(det, gt, num_classes=2, n_images=3)  # type: ignore[arg-type]


def test_gap_to_float() -> None:
    device = {"map50": 0.6, "map50_95": 0.4, "precision": 0.7, "map_only_device": 0.1}
    float_ = {"map50": 0.65, "map50_95": 0.42, "precision": 0.9}
    gap = gap_to_float(device, float_)
    assert set(gap) == {"map50_gap", "map50_95_gap"}
    assert gap["map50_gap"] == pytest.approx(0.05)
    assert gap["map50_95_gap"] == pytest.approx(0.02)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[int], int, int]:
    n_images = draw(st.integers(1, 3))
    num_classes = draw(st.integers(1, 3))
    coord = st.integers(0, 12)

    def box() -> tuple[float, float, float, float]:
        x1, y1 = draw(coord), draw(coord)
        return (x1, y1, x1 + draw(st.integers(1, 8)), y1 + draw(st.integers(1, 8)))

    gt = [
        gt_row(draw(st.integers(0, n_images - 1)), draw(st.integers(0, num_classes - 1)), box())
        for _ in range(draw(st.integers(1, 6)))
    ]
    # Few distinct scores, so ties in score are common.
    det = [
        det_row(
            draw(st.integers(0, n_images - 1)),
            box(),
            draw(st.sampled_from([0.1, 0.5, 0.5, 0.9])),
            draw(st.integers(0, num_classes - 1)),
        )
        for _ in range(draw(st.integers(0, 10)))
    ]
    perm = draw(st.permutations(list(range(len(det)))))
    return (
        np.array(det, dtype=float).reshape(-1, 7),
        np.array(gt, dtype=float),
        perm,
        num_classes,
        n_images,
    )


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_metrics_invariant_to_row_order_and_bounded(
    scene: tuple[np.ndarray, np.ndarray, list[int], int, int],
) -> None:
    det, gt, perm, num_classes, n_images = scene
    a = detection_metrics(det, gt, num_classes, n_images)
    b = detection_metrics(det[perm], gt, num_classes, n_images)
    assert a == b
    assert a.map50 >= a.map50_95 - 1e-12
    for value in (a.map50, a.map50_95, a.precision, a.recall):
        assert 0.0 <= value <= 1.0
    for c in a.ap50:
        assert 0.0 <= a.ap50_95[c] <= a.ap50[c] + 1e-12 <= 1.0 + 1e-12


# --------------------------------------------------------------------------- annotate


def image(
    name: str,
    boxes: list[list[float]],
    classes: list[int],
    scores: list[float],
    width: int = 200,
    height: int = 100,
) -> ImageDetections:
    return ImageDetections(
        name=name,
        width=width,
        height=height,
        boxes=np.array(boxes, dtype=float).reshape(-1, 4),
        classes=np.array(classes, dtype=int),
        scores=np.array(scores, dtype=float),
    )


def parse_yolo(line: str, width: int, height: int) -> tuple[int, np.ndarray]:
    cls, cx, cy, w, h = line.split()
    cxf, cyf, wf, hf = float(cx) * width, float(cy) * height, float(w) * width, float(h) * height
    return int(cls), np.array([cxf - wf / 2, cyf - hf / 2, cxf + wf / 2, cyf + hf / 2])


def test_yolo_label_line_for_known_box() -> None:
    det = image("a.jpg", [[20, 10, 60, 50]], [3], [0.9])
    # cx = 40/200, cy = 30/100, w = 40/200, h = 40/100.
    assert yolo_label_lines(det) == ["3 0.200000 0.300000 0.200000 0.400000"]


def test_yolo_round_trip() -> None:
    boxes = [[12.3, 4.56, 178.9, 97.1], [0.5, 0.25, 3.75, 2.5]]
    det = image("a.jpg", boxes, [0, 7], [0.9, 0.4], width=640, height=480)
    lines = yolo_label_lines(det)
    assert len(lines) == 2
    for line, box, cls in zip(lines, boxes, [0, 7], strict=True):
        parsed_cls, parsed = parse_yolo(line, 640, 480)
        assert parsed_cls == cls
        np.testing.assert_allclose(parsed, box, rtol=1e-5, atol=1e-6 * 640)


def test_yolo_clips_and_drops() -> None:
    det = image(
        "a.jpg",
        [[-20, 50, 40, 150], [300, 10, 400, 20], [10, 10, 10, 20]],
        [1, 2, 0],
        [0.9, 0.8, 0.7],
    )
    # First box clipped to (0, 50, 40, 100); the second is outside, the third has no width.
    assert yolo_label_lines(det) == ["1 0.100000 0.750000 0.200000 0.500000"]


def test_write_yolo_labels(tmp_path: Path) -> None:
    dets = [
        image("top.jpg", [[20, 10, 60, 50]], [3], [0.9]),
        image("a/b/nested.png", [[0, 0, 200, 100], [20, 10, 60, 50]], [0, 1], [0.5, 0.6]),
        image("empty.jpg", [], [], []),
    ]
    paths = write_yolo_labels(dets, tmp_path / "labels")
    assert paths == [
        tmp_path / "labels" / "top.txt",
        tmp_path / "labels" / "a" / "b" / "nested.txt",
        tmp_path / "labels" / "empty.txt",
    ]
    assert paths[0].read_text() == "3 0.200000 0.300000 0.200000 0.400000\n"
    assert paths[1].read_text().splitlines() == [
        "0 0.500000 0.500000 1.000000 1.000000",
        "1 0.200000 0.300000 0.200000 0.400000",
    ]
    assert paths[2].exists() and paths[2].read_text() == ""
    leftovers = [p for p in (tmp_path / "labels").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_write_yolo_labels_rejects_colliding_names(tmp_path: Path) -> None:
    dets = [image("x.jpg", [], [], []), image("x.png", [], [], [])]
    with pytest.raises(ValueError, match=r"x\.jpg.*x\.png"):
        write_yolo_labels(dets, tmp_path)


def test_image_detections_validation() -> None:
    with pytest.raises(ValueError, match="one class id and one score per box"):
        image("a.jpg", [[0, 0, 1, 1]], [0, 1], [0.5])
    with pytest.raises(ValueError, match="relative"):
        image("../a.jpg", [], [], [])
    with pytest.raises(ValueError, match="positive"):
        image("a.jpg", [], [], [], width=0)


def test_cvat_xml(tmp_path: Path) -> None:
    dets = [
        image("a/one.jpg", [[-5, 10.123, 60.456, 150], [20, 10, 60, 50]], [1, 0], [0.8734, 0.5]),
        image("two.jpg", [], [], []),
        image("three.jpg", [[1, 2, 3, 4]], [2], [0.25], width=10, height=10),
    ]
    text = cvat_xml(dets, ["person", "car", "dog"], task_name="review")
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>')
    root = ET.fromstring(text.split("\n", 1)[1])
    assert root.tag == "annotations"
    assert root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task is not None
    assert task.findtext("name") == "review"
    assert task.findtext("size") == "3"
    assert task.findtext("mode") == "annotation"
    labels = task.findall("labels/label")
    assert [lb.findtext("name") for lb in labels] == ["person", "car", "dog"]
    assert all(lb.findtext("type") == "rectangle" for lb in labels)
    assert all(lb.find("attributes") is not None for lb in labels)

    images = root.findall("image")
    assert [im.attrib for im in images] == [
        {"id": "0", "name": "a/one.jpg", "width": "200", "height": "100"},
        {"id": "1", "name": "two.jpg", "width": "200", "height": "100"},
        {"id": "2", "name": "three.jpg", "width": "10", "height": "10"},
    ]
    assert [len(im.findall("box")) for im in images] == [2, 0, 1]
    first = images[0].findall("box")[0]
    assert first.attrib == {
        "label": "car",
        "source": "auto",
        "occluded": "0",
        "xtl": "0.00",
        "ytl": "10.12",
        "xbr": "60.46",
        "ybr": "100.00",
        "z_order": "0",
    }
    attrs = first.findall("attribute")
    assert len(attrs) == 1
    assert attrs[0].attrib == {"name": "score"} and attrs[0].text == "0.873"
    assert images[2].findall("box")[0].attrib["label"] == "dog"

    path = write_cvat_xml(dets, ["person", "car", "dog"], tmp_path / "out" / "annotations.xml")
    assert path.read_text(encoding="utf-8") == cvat_xml(dets, ["person", "car", "dog"])
    assert ET.parse(path).getroot().findall("image")[0].attrib["name"] == "a/one.jpg"


def test_cvat_xml_escapes_names() -> None:
    dets = [image('odd & "name" <1>.jpg', [[0, 0, 5, 5]], [0], [0.5])]
    root = ET.fromstring(cvat_xml(dets, ["a<b"]).split("\n", 1)[1])
    assert root.findall("image")[0].attrib["name"] == 'odd & "name" <1>.jpg'
    assert root.findall("image/box")[0].attrib["label"] == "a<b"


def test_cvat_xml_class_out_of_range() -> None:
    dets = [image("a.jpg", [[0, 0, 5, 5]], [4], [0.5])]
    with pytest.raises(ValueError, match=r"class id 4.*2 classes"):
        cvat_xml(dets, ["a", "b"])


def test_crop_box_margin_and_clipping() -> None:
    # 20x10 box, margin 0.1 -> 2 px left/right, 1 px top/bottom.
    assert crop_box([50, 40, 70, 50], 200, 100, 0.1) == (48, 39, 72, 51)
    # Fractions round outward.
    assert crop_box([10.5, 10.5, 20.2, 20.2], 200, 100, 0.0) == (10, 10, 21, 21)
    # Near the corner: clipped to the image.
    assert crop_box([2, 95, 42, 100], 200, 100, 0.5) == (0, 92, 62, 100)
    assert crop_box([0, 0, 200, 100], 200, 100, 0.25) == (0, 0, 200, 100)


def test_crop_box_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="margin"):
        crop_box([0, 0, 10, 10], 100, 100, -0.1)
    with pytest.raises(ValueError, match="empty crop"):
        crop_box([150, 150, 160, 160], 100, 100, 0.1)
