"""The evaluator's detection post-processing and the detector configs, without training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.config import ConfigError
from tasks.detection.config import load_detector_config, parse_detector_config
from tasks.devices import edgetune_eval

ROOT = Path(__file__).resolve().parents[1]


def test_nms_keeps_the_best_of_overlapping_boxes_of_one_class() -> None:
    rows = np.array(
        [
            [0, 0, 10, 10, 0.9, 0],
            [1, 1, 11, 11, 0.8, 0],  # IoU 0.68 with the first: suppressed at 0.5
            [1, 1, 11, 11, 0.7, 1],  # same place, other class: kept
            [50, 50, 60, 60, 0.6, 0],
            [0, 0, 10, 10, 0.0005, 0],  # under conf
        ],
        dtype=np.float32,
    )
    kept = edgetune_eval.select(rows, conf=0.001, iou=0.5, max_det=300)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert edgetune_eval.select(rows, conf=0.001, iou=0.7, max_det=300).shape == (4, 6)
    assert edgetune_eval.select(rows, conf=0.001, iou=0.5, max_det=2)[:, 4].tolist() == (
        pytest.approx([0.9, 0.7])
    )
    assert edgetune_eval.select(rows, conf=0.95, iou=0.5, max_det=2).shape == (0, 6)


def test_decode_reads_both_ultralytics_layouts() -> None:
    # raw: (4 + C, anchors) with centre boxes; two anchors, two classes
    raw = np.array([[20, 40], [20, 40], [10, 4], [6, 8], [0.1, 0.7], [0.3, 0.2]], dtype=np.float32)
    rows = edgetune_eval.decode_yolo(raw, n_classes=2)
    np.testing.assert_allclose(
        rows, [[15, 17, 25, 23, 0.3, 1], [38, 36, 42, 44, 0.7, 0]], rtol=1e-6
    )
    end2end = np.array([[1, 2, 3, 4, 0.5, 1]], dtype=np.float32)
    assert edgetune_eval.decode_yolo(end2end, n_classes=2).tolist() == [[1, 2, 3, 4, 0.5, 1]]
    with pytest.raises(edgetune_eval.EvalError, match=r"neither \(4 \+ 3 classes"):
        edgetune_eval.decode_yolo(raw, n_classes=3)


def test_hailo_nms_by_class_buffer_is_read_in_pixels() -> None:
    # two classes, room for two boxes each: [count, (y1, x1, y2, x2, score) × 2]
    buffer = np.zeros(2 * (1 + 5 * 2), dtype=np.float32)
    buffer[0] = 1
    buffer[1:6] = [0.1, 0.2, 0.5, 0.6, 0.9]
    buffer[11] = 2
    buffer[12:17] = [0.0, 0.0, 0.25, 0.5, 0.8]
    buffer[17:22] = [0.5, 0.5, 1.0, 1.0, 0.4]
    rows = edgetune_eval.decode_hailo_nms(buffer, n_classes=2, height=100, width=200)
    np.testing.assert_allclose(
        rows,
        [[40, 10, 120, 50, 0.9, 0], [0, 0, 100, 25, 0.8, 1], [100, 50, 200, 100, 0.4, 1]],
        rtol=1e-6,
    )
    with pytest.raises(edgetune_eval.EvalError, match="does not fit 3 classes"):
        edgetune_eval.decode_hailo_nms(buffer, n_classes=3, height=100, width=200)


def test_shipped_detector_configs_hold_the_application_settings() -> None:
    large = load_detector_config(ROOT / "configs" / "detectors" / "l-ml.yaml")
    small = load_detector_config(ROOT / "configs" / "detectors" / "s-ml.yaml")
    assert (large.name, large.model.arch, small.name, small.model.arch) == (
        "l-ml",
        "yolov8l.yaml",
        "s-ml",
        "yolo11n.yaml",
    )
    for cfg in (large, small):
        train = cfg.train
        assert (train.imgsz, train.epochs, train.patience, train.batch, train.cache) == (
            1280,
            300,
            20,
            16,
            True,
        )
        assert Path(cfg.data.yaml).is_absolute()
        assert cfg.compile.onnxruntime.float_tail is True
    assert small.train.single_cls and small.train.single_cls_name == "insulator"
    assert not large.train.single_cls
    assert small.registered_model_name == "s-ml" and large.experiment_name == "detector-l-ml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"arch": "yolov8n.pt"}}, "model.arch: 'yolov8n.pt' is not an architecture YAML"),
        ({"model": {"weights": "w.onnx"}}, "model.weights: 'w.onnx' is not a .pt weights file"),
        ({"train": {"device": "gpu"}}, "train.device: 'gpu': use auto, cpu, or CUDA device ids"),
        ({"train": {"mosiac": 0.5}}, "train.mosiac: unknown key (did you mean 'mosaic'?)"),
        ({"eval": {"iou": 0}}, "eval.iou: Input should be greater than 0"),
    ],
)
def test_bad_detector_configs_name_the_key(change: dict, message: str) -> None:
    raw = {"name": "s-ml", "data": {"yaml": "data.yaml"}, **change}
    with pytest.raises(ConfigError) as error:
        parse_detector_config(raw, source="d.yaml")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_classifier_config_is_not_taken_for_a_detector() -> None:
    with pytest.raises(ConfigError, match="not a detector config"):
        load_detector_config(ROOT / "configs" / "quickstart.yaml")
