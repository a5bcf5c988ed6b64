"""Selective-classification metrics for edge-deployed classifiers (numpy only).

A classifier that may abstain is judged on *which* samples it keeps, not only on
how many it gets right. For every sample ``i`` we use

* confidence ``κ_i = max_c probs[i, c]`` and prediction ``argmax_c probs[i, c]``
  (``np.argmax``: the first maximal class wins);
* error ``e_i = 1`` if the prediction differs from ``labels[i]``, else ``0``.

Accepting every sample with ``κ_i ≥ t`` gives one *operating point* per distinct
confidence ``t`` (exact float equality; tied samples are accepted or rejected
together, so no metric depends on sample order):

* coverage ``c(t) = #accepted / N``;
* generalized risk ``g(t) = #(accepted and wrong) / N``;
* selective risk ``r(t) = #(accepted and wrong) / #accepted``.

AUGRC (Traub et al., NeurIPS 2024) is the trapezoidal area under ``g(c)``, the
curve starting at ``(0, 0)``; range ``[0, 0.5]``, lower is better. Its minimum for
error rate ``ε`` is ``ε²/2`` (all errors ranked below all correct samples), so
``e_augrc = augrc - ε²/2`` isolates the ranking quality. With ties counted as ½
it satisfies exactly ``AUGRC = (1 - AUROC_f)·acc·(1 - acc) + (1 - acc)²/2``.

AURC is the trapezoidal area under ``r(c)`` over the operating points, with the
first point's risk held constant from coverage 0 to its coverage (a rectangle);
see :func:`aurc`.

Probabilities need not sum exactly to 1 (dequantised INT8 outputs are
approximate); they only have to be finite.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "accuracy",
    "augrc",
    "augrc_bootstrap_ci",
    "aurc",
    "classification_metrics",
    "coverage_at_risk",
    "e_augrc",
    "ece",
    "failure_auroc",
    "operating_points",
    "optimal_augrc",
    "risk_coverage_curve",
    "softmax",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------- validation


def _as_real_2d(name: str, values: npt.ArrayLike) -> FloatArray:
    """Convert to a finite float64 (N, C) array, failing loudly on anything else."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise ValueError(
            f"{name} must be a real-valued numeric array, but got dtype {arr.dtype}; "
            f"convert it with np.asarray({name}, dtype=float)"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (N, C), but got shape {arr.shape}; "
            "stack samples along axis 0 (a single sample is shape (1, C))"
        )
    if arr.shape[0] < 1:
        raise ValueError(
            f"{name} must contain at least one sample (N >= 1), but got shape {arr.shape}; "
            "metrics of an empty set are undefined"
        )
    if arr.shape[1] < 2:
        raise ValueError(
            f"{name} must have at least 2 classes (C >= 2), but got shape {arr.shape}; "
            "pass one score per class, not only the maximum"
        )
    out = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(out)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{name} must be finite, but found {int(bad.sum())} NaN/inf value(s) in "
            f"row(s) {rows[:10].tolist()}; drop or repair those samples before scoring"
        )
    return out


def _validate(probs: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    """Check the (probs, labels) contract once, so the metric code can trust its inputs."""
    p = _as_real_2d("probs", probs)
    n, c = p.shape
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be integers, but got dtype {y.dtype}; "
            "cast with labels.astype(int) after checking they are whole class indices"
        )
    if y.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D array of length N, but got shape {y.shape}; "
            "flatten it with labels.ravel()"
        )
    if y.shape[0] != n:
        raise ValueError(
            f"labels and probs must have the same number of samples, but got "
            f"len(labels)={y.shape[0]} and probs.shape[0]={n}; pass matching arrays"
        )
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= c:
        raise ValueError(
            f"labels must lie in [0, C) = [0, {c}), but got min={lo}, max={hi}; "
            "check the class-index mapping against the columns of probs"
        )
    return p, y.astype(np.int64, copy=False)


