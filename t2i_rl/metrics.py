"""Per-prompt ranking metrics of a reward's scores against human (or judge) labels.

TextNorm's TIA2 benchmark scores a reward model one prompt at a time: the M images of a prompt are
ranked by the reward and the ranking is compared with binary human labels (AUROC, AUPRC, AP@k) or
with graded ones (Spearman, Kendall); the per-prompt numbers are then averaged over prompts.

Conventions, chosen so that a reward cannot gain from ties or from prompts without information:

* Ties between scores are resolved by expectation, never by input order: AUROC counts a tied
  (positive, negative) pair as one half (Mann-Whitney U with mid-ranks); AUPRC puts tied scores at
  one threshold (as scikit-learn's `average_precision_score`); AP@k is the expected value over a
  uniformly random order of tied images. A constant reward therefore gets AUROC 0.5 and AUPRC and
  AP@k near the base rate.
* A prompt whose binary labels are all equal has no AUROC, AUPRC or AP@k: NaN. A prompt whose
  graded targets are all equal has no Spearman or Kendall: NaN. `aggregate` skips NaNs and reports
  how many prompts counted.
* Scores that are all equal while the targets vary have no rank association: Spearman and Kendall
  are 0 there (scipy would say NaN, which would drop the prompt and flatter a reward that cannot
  tell the images apart).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["auroc", "auprc", "ap_at_k", "spearman", "kendall", "prompt_metrics", "aggregate", "METRICS"]

METRICS: tuple[str, ...] = ("auroc", "auprc", "ap@k", "spearman", "kendall")
"""Metric names in `prompt_metrics`' output; "ap@k" is written with the actual k (e.g. "ap@4")."""


