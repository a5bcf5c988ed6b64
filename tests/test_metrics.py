"""Value tests for tasks.metrics: hand-computed cases, invariances and a brute-force oracle."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tasks.metrics import (
    accuracy,
    augrc,
    augrc_bootstrap_ci,
    aurc,
    average_precision,
    classification_metrics,
    e_augrc,
    ece,
    failure_auroc,
    optimal_augrc,
    precision_recall,
    risk_coverage_curve,
    softmax,
)

# --------------------------------------------------------------------------- helpers


def binary_probs(
    kappa: list[float], errors: list[int]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(N, 2) probs with max == kappa (>= 0.5) predicting class 0; label 1 marks an error."""
    k = np.asarray(kappa, dtype=np.float64)
    assert np.all(k >= 0.5)
    probs = np.stack([k, 1.0 - k], axis=1)
    labels = np.asarray(errors, dtype=np.int64)
    return probs, labels


def brute_curve(
    probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]
) -> tuple[list[float], list[float], list[float]]:
    """Explicit loop over distinct thresholds, highest first (independent of the vectorised code)."""
    conf = [max(row) for row in probs.tolist()]
    preds = [row.index(max(row)) for row in probs.tolist()]
    wrong = [int(p != y) for p, y in zip(preds, labels.tolist(), strict=True)]
    n = len(conf)
    cov, gen, sel = [], [], []
    for t in sorted(set(conf), reverse=True):
        acc = [i for i in range(n) if conf[i] >= t]
        w = sum(wrong[i] for i in acc)
        cov.append(len(acc) / n)
        gen.append(w / n)
        sel.append(w / len(acc))
    return cov, gen, sel


