"""Detection metrics computed on the controller from what a model returned (numpy only).

Array conventions (pixel coordinates, ``xyxy`` corners):

* detections: float array ``(K, 7)``, rows ``[image_index, x1, y1, x2, y2, score, class_id]``;
* ground truth: float array ``(M, 6)``, rows ``[image_index, class_id, x1, y1, x2, y2]``.

``image_index`` lies in ``[0, n_images)`` and ``class_id`` in ``[0, num_classes)``; both must
be whole numbers. An empty input of any shape counts as zero rows.

Matching, for each IoU threshold ``t`` in :data:`IOU_THRESHOLDS` (0.50, 0.55, ..., 0.95):
per image and class, detections are taken by descending score and each is matched to the
still-unmatched ground-truth box of the same image and class with the highest IoU, if that
IoU is at least ``t`` (up to a tolerance of 1e-9, so an IoU that equals the threshold in exact
arithmetic counts). A matched detection is a true positive, any other a false positive.
Detections with equal scores are ordered by their remaining columns, so no result depends on
the order of the detection rows.

Average precision (COCO style): over all detections of a class ranked by score, precision
and recall after each detection give a curve; the precision envelope (the running maximum
from the right) is read at the 101 recall levels 0.00, 0.01, ..., 1.00 (at the first point
whose recall reaches the level, 0 where none does) and averaged. ``map50`` is the mean AP at
IoU 0.5 over the classes that have ground truth; ``map50_95`` the mean over those classes of
the mean AP over the ten thresholds. Classes without ground truth are left out of both.

``precision`` and ``recall`` are at IoU 0.5, at one confidence threshold shared by all
classes: the one (among the distinct detection scores, keeping detections with
``score >= threshold``) that maximises the mean F1 over the classes with ground truth (the
highest such threshold on a tie). Each is the mean over those classes; a class with no
detection above the threshold has precision 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "IOU_THRESHOLDS",
    "RECALL_LEVELS",
    "DetectionMetrics",
    "average_precision",
    "box_iou",
    "detection_metrics",
    "gap_to_float",
]

FloatArray = npt.NDArray[np.float64]

IOU_THRESHOLDS: FloatArray = np.linspace(0.5, 0.95, 10)
"""The ten IoU thresholds of ``mAP50-95``; the first one (0.5) gives ``mAP50``."""

RECALL_LEVELS: FloatArray = np.arange(101, dtype=np.float64) / 100.0
"""The 101 recall levels at which the precision envelope is read (exact ``i / 100``)."""

_IOU_TOLERANCE = 1e-9
_DETECTION_LAYOUT = "[image_index, x1, y1, x2, y2, score, class_id]"
_GROUND_TRUTH_LAYOUT = "[image_index, class_id, x1, y1, x2, y2]"


@dataclass(frozen=True)
class DetectionMetrics:
    """Detection quality of one model on one evaluation set (see the module docstring)."""

    map50: float
    map50_95: float
    precision: float
    recall: float
    ap50: dict[int, float]
    ap50_95: dict[int, float]
    n_images: int
    n_boxes: int
    n_detections: int

    def as_dict(self, class_names: Sequence[str]) -> dict[str, float]:
        """Flat metrics for logging: means, per-class APs keyed by class name, detection count."""
        names = list(class_names)
        unknown = sorted(c for c in self.ap50 if not 0 <= c < len(names))
        if unknown:
            raise ValueError(
                f"class id {unknown[0]} has no name: class_names holds {len(names)} names; "
                "pass the dataset's full list of class names, indexed by class id."
            )
        used = [names[c] for c in sorted(self.ap50)]
        duplicated = sorted({n for n in used if used.count(n) > 1})
        if duplicated:
            raise ValueError(
                f"class name {duplicated[0]!r} is used by more than one class id; "
                "give every class a distinct name."
            )
        out: dict[str, float] = {
            "map50": self.map50,
            "map50_95": self.map50_95,
            "precision": self.precision,
            "recall": self.recall,
        }
        for c in sorted(self.ap50):
            out[f"ap50_95/{names[c]}"] = self.ap50_95[c]
            out[f"ap50/{names[c]}"] = self.ap50[c]
        out["n_detections"] = float(self.n_detections)
        return out


def _boxes(values: npt.ArrayLike, what: str) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(
            f"{what} must be an (N, 4) array of [x1, y1, x2, y2] boxes; got shape {arr.shape}."
        )
    return arr


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Pairwise IoU of ``(A, 4)`` and ``(B, 4)`` ``xyxy`` boxes as an ``(A, B)`` array.

    A box with ``x2 <= x1`` or ``y2 <= y1`` has zero area; a pair whose union is empty has
    IoU 0.
    """
    ba = _boxes(a, "a")
    bb = _boxes(b, "b")
    ix1 = np.maximum(ba[:, None, 0], bb[None, :, 0])
    iy1 = np.maximum(ba[:, None, 1], bb[None, :, 1])
    ix2 = np.minimum(ba[:, None, 2], bb[None, :, 2])
    iy2 = np.minimum(ba[:, None, 3], bb[None, :, 3])
    inter = np.clip(ix2 - ix1, 0.0, None) * np.clip(iy2 - iy1, 0.0, None)
    area_a = np.clip(ba[:, 2] - ba[:, 0], 0.0, None) * np.clip(ba[:, 3] - ba[:, 1], 0.0, None)
    area_b = np.clip(bb[:, 2] - bb[:, 0], 0.0, None) * np.clip(bb[:, 3] - bb[:, 1], 0.0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    iou: FloatArray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou


def average_precision(recall: npt.ArrayLike, precision: npt.ArrayLike) -> float:
    """101-point interpolated AP (COCO style) of one precision/recall curve.

    ``recall`` and ``precision`` are the values after each ranked detection (recall
    non-decreasing). The precision envelope is read at recall levels 0.00 ... 1.00 and
    averaged; an empty curve has AP 0.
    """
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    if r.ndim != 1 or p.ndim != 1 or r.shape != p.shape:
        raise ValueError(
            f"recall and precision must be 1-D arrays of the same length; got shapes "
            f"{r.shape} and {p.shape}. Pass one value per ranked detection."
        )
    if r.size == 0:
        return 0.0
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(p))):
        raise ValueError("recall and precision must be finite; drop NaN/inf values first.")
    if np.any(np.diff(r) < 0):
        raise ValueError(
            "recall must be non-decreasing (values after each detection ranked by "
            "descending score); sort the detections by score before building the curve."
        )
    envelope = np.maximum.accumulate(p[::-1])[::-1]
    first = np.searchsorted(r, RECALL_LEVELS, side="left")
    reached = first < r.size
    values = np.zeros(RECALL_LEVELS.size)
    values[reached] = envelope[first[reached]]
    return float(values.mean())