def _vectors(scores, labels, what: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and {what} must be 1-D of the same length, got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if not np.isfinite(y).all():
        raise ValueError(f"{what} contain NaN or inf")
    return s, y


def _binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = _vectors(scores, labels)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    return s, y.astype(bool)


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a positive image outscores a negative one.

    Computed as the Mann-Whitney U statistic over all (positive, negative) pairs, with a tie
    counting one half (mid-ranks). NaN when the labels are all equal (or empty).

    >>> auroc([0.9, 0.2, 0.5, 0.5], [1, 0, 1, 0])
    0.875
    """
    s, y = _binary(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(s)  # mid-ranks for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auprc(scores, labels) -> float:
    """Area under the precision-recall curve, as average precision with step interpolation.

    AP = sum over distinct score thresholds t (descending) of (R(t) - R(t_prev)) * P(t), where
    P and R are the precision and recall of "score >= t". Tied scores form one threshold, so the
    result does not depend on the order of the inputs (scikit-learn's `average_precision_score`).
    NaN when the labels are all equal (or empty).

    >>> auprc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])   # (1/2)*1 + (1/2)*(2/3)
    0.8333333333333333
    """
    s, y = _binary(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    seen = np.arange(1, y.size + 1)
    # The last index of each run of equal scores is where that threshold's counts are read.
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], y.size - 1]
    tp, seen = tp[last], seen[last]
    precision = tp / seen
    recall = tp / n_pos
    gains = np.diff(np.r_[0.0, recall])
    return float(np.sum(gains * precision))


def ap_at_k(scores, labels, k: int) -> float:
    """Average precision at k: (1 / min(k, #positives)) * sum_{i<=k} P@i * rel_i.

    rel_i is the label of the image at rank i (by descending score) and P@i the precision of the
    top i. Ties are averaged: the result is the exact expectation over a uniformly random order
    of tied images (so it does not depend on the input order). 1 means the top min(k, #positives)
    images are all positive. NaN when there is no positive image.

    >>> ap_at_k([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], k=2)   # (1/2) * (1/1)
    0.5
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    s, y = _binary(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    k = min(int(k), y.size)
    # Rank positions 0..k-1 fall into groups of tied scores. For a position in a group of m images
    # with p positives, E[rel] = p/m; for two distinct positions of one group E[rel_i rel_j] =
    # p(p-1)/(m(m-1)); positions in different groups are independent.
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    _, starts, sizes = np.unique(-s_sorted, return_index=True, return_counts=True)
    group = np.repeat(np.arange(starts.size), sizes)
    pos_in_group = np.add.reduceat(y_sorted.astype(np.float64), starts)
    m, p = sizes[group[:k]].astype(np.float64), pos_in_group[group[:k]]
    e_rel = p / m
    same = group[:k, None] == group[None, :k]
    e_pair = np.where(
        same,
        p[:, None] * np.maximum(p[:, None] - 1, 0) / (m[:, None] * np.maximum(m[:, None] - 1, 1)),
        e_rel[:, None] * e_rel[None, :],
    )
    np.fill_diagonal(e_pair, e_rel)
    # AP@k = (1/D) sum_i (1/i) sum_{j<=i} rel_i rel_j, positions counted from 1.
    lower = np.tril(e_pair).sum(axis=1)
    total = np.sum(lower / np.arange(1, k + 1))
    return float(total / min(k, n_pos))


def _rank_correlation(fn, scores, targets) -> float:
    s, t = _vectors(scores, targets, "targets")
    if s.size < 2 or np.all(t == t[0]):
        return math.nan
    if np.all(s == s[0]):
        return 0.0
    return float(fn(s, t)[0])


def spearman(scores, targets) -> float:
    """Spearman's rank correlation of scores with graded targets (scipy.stats.spearmanr).

    NaN when the targets are all equal (nothing to rank against); 0 when only the scores are.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 40, 30]), 4)
    0.8
    """
    return _rank_correlation(stats.spearmanr, scores, targets)


def kendall(scores, targets) -> float:
    """Kendall's tau-b of scores with graded targets (scipy.stats.kendalltau, which handles ties).

    NaN when the targets are all equal (nothing to rank against); 0 when only the scores are.

    >>> round(kendall([1, 2, 3, 4], [10, 20, 40, 30]), 4)
    0.6667
    """
    return _rank_correlation(lambda a, b: stats.kendalltau(a, b, variant="b"), scores, targets)


def prompt_metrics(scores, labels, graded, k: int = 4) -> dict[str, np.ndarray]:
    """Every metric for each prompt (row) of [P, M] arrays of scores, binary labels and graded labels.

    Returns {"auroc", "auprc", f"ap@{k}", "spearman", "kendall"} -> float arrays [P], NaN where a
    prompt does not count. AP@k is NaN wherever AUROC is (all labels equal), so that the three
    binary metrics are averaged over the same prompts (an all-positive prompt would give AP@k = 1
    to any reward).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    g = np.asarray(graded, dtype=np.float64)
    if s.ndim != 2 or y.shape != s.shape or g.shape != s.shape:
        raise ValueError(
            f"scores, labels and graded must be [P, M] arrays of one shape, got {s.shape}, {y.shape}, {g.shape}"
        )
    out = {name: np.full(s.shape[0], np.nan) for name in ("auroc", "auprc", f"ap@{k}", "spearman", "kendall")}
    for i in range(s.shape[0]):
        out["auroc"][i] = auroc(s[i], y[i])
        out["auprc"][i] = auprc(s[i], y[i])
        if not math.isnan(out["auroc"][i]):
            out[f"ap@{k}"][i] = ap_at_k(s[i], y[i], k)
        out["spearman"][i] = spearman(s[i], g[i])
        out["kendall"][i] = kendall(s[i], g[i])
    return out


def aggregate(per_prompt: dict[str, np.ndarray], mask=None) -> dict[str, dict[str, float | int]]:
    """Average per-prompt metrics over prompts, skipping NaNs: {metric: {"mean": float, "n": int}}.

    `mask` (bool [P]) selects the prompts of a split. "n" is how many prompts counted (were selected
    and not NaN); "mean" is NaN when none did.
    """
    out: dict[str, dict[str, float | int]] = {}
    for name, values in per_prompt.items():
        v = np.asarray(values, dtype=np.float64)
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != v.shape:
                raise ValueError(f"mask has shape {m.shape}, the metric {name!r} has {v.shape}")
            v = v[m]
        ok = ~np.isnan(v)
        n = int(ok.sum())
        out[name] = {"mean": float(v[ok].mean()) if n else math.nan, "n": n}
    return out
