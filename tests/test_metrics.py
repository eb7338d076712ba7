"""Every metric on a small example computed by hand (and the vectorised scoring against a plain loop)."""
from __future__ import annotations

import numpy as np
import pytest

from engine import metrics as m
from engine.aggregate import AGGREGATIONS, aggregate, aggregate_masked
from engine.crossfit import calibration_report, leave_one_source_out
from engine.openset import acceptance_margin, fit_temperature, fit_thresholds
from engine.scoring import Variant, score_matrix, similarity

LABELS = np.array([0, 0, 0, 1, 1, 2])
PREDICTED = np.array([0, 0, 1, 1, 0, 2])


def test_accuracy_confusion_macro_by_hand():
    assert m.accuracy(LABELS, PREDICTED) == pytest.approx(4 / 6)
    matrix = m.confusion_matrix(LABELS, PREDICTED, 3)
    assert matrix.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m.per_class_accuracy(matrix).tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    # macro weighs each source equally: (2/3 + 1/2 + 1) / 3, not 4/6
    assert m.macro_accuracy(matrix) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    with_empty = m.confusion_matrix(np.array([0, 1]), np.array([0, 0]), 3)
    assert np.isnan(m.per_class_accuracy(with_empty)[2]) and m.macro_accuracy(with_empty) == pytest.approx(0.5)


def test_top_k_by_hand():
    scores = np.array([[0.9, 0.5, 0.1],   # truth 0: rank 1
                       [0.9, 0.5, 0.1],   # truth 2: rank 3
                       [0.2, 0.8, 0.5],   # truth 2: rank 2
                       [0.5, 0.5, 0.1]])  # truth 1: tied for first with class 0, which argmax picks
    labels = np.array([0, 2, 2, 1])
    assert m.top_k_accuracy(labels, scores, 1) == pytest.approx(1 / 4) == m.accuracy(labels, scores.argmax(1))
    assert m.top_k_accuracy(labels, scores, 2) == pytest.approx(3 / 4)
    assert m.top_k_accuracy(labels, scores, 3) == 1.0


def test_binary_auroc_by_hand_and_against_sklearn():
    from sklearn.metrics import roc_auc_score

    positive = np.array([1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.4, 0.5, 0.1, 0.4])
    # pairs (pos, neg): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4 (half), loses to 0.5 -> 4.5 / 6
    assert m.binary_auroc(positive, score) == pytest.approx(0.75)
    assert m.binary_auroc(positive, score) == pytest.approx(roc_auc_score(positive, score))
    assert m.binary_auroc(positive, -score) == pytest.approx(0.25)
    assert np.isnan(m.binary_auroc(np.ones(3, bool), np.arange(3.0)))
    rng = np.random.default_rng(0)
    labels, noisy = rng.integers(0, 2, 200).astype(bool), rng.normal(size=200).round(1)
    assert m.binary_auroc(labels, noisy) == pytest.approx(roc_auc_score(labels, noisy))
    # -inf (an unscored source) ranks below everything
    assert m.binary_auroc(np.array([1, 0, 0], bool), np.array([0.1, -np.inf, 0.0])) == 1.0


def test_one_vs_rest_auroc():
    scores = np.array([[0.9, 0.1], [0.6, 0.3], [0.2, 0.8], [0.7, 0.4]])
    labels = np.array([0, 0, 1, 1])
    # class 0 column: positives 0.9, 0.6 vs negatives 0.2, 0.7 -> (2 + 1) / 4
    # class 1 column: positives 0.8, 0.4 vs negatives 0.1, 0.3 -> 4 / 4
    assert m.one_vs_rest_auroc(labels, scores).tolist() == pytest.approx([0.75, 1.0])