def _table(values: npt.ArrayLike, columns: int, what: str, layout: str) -> FloatArray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be a numeric array with rows {layout}; it could not be converted: {exc}"
        ) from exc
    if arr.size == 0:
        return arr.reshape(0, columns)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise ValueError(
            f"{what} must be an (N, {columns}) array with rows {layout}; got shape {arr.shape}. "
            "Stack one row per box in that column order."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or inf; drop or fix those rows first.")
    return arr


def _indices(column: FloatArray, upper: int, what: str, name: str) -> npt.NDArray[np.int64]:
    fractional = column != np.round(column)
    if np.any(fractional):
        raise ValueError(
            f"{what} {name} must be whole numbers; got {column[fractional][0]!r}. "
            "Check the column order."
        )
    outside = (column < 0) | (column >= upper)
    if np.any(outside):
        raise ValueError(
            f"{what} {name} {int(column[outside][0])} is outside [0, {upper}); "
            f"pass the right {'n_images' if name == 'image_index' else 'num_classes'} "
            "or fix the rows."
        )
    return column.astype(np.int64)


def _match(
    det_boxes: FloatArray,
    det_groups: npt.NDArray[np.int64],
    gt_boxes: FloatArray,
    gt_groups: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """True-positive flags ``(K, T)`` for detections already sorted by descending score."""
    hits = np.zeros((det_boxes.shape[0], IOU_THRESHOLDS.size), dtype=bool)
    gt_order = np.argsort(gt_groups, kind="stable")
    gt_keys, gt_starts = np.unique(gt_groups[gt_order], return_index=True)
    gt_bounds = np.append(gt_starts, gt_order.size)
    gt_slot = {int(k): i for i, k in enumerate(gt_keys)}
    det_order = np.argsort(det_groups, kind="stable")  # keeps score order inside a group
    det_keys, det_starts = np.unique(det_groups[det_order], return_index=True)
    det_bounds = np.append(det_starts, det_order.size)
    thresholds = IOU_THRESHOLDS - _IOU_TOLERANCE
    rows = np.arange(IOU_THRESHOLDS.size)
    for gi, key in enumerate(det_keys):
        slot = gt_slot.get(int(key))
        if slot is None:
            continue
        d_idx = det_order[det_bounds[gi] : det_bounds[gi + 1]]
        g_idx = gt_order[gt_bounds[slot] : gt_bounds[slot + 1]]
        ious = box_iou(det_boxes[d_idx], gt_boxes[g_idx])
        taken = np.zeros((IOU_THRESHOLDS.size, g_idx.size), dtype=bool)
        for row in np.flatnonzero(ious.max(axis=1) >= thresholds[0]):
            candidates = np.where(taken, -1.0, ious[row][None, :])
            best = np.argmax(candidates, axis=1)
            ok = candidates[rows, best] >= thresholds
            taken[rows[ok], best[ok]] = True
            hits[d_idx[row], ok] = True
    return hits


def _precision_recall(
    scores: FloatArray,
    classes: npt.NDArray[np.int64],
    hits50: npt.NDArray[np.bool_],
    gt_classes: npt.NDArray[np.int64],
    n_gt: npt.NDArray[np.int64],
) -> tuple[float, float]:
    """Mean precision and recall at the score threshold that maximises mean F1."""
    distinct = np.unique(scores)[::-1]
    kept = np.searchsorted(-scores, -distinct, side="right")  # detections with score >= t

    def per_class(c: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        positions = np.flatnonzero(classes == c)
        cum_tp = np.concatenate(([0], np.cumsum(hits50[positions])))
        n_det = np.searchsorted(positions, kept, side="left")
        return cum_tp[n_det], n_det

    f1_sum = np.zeros(kept.size)
    for c in gt_classes:
        tp, n_det = per_class(int(c))
        f1_sum += 2.0 * tp / (n_det + n_gt[c])
    best = int(np.argmax(f1_sum))
    precisions: list[float] = []
    recalls: list[float] = []
    for c in gt_classes:
        tp, n_det = per_class(int(c))
        precisions.append(float(tp[best] / n_det[best]) if n_det[best] > 0 else 0.0)
        recalls.append(float(tp[best] / n_gt[c]))
    return float(np.mean(precisions)), float(np.mean(recalls))


def detection_metrics(
    detections: npt.ArrayLike,
    ground_truth: npt.ArrayLike,
    num_classes: int,
    n_images: int,
) -> DetectionMetrics:
    """mAP50, mAP50-95, precision and recall of detections against ground truth.

    See the module docstring for the array layouts, the matching rule and the definitions.
    """
    # Over 80 lines because the input checks, the per-class matching and the averaging
    # share the validated arrays; split, each part would re-derive them.
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes}.")
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1; got {n_images}.")
    det = _table(detections, 7, "detections", _DETECTION_LAYOUT)
    gt = _table(ground_truth, 6, "ground_truth", _GROUND_TRUTH_LAYOUT)
    det_images = _indices(det[:, 0], n_images, "detections", "image_index")
    det_classes = _indices(det[:, 6], num_classes, "detections", "class_id")
    gt_images = _indices(gt[:, 0], n_images, "ground_truth", "image_index")
    gt_classes = _indices(gt[:, 1], num_classes, "ground_truth", "class_id")

    n_gt = np.bincount(gt_classes, minlength=num_classes).astype(np.int64)
    present = np.flatnonzero(n_gt)
    if present.size == 0:
        raise ValueError(
            "there are no ground-truth boxes, so detection metrics are undefined; "
            "evaluate on images whose label files list at least one box."
        )

    n_det = det.shape[0]
    if n_det == 0:
        zeros = {int(c): 0.0 for c in present}
        return DetectionMetrics(
            map50=0.0,
            map50_95=0.0,
            precision=0.0,
            recall=0.0,
            ap50=dict(zeros),
            ap50_95=dict(zeros),
            n_images=n_images,
            n_boxes=gt.shape[0],
            n_detections=0,
        )

    # Canonical order: descending score, ties broken by the other columns.
    order = np.lexsort(
        (det[:, 4], det[:, 3], det[:, 2], det[:, 1], det[:, 0], det[:, 6], -det[:, 5])
    )
    det = det[order]
    det_images = det_images[order]
    det_classes = det_classes[order]
    hits = _match(
        det[:, 1:5],
        det_images * num_classes + det_classes,
        gt[:, 2:6],
        gt_images * num_classes + gt_classes,
    )

    ap = np.zeros((present.size, IOU_THRESHOLDS.size))
    for ci, c in enumerate(present):
        class_hits = hits[det_classes == c]
        if class_hits.shape[0] == 0:
            continue
        cum_tp = np.cumsum(class_hits, axis=0)
        recall = cum_tp / n_gt[c]
        precision = cum_tp / np.arange(1, class_hits.shape[0] + 1)[:, None]
        for ti in range(IOU_THRESHOLDS.size):
            ap[ci, ti] = average_precision(recall[:, ti], precision[:, ti])

    mean_precision, mean_recall = _precision_recall(
        det[:, 5], det_classes, hits[:, 0], present, n_gt
    )
    per_class_50_95 = ap.mean(axis=1)
    return DetectionMetrics(
        map50=float(ap[:, 0].mean()),
        map50_95=float(per_class_50_95.mean()),
        precision=mean_precision,
        recall=mean_recall,
        ap50={int(c): float(ap[i, 0]) for i, c in enumerate(present)},
        ap50_95={int(c): float(per_class_50_95[i]) for i, c in enumerate(present)},
        n_images=n_images,
        n_boxes=gt.shape[0],
        n_detections=n_det,
    )


def gap_to_float(device: Mapping[str, float], float_: Mapping[str, float]) -> dict[str, float]:
    """``{"<k>_gap": float_[k] - device[k]}`` for every ``map*`` key present in both.

    A positive gap is accuracy the deployed model lost against the float reference.
    """
    return {
        f"{k}_gap": float(float_[k]) - float(device[k])
        for k in device
        if k.startswith("map") and k in float_
    }