def _confidence_and_errors(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[FloatArray, BoolArray]:
    """Reduce validated inputs to the two per-sample quantities every metric needs."""
    p, y = _validate(probs, labels)
    conf = p.max(axis=1)
    errors = p.argmax(axis=1) != y
    return conf, errors


def _check_int(name: str, value: int, minimum: int) -> None:
    """Reject bools, non-integers and too-small counts for integer parameters."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, but got {value!r}")


# --------------------------------------------------------------------------- core curves


def _trapezoid(y: FloatArray, x: FloatArray) -> float:
    """Trapezoid rule, spelled out so the integration convention is explicit."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _curve(conf: FloatArray, errors: BoolArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Operating points (one per distinct confidence) with the coverage-0 start prepended."""
    n = conf.shape[0]
    order = np.argsort(-conf, kind="stable")
    sorted_conf = conf[order]
    # Last index of each run of equal confidence: a tie group is one threshold.
    ends = np.append(np.flatnonzero(np.diff(sorted_conf) != 0), n - 1)
    accepted = (ends + 1).astype(np.float64)
    wrong = np.cumsum(errors[order], dtype=np.float64)[ends]
    selective = wrong / accepted
    coverage = np.concatenate(([0.0], accepted / n))
    generalized = np.concatenate(([0.0], wrong / n))
    selective = np.concatenate(([selective[0]], selective))
    return coverage, generalized, selective


def _augrc(conf: FloatArray, errors: BoolArray) -> float:
    coverage, generalized, _ = _curve(conf, errors)
    return _trapezoid(generalized, coverage)


def _aurc(conf: FloatArray, errors: BoolArray) -> float:
    # The prepended point repeats the first risk, so its trapezoid is the rectangle.
    coverage, _, selective = _curve(conf, errors)
    return _trapezoid(selective, coverage)


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks with ties sharing their average rank (Mann–Whitney convention)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) * 0.5)[inverse].astype(np.float64)


def _failure_auroc(conf: FloatArray, errors: BoolArray) -> float:
    correct = ~errors
    n_pos = int(correct.sum())
    n_neg = int(errors.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(conf)
    u = float(ranks[correct].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _ece(conf: FloatArray, errors: BoolArray, n_bins: int) -> float:
    upper_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:]
    # Bin i is (edge_i, edge_{i+1}]; values outside (0, 1] go to the nearest end bin.
    bins = np.minimum(np.searchsorted(upper_edges, conf, side="left"), n_bins - 1)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=(~errors).astype(np.float64), minlength=n_bins)
    # |Σacc - Σconf| / N per bin equals frac_bin · |acc_bin - conf_bin|.
    return float(np.abs(correct_sum - conf_sum).sum() / conf.shape[0])


def _bootstrap(
    conf: FloatArray, errors: BoolArray, n_boot: int, alpha: float, seed: int
) -> tuple[float, float]:
    if n_boot == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = conf.shape[0]
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):  # one resample at a time keeps memory O(N)
        idx = rng.integers(0, n, size=n)
        values[b] = _augrc(conf[idx], errors[idx])
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# --------------------------------------------------------------------------- public API


def softmax(logits: npt.ArrayLike) -> FloatArray:
    """Row-wise softmax in float64; subtracting the row max avoids overflow."""
    z = _as_real_2d("logits", logits)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    result: FloatArray = e / e.sum(axis=1, keepdims=True)
    return result