def test_softmax_nll_and_ece_by_hand():
    probabilities = m.softmax(np.array([[0.0, np.log(3.0)], [1.0, -np.inf]]), 1.0)
    assert probabilities.ravel().tolist() == pytest.approx([0.25, 0.75, 1.0, 0.0])
    assert m.negative_log_likelihood(np.array([1, 0]), probabilities) == pytest.approx(-np.log(0.75) / 2)
    # four queries, one per confidence bin: ECE = mean |correct - confidence|
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])  # correct, wrong, correct, correct
    assert m.expected_calibration_error(labels, p) == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)
    # two queries in one bin: |mean accuracy - mean confidence| weighted by the bin's share
    p = np.array([[0.95, 0.05], [0.92, 0.08], [0.55, 0.45]])
    labels = np.array([0, 1, 0])
    expected = (2 * abs(0.5 - 0.935) + abs(1 - 0.55)) / 3
    assert m.expected_calibration_error(labels, p) == pytest.approx(expected)
    table = m.reliability_table(labels, p)
    assert sum(r["count"] for r in table) == 3 and table[9]["count"] == 2 and table[9]["accuracy"] == 0.5


def test_classification_report_fields():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2, 1])
    report = m.classification_report(labels, scores, ["a", "b", "c"])
    assert report["accuracy"] == 0.75 and report["per_source"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert report["confusion"]["matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert report["top3_accuracy"] is None  # 3 sources: top-3 is 100% by construction, not reported as a figure
    assert m.classification_report(labels, np.c_[scores, np.zeros(4)], list("abcd"))["top3_accuracy"] == 1.0


@pytest.mark.parametrize("method", AGGREGATIONS)
def test_vectorised_aggregation_matches_engine(method):
    rng = np.random.default_rng(1)
    values = rng.uniform(0.5, 1.0, size=(30, 4, 6))
    mask = rng.random((30, 4, 6)) < 0.7
    got = aggregate_masked(values, mask, method)
    for idx in np.ndindex(30, 4):
        if mask[idx].any():
            assert got[idx] == pytest.approx(aggregate(values[idx][mask[idx]], method), abs=1e-12)
        else:
            assert got[idx] == -np.inf


def test_score_matrix_matches_a_plain_loop():
    rng = np.random.default_rng(2)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    originals, resyntheses = unit(rng.normal(size=(9, 8))), unit(rng.normal(size=(20, 8)))
    labels = np.arange(9) % 3
    references = [[rng.permutation(20)[:rng.integers(0, 4)] for _ in range(3)] for _ in range(9)]
    for variant in (Variant("final", "cosine", "knn", 2), Variant("final", "euclidean", "softmax", 3, fewshot=True)):
        got = score_matrix(originals, resyntheses, references, variant, orig_source=labels, chunk=4)
        for i in range(9):
            for c in range(3):
                values = list(similarity(originals[i:i + 1], resyntheses[references[i][c][:variant.per_source]],
                                         variant.distance)[0])
                if variant.fewshot:  # every other original of source c, never the query itself
                    others = [j for j in range(9) if labels[j] == c and j != i]
                    values += list(similarity(originals[i:i + 1], originals[others], variant.distance)[0])
                expected = aggregate(np.array(values), variant.aggregation) if values else -np.inf
                assert got[i, c] == pytest.approx(expected)


def test_euclidean_ranks_like_cosine_on_unit_vectors():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 6))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    cos, euc = similarity(a, a, "cosine"), similarity(a, a, "euclidean")
    assert np.allclose(euc, -np.sqrt(np.maximum(2 - 2 * cos, 0)), atol=1e-6)
    assert (np.argsort(cos, axis=1) == np.argsort(euc, axis=1)).all()


