"""Object detectors (Ultralytics YOLO): data, metrics, prediction, crops and annotation."""