def brute_augrc(probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    cov, gen, _ = brute_curve(probs, labels)
    area, c0, g0 = 0.0, 0.0, 0.0
    for c, g in zip(cov, gen, strict=True):
        area += (c - c0) * (g + g0) / 2
        c0, g0 = c, g
    return area


def brute_aurc(probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    cov, _, sel = brute_curve(probs, labels)
    area = cov[0] * sel[0]  # rectangle from coverage 0 at the first risk
    for i in range(1, len(cov)):
        area += (cov[i] - cov[i - 1]) * (sel[i] + sel[i - 1]) / 2
    return area


@st.composite
def rounded_inputs(
    draw: st.DrawFn, max_n: int = 25
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Small (probs, labels) whose probabilities are rounded to 1-2 decimals, so ties are common."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, 4))
    decimals = draw(st.sampled_from([1, 2]))
    raw = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n * c, max_size=n * c))
    probs = np.round(np.asarray(raw, dtype=np.float64).reshape(n, c), decimals)
    labels = np.asarray(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return probs, labels.astype(np.int64)


# --------------------------------------------------------------------------- worked example

# κ = [0.9, 0.8, 0.8, 0.6], e = [0, 1, 0, 1]
WORKED = binary_probs([0.9, 0.8, 0.8, 0.6], [0, 1, 0, 1])


def test_worked_example_augrc() -> None:
    # (0,0) (0.25,0) (0.75,0.25) (1,0.5): 0 + 0.5*0.25/2 + 0.25*0.75/2 = 0.15625
    assert augrc(*WORKED) == pytest.approx(0.15625)


def test_worked_example_aurc() -> None:
    # (0.25,0) (0.75,1/3) (1,0.5): 0.25*0 + 0.5*(1/3)/2 + 0.25*(1/3+1/2)/2 = 0.1875
    assert aurc(*WORKED) == pytest.approx(0.1875)


def test_worked_example_e_augrc() -> None:
    assert e_augrc(*WORKED) == pytest.approx(0.15625 - 0.5 * 0.5**2)
    assert e_augrc(*WORKED) == pytest.approx(0.03125)


def test_worked_example_curve() -> None:
    cov, gen, sel = risk_coverage_curve(*WORKED)
    np.testing.assert_allclose(cov, [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(gen, [0.0, 0.0, 0.25, 0.5])
    np.testing.assert_allclose(sel, [0.0, 0.0, 1 / 3, 0.5])


def test_worked_example_other_metrics() -> None:
    assert accuracy(*WORKED) == pytest.approx(0.5)
    # correct κ {0.9, 0.8} vs wrong κ {0.8, 0.6}: pairs 1 + 1 + ½ + 1 = 3.5 of 4
    assert failure_auroc(*WORKED) == pytest.approx(0.875)


# --------------------------------------------------------------------------- ties


def test_tie_aware_value_differs_from_split_ties() -> None:
    # Splitting the 0.8 tie would give 0.1875 (wrong first) or 0.125 (right first):
    #   wrong first: (0.25,0) (0.5,0.25) (0.75,0.25) (1,0.5) -> 0.03125 + 0.0625 + 0.09375
    #   right first: (0.25,0) (0.5,0)    (0.75,0.25) (1,0.5) -> 0 + 0.03125 + 0.09375
    # The single tie-aware operating point gives their mean, 0.15625, in either order.
    swapped = binary_probs([0.9, 0.8, 0.8, 0.6], [0, 0, 1, 1])
    assert augrc(*WORKED) == pytest.approx(0.15625)
    assert augrc(*swapped) == pytest.approx(0.15625)
    assert augrc(*swapped) not in (pytest.approx(0.1875), pytest.approx(0.125))


def test_two_tied_samples_one_wrong() -> None:
    # One point (1, 0.5): triangle 0.25. Split ties would give 0.375 or 0.125.
    for errors in ([1, 0], [0, 1]):
        probs, labels = binary_probs([0.8, 0.8], errors)
        assert augrc(probs, labels) == pytest.approx(0.25)
        assert aurc(probs, labels) == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(data=rounded_inputs(), seed=st.integers(0, 2**32 - 1))
def test_permutation_invariance(
    data: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]], seed: int
) -> None:
    probs, labels = data
    perm = np.random.default_rng(seed).permutation(len(labels))
    assert augrc(probs[perm], labels[perm]) == pytest.approx(augrc(probs, labels), abs=1e-12)
    assert aurc(probs[perm], labels[perm]) == pytest.approx(aurc(probs, labels), abs=1e-12)


def test_permutation_within_tie_group() -> None:
    kappa = [0.7] * 6 + [0.95, 0.55]
    errors = [1, 0, 1, 0, 0, 1, 0, 1]
    probs, labels = binary_probs(kappa, errors)
    ref_g, ref_s = augrc(probs, labels), aurc(probs, labels)
    rng = np.random.default_rng(1)
    for _ in range(20):
        perm = rng.permutation(len(labels))
        assert augrc(probs[perm], labels[perm]) == pytest.approx(ref_g, abs=1e-12)
        assert aurc(probs[perm], labels[perm]) == pytest.approx(ref_s, abs=1e-12)


# --------------------------------------------------------------------------- extremes


def test_all_correct() -> None:
    probs, labels = binary_probs([0.9, 0.7, 0.6, 0.6], [0, 0, 0, 0])
    assert augrc(probs, labels) == 0.0
    assert aurc(probs, labels) == 0.0
    assert math.isnan(failure_auroc(probs, labels))


def test_all_wrong() -> None:
    # g(c) = c, triangle of area 0.5; selective risk is 1 everywhere.
    probs, labels = binary_probs([0.9, 0.7, 0.6, 0.6], [1, 1, 1, 1])
    assert augrc(probs, labels) == pytest.approx(0.5)
    assert aurc(probs, labels) == pytest.approx(1.0)
    assert e_augrc(probs, labels) == pytest.approx(0.0)
    assert math.isnan(failure_auroc(probs, labels))


def test_perfect_ranking_reaches_optimum() -> None:
    # correct at 0.9/0.8/0.7, wrong at 0.6/0.55 -> err 0.4
    # points (0.2,0) (0.4,0) (0.6,0) (0.8,0.2) (1,0.4): 0.2*0.1 + 0.2*0.3 = 0.08 = 0.5*0.4²
    probs, labels = binary_probs([0.9, 0.8, 0.7, 0.6, 0.55], [0, 0, 0, 1, 1])
    assert augrc(probs, labels) == pytest.approx(0.08)
    assert augrc(probs, labels) == pytest.approx(optimal_augrc(0.4))
    assert e_augrc(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert failure_auroc(probs, labels) == pytest.approx(1.0)


def test_worst_ranking() -> None:
    # wrong at 0.9/0.8, correct at 0.7/0.6/0.55 -> err 0.4
    # points (0.2,0.2) (0.4,0.4) (0.6,0.4) (0.8,0.4) (1,0.4):
    # 0.2*0.1 + 0.2*0.3 + 3 * 0.2*0.4 = 0.02 + 0.06 + 0.24 = 0.32
    probs, labels = binary_probs([0.9, 0.8, 0.7, 0.6, 0.55], [1, 1, 0, 0, 0])
    assert augrc(probs, labels) == pytest.approx(0.32)
    assert failure_auroc(probs, labels) == pytest.approx(0.0)


def test_all_confidences_tied() -> None:
    # One operating point (1, err=0.25): triangle 0.5*1*0.25 = 0.125; AURC rectangle 1*0.25.
    probs, labels = binary_probs([0.7, 0.7, 0.7, 0.7], [0, 1, 0, 0])
    cov, gen, sel = risk_coverage_curve(probs, labels)
    np.testing.assert_allclose(cov, [0.0, 1.0])
    np.testing.assert_allclose(gen, [0.0, 0.25])
    np.testing.assert_allclose(sel, [0.25, 0.25])
    assert augrc(probs, labels) == pytest.approx(0.125)
    assert aurc(probs, labels) == pytest.approx(0.25)
    assert failure_auroc(probs, labels) == pytest.approx(0.5)


def test_single_sample() -> None:
    probs = np.array([[0.2, 0.8]])
    assert augrc(probs, np.array([1])) == 0.0
    assert augrc(probs, np.array([0])) == pytest.approx(0.5)


def test_probs_need_not_sum_to_one() -> None:
    # approximate INT8 outputs; only max/argmax matter for AUGRC
    probs = np.array([[0.93, 0.11], [0.31, 0.78], [0.52, 0.50], [0.60, 0.43]])
    labels = np.array([0, 1, 1, 0])
    # κ = .93 .78 .52 .60; errors only at κ .52 -> perfect ranking, err 0.25
    assert augrc(probs, labels) == pytest.approx(0.5 * 0.25**2)


def test_multiclass_argmax() -> None:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    labels = np.array([1, 2, 2])
    # κ .7 ok, .6 ok, .5 wrong -> points (1/3,0) (2/3,0) (1,1/3): (1/3)*(1/6) = 1/18
    assert accuracy(probs, labels) == pytest.approx(2 / 3)
    assert augrc(probs, labels) == pytest.approx(1 / 18)


# --------------------------------------------------------------------------- oracle + identity


@settings(max_examples=100, deadline=None)
@given(data=rounded_inputs())
def test_matches_brute_force(data: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]) -> None:
    probs, labels = data
    assert augrc(probs, labels) == pytest.approx(brute_augrc(probs, labels), abs=1e-12)
    assert aurc(probs, labels) == pytest.approx(brute_aurc(probs, labels), abs=1e-12)
    cov, gen, sel = risk_coverage_curve(probs, labels)
    b_cov, b_gen, b_sel = brute_curve(probs, labels)
    np.testing.assert_allclose(cov, [0.0, *b_cov])
    np.testing.assert_allclose(gen, [0.0, *b_gen])
    np.testing.assert_allclose(sel, [b_sel[0], *b_sel])


@settings(max_examples=100, deadline=None)
@given(data=rounded_inputs())
def test_augrc_auroc_identity(data: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]) -> None:
    probs, labels = data
    auroc = failure_auroc(probs, labels)
    assume(not math.isnan(auroc))
    acc = accuracy(probs, labels)
    expected = (1 - auroc) * acc * (1 - acc) + 0.5 * (1 - acc) ** 2
    assert augrc(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= augrc(probs, labels) <= 0.5
    assert e_augrc(probs, labels) >= -1e-12


# --------------------------------------------------------------------------- failure AUROC


def test_failure_auroc_ties_count_half() -> None:
    # correct κ {0.9, 0.7}, wrong κ {0.7, 0.6}
    # pairs: (.9,.7)=1 (.9,.6)=1 (.7,.7)=½ (.7,.6)=1 -> 3.5/4
    probs, labels = binary_probs([0.9, 0.7, 0.7, 0.6], [0, 0, 1, 1])
    assert failure_auroc(probs, labels) == pytest.approx(0.875)


def test_failure_auroc_all_tied_is_half() -> None:
    probs, labels = binary_probs([0.6, 0.6, 0.6], [0, 1, 1])
    assert failure_auroc(probs, labels) == pytest.approx(0.5)


# --------------------------------------------------------------------------- ECE


def test_ece_hand_example() -> None:
    # n_bins=5 -> bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]
    # bin (.8,1]: κ .9,.9, acc 1/2 -> |.5-.9| * 2/4 = 0.2
    # bin (.6,.8]: κ .65,.65, acc 1 -> |1-.65| * 2/4 = 0.175
    probs, labels = binary_probs([0.9, 0.9, 0.65, 0.65], [0, 1, 0, 0])
    assert ece(probs, labels, n_bins=5) == pytest.approx(0.375)


def test_ece_single_bin_default() -> None:
    probs, labels = binary_probs([0.9, 0.9], [0, 1])
    assert ece(probs, labels) == pytest.approx(0.4)


def test_ece_bin_edges_are_right_closed() -> None:
    # κ = 0.5 sits in (0, .5], κ = 1.0 in (.5, 1] with n_bins=2
    # bin 1: κ .5 correct -> |1-.5|*1/2 = .25; bin 2: κ 1.0 wrong -> |0-1|*1/2 = .5
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    labels = np.array([0, 1])
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.75)


def test_ece_perfectly_calibrated() -> None:
    probs, labels = binary_probs([0.75] * 4, [0, 0, 0, 1])
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- bootstrap


def _random_sample(n: int, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(size=(n, 3)) * 2.0)
    labels = rng.integers(0, 3, size=n)
    # make confidence informative: relabel the most confident half as correct
    top = np.argsort(-probs.max(axis=1))[: n // 2]
    labels[top] = probs[top].argmax(axis=1)
    return probs, labels


def test_bootstrap_deterministic_and_brackets_estimate() -> None:
    probs, labels = _random_sample(200, seed=3)
    ci1 = augrc_bootstrap_ci(probs, labels, n_boot=300, seed=7)
    ci2 = augrc_bootstrap_ci(probs, labels, n_boot=300, seed=7)
    ci3 = augrc_bootstrap_ci(probs, labels, n_boot=300, seed=8)
    assert ci1 == ci2
    assert ci1 != ci3
    low, high = ci1
    assert low <= augrc(probs, labels) <= high
    assert 0.0 <= low < high <= 0.5


def test_bootstrap_zero_resamples() -> None:
    low, high = augrc_bootstrap_ci(*WORKED, n_boot=0)
    assert math.isnan(low) and math.isnan(high)


def test_bootstrap_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="n_boot must be an integer >= 0"):
        augrc_bootstrap_ci(*WORKED, n_boot=-1)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        augrc_bootstrap_ci(*WORKED, alpha=1.5)


# --------------------------------------------------------------------------- bundle


def test_classification_metrics_keys_and_values() -> None:
    out = classification_metrics(*WORKED, bootstrap=50, seed=0)
    assert list(out) == [
        "augrc",
        "aurc",
        "e_augrc",
        "accuracy",
        "failure_auroc",
        "ece",
        "augrc_ci_low",
        "augrc_ci_high",
        "n",
    ]
    assert all(type(v) is float for v in out.values())
    assert out["augrc"] == pytest.approx(0.15625)
    assert out["aurc"] == pytest.approx(0.1875)
    assert out["e_augrc"] == pytest.approx(0.03125)
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["failure_auroc"] == pytest.approx(0.875)
    assert out["ece"] == pytest.approx(ece(*WORKED))
    assert out["n"] == 4.0
    assert out["augrc_ci_low"] <= out["augrc_ci_high"]
    assert (out["augrc_ci_low"], out["augrc_ci_high"]) == augrc_bootstrap_ci(
        *WORKED, n_boot=50, seed=0
    )


def test_classification_metrics_without_bootstrap() -> None:
    out = classification_metrics(*WORKED, bootstrap=0)
    assert math.isnan(out["augrc_ci_low"]) and math.isnan(out["augrc_ci_high"])
    assert out["augrc"] == pytest.approx(0.15625)


# --------------------------------------------------------------------------- softmax


def test_softmax_values_and_stability() -> None:
    out = softmax(np.array([[0.0, 0.0], [0.0, math.log(3.0)], [1000.0, 1000.0 + math.log(3.0)]]))
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.25, 0.75], [0.25, 0.75]])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def test_softmax_rejects_1d() -> None:
    with pytest.raises(ValueError, match=r"logits must be a 2-D array \(N, C\)"):
        softmax(np.array([1.0, 2.0]))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.array([0.1, 0.9, 0.3, 0.5, 0.2]), [0] * 5, r"2-D array \(N, C\), but got shape \(5,\)"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), r"at least one sample \(N >= 1\)"),
        (np.ones((3, 1)), [0, 0, 0], r"at least 2 classes \(C >= 2\), but got shape \(3, 1\)"),
        (np.array([["a", "b"]]), [0], "real-valued numeric array"),
        (
            np.array([[0.2, np.nan], [0.5, 0.5]]),
            [0, 1],
            r"finite, but found 1 NaN/inf.*row\(s\) \[0\]",
        ),
        (np.array([[0.2, np.inf]]), [0], "must be finite"),
        (
            np.eye(3),
            [0, 1],
            r"same number of samples, but got len\(labels\)=2 and probs.shape\[0\]=3",
        ),
        (np.eye(3), [0, 1, 3], r"labels must lie in \[0, C\) = \[0, 3\), but got min=0, max=3"),
        (np.eye(3), [-1, 1, 2], r"but got min=-1, max=2"),
        (np.eye(3), [0.0, 1.0, 2.0], "labels must be integers, but got dtype float64"),
        (
            np.eye(3),
            [[0], [1], [2]],
            r"labels must be a 1-D array of length N, but got shape \(3, 1\)",
        ),
    ],
)
def test_validation_errors(probs: npt.ArrayLike, labels: npt.ArrayLike, match: str) -> None:
    for fn in (augrc, aurc, accuracy, failure_auroc, ece, e_augrc, risk_coverage_curve):
        with pytest.raises(ValueError, match=match):
            fn(probs, labels)
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels, bootstrap=0)