def test_thresholds_and_margin_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.1], [0.2, 0.6], [0.1, 0.5], [0.4, 0.3]])
    labels = np.array([0, 0, 0, 1, 1, 1])  # the last is attributed to 0 by mistake
    thresholds = fit_thresholds(scores, labels, frr=0.0)
    assert thresholds == pytest.approx({0: 0.7, 1: 0.5}, abs=1e-5)  # just under the lowest correctly attributed
    assert thresholds[0] < 0.7 and thresholds[1] < 0.5
    assert acceptance_margin(np.array([[0.65, 0.1], [0.2, 0.55]]), thresholds) == pytest.approx([-0.05, 0.05], abs=1e-5)
    assert fit_thresholds(scores, labels, frr=0.5)[0] == pytest.approx(0.8, abs=1e-5)  # 0.7 may go, 0.8, 0.9 stay


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(4000, 4)) * 0.02
    true_t = 0.01
    labels = np.array([rng.choice(4, p=p) for p in m.softmax(scores, true_t)])
    assert fit_temperature(scores, labels) == pytest.approx(true_t, rel=0.15)
    report = calibration_report(scores, labels, np.arange(4000) % 50)
    assert report["ece_calibrated"] < 0.05


def test_leave_one_source_out_separates_unknowns():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 30)
    scores = rng.normal(0.5, 0.02, size=(120, 4))
    scores[np.arange(120), labels] += 0.2  # an enrolled source scores its own images far higher
    result = leave_one_source_out(scores, labels, np.arange(120) % 10, ["a", "b", "c", "d"], frr=0.05)
    assert result["auroc"] > 0.99 and result["unknown_rejected"] > 0.9
    assert result["known_false_reject"] < 0.15 and result["known_accuracy_accepted"] == 1.0


def test_exact_false_reject_operating_point():
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(3), 40)
    scores = rng.normal(0.5, 0.05, size=(120, 3))
    scores[np.arange(120), labels] += 0.1
    result = leave_one_source_out(scores, labels, np.arange(120) % 8, ["a", "b", "c"], frr=0.05)
    exact = result["at_exact_false_reject"]
    assert 0 < exact["unknown_rejected"] <= 1 and 0 < exact["known_accuracy_accepted"] <= 1
    assert 0.5 < result["pooled_auroc"] <= 1


# ------------------------------------------------------------------- open-set figures (OSCR, TNR, CCR)
# Knowns 0.9 (correct), 0.8 (misclassified), 0.6, 0.4 (correct); unknowns 0.7, 0.5. Sweeping the threshold
# down: (FPR, CCR) = (0, 0) (0, .25) (0, .25) (.5, .25) (.5, .5) (1, .5) (1, .75).
KNOWN = np.array([0.9, 0.8, 0.6, 0.4])
CORRECT = np.array([True, False, True, True])
UNKNOWN = np.array([0.7, 0.5])


def test_oscr_by_hand():
    # area: 0.5 wide at CCR 0.25, then 0.5 wide at CCR 0.5
    assert m.oscr(CORRECT, KNOWN, UNKNOWN) == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)
    # every known correct: OSCR is the known-vs-unknown AUROC (5 of 8 pairs won: .9 and .8 beat both
    # unknowns, .6 beats .5)
    assert m.oscr(np.ones(4, bool), KNOWN, UNKNOWN) == pytest.approx(5 / 8)
    # perfect separation: OSCR is the closed-set accuracy of the knowns
    assert m.oscr(CORRECT, KNOWN + 1, UNKNOWN) == pytest.approx(0.75)
    # order of the inputs does not matter
    order = np.array([2, 0, 3, 1])
    assert m.oscr(CORRECT[order], KNOWN[order], UNKNOWN[::-1]) == pytest.approx(0.375)


def test_oscr_ties_count_half_like_auroc():
    # one known tied with one unknown: the curve goes (0,0) -> (1,1), area 1/2
    assert m.oscr(np.array([True]), np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)
    # knowns 1, .5; unknowns .5, 0: (0,0) (0,.5) (.5,1) (1,1) -> 0.875 = AUROC with the tie at half
    known, unknown = np.array([1.0, 0.5]), np.array([0.5, 0.0])
    assert m.oscr(np.ones(2, bool), known, unknown) == pytest.approx(0.875)
    positive = np.r_[np.ones(2, bool), np.zeros(2, bool)]
    assert m.binary_auroc(positive, np.r_[known, unknown]) == pytest.approx(0.875)
    rng = np.random.default_rng(0)  # heavily tied integer scores: still equal to the AUROC
    k, u = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)
    assert m.oscr(np.ones(30, bool), k, u) == pytest.approx(
        m.binary_auroc(np.r_[np.ones(30, bool), np.zeros(20, bool)], np.r_[k, u]))


