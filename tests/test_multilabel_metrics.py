"""Per-label metrics of multi-label models (densenet.analysis.multilabel_metrics) against brute force
and scikit-learn on the images each label counts."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from densenet.analysis.multilabel_metrics import choose_thresholds, format_label_table, label_metric_columns, multilabel_metrics
from densenet.errors import ArgumentError

NAMES = ["Atelectasis", "Edema", "Hernia"]


def _data(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < [0.3, 0.5, 0.05]).astype(float)
    scores = np.clip(targets * rng.uniform(0.2, 0.6, (n, 3)) + rng.uniform(0, 0.5, (n, 3)), 0, 1)
    return targets, scores


def test_ignored_labels_are_left_out_and_the_figures_match_sklearn():
    targets, scores = _data()
    targets[::7, 1] = np.nan  # uncertain, ignored
    m = multilabel_metrics(targets, scores, NAMES)
    keep = ~np.isnan(targets[:, 1])
    assert m["labels"]["Edema"]["images"] == keep.sum()
    assert m["labels"]["Edema"]["auroc"] == pytest.approx(roc_auc_score(targets[keep, 1], scores[keep, 1]), abs=1e-12)
    assert m["labels"]["Edema"]["average_precision"] == pytest.approx(
        average_precision_score(targets[keep, 1], scores[keep, 1]), abs=1e-12)
    scores2 = scores.copy()
    scores2[~keep, 1] = 1 - scores2[~keep, 1]  # what the ignored images score changes nothing
    assert multilabel_metrics(targets, scores2, NAMES)["labels"]["Edema"] == m["labels"]["Edema"]
    assert m["mean_auroc"] == pytest.approx(np.mean([m["labels"][n]["auroc"] for n in NAMES]))


def test_a_label_without_positives_is_named_and_left_out_of_the_means():
    targets, scores = _data()
    targets[:, 2] = 0
    m = multilabel_metrics(targets, scores, NAMES)
    assert m["undefined"] == ["Hernia"] and np.isnan(m["labels"]["Hernia"]["auroc"])
    assert m["mean_auroc"] == pytest.approx((m["labels"]["Atelectasis"]["auroc"] + m["labels"]["Edema"]["auroc"]) / 2)
    table = format_label_table(m)
    assert "left out of the means: Hernia" in table and table.count("\n") == 5
    cols = label_metric_columns(m, "val_")
    assert cols["val_mean_auroc"] == m["mean_auroc"] and np.isnan(cols["val_auroc[Hernia]"])


def _rates(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float, float]:
    p = s >= t
    tp, fp, fn, tn = (p & (y == 1)).sum(), (p & (y == 0)).sum(), (~p & (y == 1)).sum(), (~p & (y == 0)).sum()
    return tp / (tp + fn), tn / (tn + fp), 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_thresholds_are_the_best_on_the_validation_scores(rule):
    targets, scores = _data(seed=2)
    thresholds = choose_thresholds(targets, scores, rule)
    for j in range(3):
        y, s = targets[:, j], scores[:, j]

        def score(t: float, y: np.ndarray = y, s: np.ndarray = s) -> float:
            sens, spec, f1 = _rates(y, s, t)
            return sens + spec - 1 if rule == "youden" else f1

        best = max(score(t) for t in np.unique(s))
        assert score(thresholds[j]) == pytest.approx(best, abs=1e-12), j
    m = multilabel_metrics(targets, scores, NAMES, thresholds)
    sens, spec, f1 = _rates(targets[:, 0], scores[:, 0], thresholds[0])
    assert (m["labels"]["Atelectasis"]["sensitivity"], m["labels"]["Atelectasis"]["specificity"],
            m["labels"]["Atelectasis"]["f1"]) == pytest.approx((sens, spec, f1))


def test_perfect_scores_and_bad_shapes():
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    m = multilabel_metrics(targets, targets * 0.8 + 0.1, NAMES)
    assert m["mean_auroc"] == 1 and m["mean_average_precision"] == 1
    with pytest.raises(ArgumentError, match="must both be"):
        multilabel_metrics(targets, targets[:, :2], NAMES)
    with pytest.raises(ArgumentError, match="3 label columns but 2 label names"):
        multilabel_metrics(targets, targets, NAMES[:2])
    with pytest.raises(ArgumentError, match="threshold rule 'max'"):
        choose_thresholds(targets, targets, "max")