def test_ece_rejects_bad_bins() -> None:
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        ece(*WORKED, n_bins=0)


def test_optimal_augrc() -> None:
    assert optimal_augrc(0.0) == 0.0
    assert optimal_augrc(0.5) == 0.125
    assert optimal_augrc(1.0) == 0.5
    with pytest.raises(ValueError, match=r"error_rate must lie in \[0, 1\]"):
        optimal_augrc(40.0)


# ----------------------------------------------------- precision–recall (report's per class)


def test_worked_example_precision_recall() -> None:
    # scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg): thresholds 0.1, 0.8, 0.9
    precision, recall, thresholds = precision_recall([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
    assert thresholds.tolist() == [0.1, 0.8, 0.9]
    assert precision.tolist() == [0.5, 2 / 3, 1.0, 1.0]
    assert recall.tolist() == [1.0, 1.0, 0.5, 0.0]
    # steps: recall 0 -> 0.5 at precision 1, 0.5 -> 1 at precision 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(0.5 + 1 / 3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0])),
        min_size=1,
        max_size=40,
    )
)
def test_precision_recall_is_scikit_learns(pairs: list[tuple[bool, float]]) -> None:
    """The same curve and average precision as scikit-learn's, ties and all."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    positive = np.array([p for p, _ in pairs])
    scores = np.array([s for _, s in pairs])
    assume(positive.any())  # the report asks only for classes with images
    ours = precision_recall(positive, scores)
    theirs = precision_recall_curve(positive, scores)
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-15)
    assert average_precision(positive, scores) == pytest.approx(
        average_precision_score(positive, scores), abs=1e-15
    )