def test_tnr_at_tpr_by_hand():
    # 95% of 4 knowns = all 4: threshold 0.4 accepts both unknowns
    assert m.tnr_at_tpr(KNOWN, UNKNOWN, 0.95) == 0.0
    assert m.tnr_at_tpr(KNOWN, UNKNOWN, 0.75) == pytest.approx(0.5)  # threshold 0.6 rejects 0.5 only
    assert m.tnr_at_tpr(KNOWN, UNKNOWN, 0.5) == pytest.approx(1.0)   # threshold 0.8
    # knowns 1..20: 95% = 19 accepted at threshold 2; unknowns 0.5..19.5 below 2: 0.5 and 1.5
    assert m.tnr_at_tpr(np.arange(1, 21), np.arange(20) + 0.5) == pytest.approx(2 / 20)
    # an unknown tied with the threshold is accepted (a false positive)
    assert m.tnr_at_tpr(np.array([1.0, 0.5]), np.array([0.5, 0.0]), 1.0) == pytest.approx(0.5)


def test_ccr_at_fpr_by_hand():
    # 5% of 2 unknowns = none: the lowest threshold above 0.7 is 0.8; correct knowns >= 0.8: one of four
    assert m.ccr_at_fpr(CORRECT, KNOWN, UNKNOWN, 0.05) == pytest.approx(0.25)
    assert m.ccr_at_fpr(CORRECT, KNOWN, UNKNOWN, 0.5) == pytest.approx(0.5)  # threshold 0.6, one unknown in
    assert m.ccr_at_fpr(CORRECT, KNOWN, UNKNOWN, 1.0) == pytest.approx(0.75)  # everything: closed-set accuracy
    # 20 unknowns 0.5..19.5, 5% = one may pass: lowest threshold above 18.5 is 19 -> knowns 19, 20
    assert m.ccr_at_fpr(np.ones(20, bool), np.arange(1, 21), np.arange(20) + 0.5) == pytest.approx(2 / 20)
    # ties: the unknown tied at 0.5 is accepted with the known there
    known, unknown = np.array([1.0, 0.5]), np.array([0.5, 0.0])
    assert m.ccr_at_fpr(np.ones(2, bool), known, unknown, 0.5) == pytest.approx(1.0)
    assert m.ccr_at_fpr(np.ones(2, bool), known, unknown, 0.0) == pytest.approx(0.5)


def test_open_set_figures_edge_cases():
    assert np.isnan(m.oscr(np.array([], bool), np.array([]), UNKNOWN))
    assert np.isnan(m.tnr_at_tpr(KNOWN, np.array([])))
    assert np.isnan(m.ccr_at_fpr(CORRECT, KNOWN, np.array([])))
    assert m.open_set_figures(CORRECT, KNOWN, np.array([])) == {"oscr": None, "tnr_at_tpr95": None,
                                                                "ccr_at_fpr5": None}
    # nan counts as -inf, infinities are ordinary values
    assert m.tnr_at_tpr(np.array([np.inf, 1.0]), np.array([np.nan, -np.inf]), 1.0) == 1.0
    assert m.oscr(np.ones(2, bool), np.array([np.inf, 1.0]), np.array([np.nan, 2.0])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        m.oscr(np.ones(3, bool), KNOWN, UNKNOWN)
    with pytest.raises(ValueError):
        m.tnr_at_tpr(KNOWN, UNKNOWN, 1.5)