def risk_coverage_curve(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(coverage, generalized_risk, selective_risk) at each distinct confidence threshold.

    Thresholds run from the highest confidence down, so coverage increases. Index 0 is
    the coverage-0 start: generalized risk 0 and, since selective risk is undefined
    there, the first operating point's selective risk. This is the single source of
    truth that :func:`augrc` and :func:`aurc` integrate.
    """
    return _curve(*_confidence_and_errors(probs, labels))


def operating_points(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(threshold, coverage, generalized_risk, selective_risk) at each distinct confidence,
    highest first: accepting every sample with confidence ≥ ``threshold[i]`` gives the
    i-th point of :func:`risk_coverage_curve` (without its coverage-0 start)."""
    conf, errors = _confidence_and_errors(probs, labels)
    coverage, generalized, selective = _curve(conf, errors)
    thresholds = np.unique(conf)[::-1]
    return thresholds, coverage[1:], generalized[1:], selective[1:]


def coverage_at_risk(
    probs: npt.ArrayLike, labels: npt.ArrayLike, target: float
) -> tuple[float, float | None, float]:
    """The deployment threshold for a target selective risk: (coverage, threshold, risk)
    of the largest coverage whose selective risk is at most ``target``; (0, None, 0) when
    even the most confident group is wrong more often than that."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target risk must lie in [0, 1], but got {target!r}; pass a fraction")
    thresholds, coverage, _, selective = operating_points(probs, labels)
    meets = np.flatnonzero(selective <= target)
    if not meets.size:
        return 0.0, None, 0.0
    best = int(meets[-1])
    return float(coverage[best]), float(thresholds[best]), float(selective[best])


def augrc(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the generalized risk–coverage curve (raw scale [0, 0.5]; lower is better).

    Unlike AURC it weighs every error by how early it is accepted, without the
    1/coverage blow-up that makes AURC dominated by the first few samples.
    """
    return _augrc(*_confidence_and_errors(probs, labels))


def aurc(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the selective risk–coverage curve (range [0, 1]; lower is better).

    Convention: trapezoid over the operating points from the first (highest-confidence
    group) coverage to 1, plus the rectangle from coverage 0 to that first coverage at
    the first point's selective risk (risk held constant towards coverage 0).
    """
    return _aurc(*_confidence_and_errors(probs, labels))


def optimal_augrc(error_rate: float) -> float:
    """Smallest AUGRC reachable at this error rate: every error ranked last, ε²/2."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(
            f"error_rate must lie in [0, 1], but got {error_rate!r}; pass a fraction, not a percent"
        )
    return 0.5 * error_rate**2


def e_augrc(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Excess AUGRC over the optimum at the same error rate: ranking quality alone."""
    conf, errors = _confidence_and_errors(probs, labels)
    return _augrc(conf, errors) - optimal_augrc(float(errors.mean()))


def accuracy(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Top-1 accuracy (argmax; the first maximal class wins ties)."""
    _, errors = _confidence_and_errors(probs, labels)
    return 1.0 - float(errors.mean())


def precision_recall(
    positive: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """One class's precision–recall curve over the distinct scores, highest threshold
    last: ``precision``, ``recall`` (each ending at 1 and 0, where no image is called
    positive) and the ``thresholds`` (one fewer). The definition of scikit-learn's
    ``precision_recall_curve`` (every point kept), without its 0.7 s import."""
    truth = np.asarray(positive, dtype=bool).ravel()
    score = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(score, kind="mergesort")[::-1]  # descending; ties keep a fixed order
    score, hits = score[order], truth[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]  # each score's last image
    tps = np.cumsum(hits)[last]
    called = last + 1.0  # images at or above the threshold
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[(tps / called)[::-1], 1.0], np.r_[recall[::-1], 0.0], score[last][::-1]


def average_precision(positive: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """The precision–recall curve's step integral (scikit-learn's ``average_precision_score``
    for one class against the rest)."""
    precision, recall, _ = precision_recall(positive, scores)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def failure_auroc(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """AUROC of confidence for telling correct (positive) from wrong predictions.

    Ties count ½ (Mann–Whitney U with average ranks). Undefined, and returned as
    ``nan``, when every prediction is correct or every prediction is wrong.
    """
    return _failure_auroc(*_confidence_and_errors(probs, labels))


def ece(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error over equal-width max-prob bins (0, 1/B], ..., (1-1/B, 1].

    Σ_bins (n_bin / N)·|accuracy_bin - mean confidence_bin|; empty bins contribute 0.
    Confidences ≤ 0 fall in the first bin and > 1 (approximate INT8 outputs) in the last.
    """
    _check_int("n_bins", n_bins, 1)
    return _ece(*_confidence_and_errors(probs, labels), n_bins)


def augrc_bootstrap_ci(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of AUGRC, resampling samples with replacement.

    Deterministic for a given seed (``np.random.default_rng(seed)``); ``n_boot=0``
    skips the bootstrap and returns ``(nan, nan)``.
    """
    _check_int("n_boot", n_boot, 0)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), but got {alpha!r}; use e.g. 0.05 for a 95% CI")
    conf, errors = _confidence_and_errors(probs, labels)
    return _bootstrap(conf, errors, n_boot, alpha, seed)


def classification_metrics(
    probs: npt.ArrayLike, labels: npt.ArrayLike, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, float]:
    """All metrics in one validated pass, as plain floats ready for logging.

    ``bootstrap`` is the number of resamples for the 95% AUGRC interval; 0 leaves the
    ``augrc_ci_*`` keys ``nan``. ``failure_auroc`` is ``nan`` when it is undefined.
    """
    _check_int("bootstrap", bootstrap, 0)
    conf, errors = _confidence_and_errors(probs, labels)
    error_rate = float(errors.mean())
    area = _augrc(conf, errors)
    low, high = _bootstrap(conf, errors, bootstrap, 0.05, seed)
    return {
        "augrc": area,
        "aurc": _aurc(conf, errors),
        "e_augrc": area - optimal_augrc(error_rate),
        "accuracy": 1.0 - error_rate,
        "failure_auroc": _failure_auroc(conf, errors),
        "ece": _ece(conf, errors, 15),
        "augrc_ci_low": low,
        "augrc_ci_high": high,
        "n": float(conf.shape[0]),
    }
