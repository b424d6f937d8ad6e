"""Per-prompt ranking metrics of a reward's scores against human (or judge) labels.

TextNorm's TIA2 benchmark scores a reward model one prompt at a time: the M images of a prompt are
ranked by the reward and the ranking is compared with binary human labels (AUROC, AUPRC, AP@k) or
with graded ones (Spearman, Kendall's tau-b); the per-prompt numbers are then averaged over
prompts. The definitions are those that reproduce the per-prompt numbers of TextNorm's release
(see `t2i_rl.tia2`), and TIA2-shapes uses the same ones, so that both tables mean the same thing.

Conventions, chosen so that a reward cannot gain from ties or from prompts without information:

* Ties between scores are resolved by expectation, never by input order: AUROC counts a tied
  (positive, negative) pair as one half (Mann-Whitney U with mid-ranks); AUPRC puts tied scores at
  one threshold (step-wise average precision, as scikit-learn's `average_precision_score`); AP@k
  is the expected value over a uniformly random order of tied images. A constant reward therefore
  gets AUROC 0.5 and AUPRC near the base rate.
* A prompt whose binary labels are all equal counts for no metric: `prompt_metrics` gives it NaN
  everywhere, Spearman and Kendall included, and `aggregate` skips NaNs and reports how many
  prompts counted.
* Scores that are all equal while the targets vary have no rank association: Spearman and Kendall
  are 0 there (scipy would say NaN, which would drop the prompt and flatter a reward that cannot
  tell the images apart).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import stats

__all__ = ["auroc", "auprc", "ap_at_k", "spearman", "kendall", "prompt_metrics", "aggregate", "METRICS", "AP_KS"]

METRICS: tuple[str, ...] = ("auroc", "auprc", "ap@k", "spearman", "kendall")
"""Metric names in `prompt_metrics`' output; "ap@k" is written once per k (e.g. "ap@5", "ap@10")."""

AP_KS: tuple[int, ...] = (5, 10, 25)
"""The k's of AP@k that TextNorm's release reports."""


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


def _expected_hit_precisions(sizes: np.ndarray, positives: np.ndarray) -> float:
    """E[sum_i rel_i * P@i] over the positions of consecutive tie groups (sizes, positives in
    each), every order within a group equally likely.

    For a position in a group of m images with p positives E[rel] = p/m; for two distinct positions
    of one group E[rel_i rel_j] = p(p-1)/(m(m-1)); positions in different groups are independent.
    """
    group = np.repeat(np.arange(sizes.size), sizes)
    m, p = sizes[group].astype(np.float64), positives[group].astype(np.float64)
    e_rel = p / m
    same = group[:, None] == group[None, :]
    e_pair = np.where(
        same,
        p[:, None] * np.maximum(p[:, None] - 1, 0) / (m[:, None] * np.maximum(m[:, None] - 1, 1)),
        e_rel[:, None] * e_rel[None, :],
    )
    np.fill_diagonal(e_pair, e_rel)
    # sum_i rel_i * P@i = sum_i (1/i) sum_{j<=i} rel_i rel_j, positions counted from 1.
    return float(np.sum(np.tril(e_pair).sum(axis=1) / np.arange(1, group.size + 1)))


def ap_at_k(scores, labels, k: int) -> float:
    """Average precision at k: the mean of P@i over the ranks i <= k that hold a positive image.

    P@i is the precision of the top i (by descending score). 0 when none of the top k is positive;
    the sum is divided by the number of hits in the top k, not by min(k, #positives), as in
    TextNorm's release. Ties are averaged: the result is the exact expectation over a uniformly
    random order of tied images (so it does not depend on the input order).

    >>> ap_at_k([0.9, 0.8, 0.7, 0.6], [0, 1, 1, 0], k=3)   # (1/2 + 2/3) / 2
    0.5833333333333333
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    s, y = _binary(scores, labels)
    if not y.any():
        return 0.0
    k = min(int(k), y.size)
    order = np.argsort(-s, kind="stable")
    _, starts, sizes = np.unique(-s[order], return_index=True, return_counts=True)
    positives = np.add.reduceat(y[order].astype(np.int64), starts)
    # The tie group the cut at k falls in has r of its m positions in the top k; the number h of
    # positives among them is hypergeometric, and given h those r positions are a group of their own.
    last = int(np.searchsorted(starts, k, side="right")) - 1
    r, m, p = k - int(starts[last]), int(sizes[last]), int(positives[last])
    fixed = int(positives[:last].sum())
    total = 0.0
    for h in range(max(0, r - (m - p)), min(r, p) + 1):
        if fixed + h == 0:
            continue
        weight = math.comb(p, h) * math.comb(m - p, r - h) / math.comb(m, r)
        top = _expected_hit_precisions(np.r_[sizes[:last], r], np.r_[positives[:last], h])
        total += weight * top / (fixed + h)
    return float(total)


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


def _ks(k) -> tuple[int, ...]:
    ks = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
    if not ks:
        raise ValueError("no k for AP@k")
    return ks


def prompt_metrics(scores, labels, graded, k: int | Iterable[int] = AP_KS) -> dict[str, np.ndarray]:
    """Every metric for each prompt (row) of [P, M] arrays of scores, binary labels and graded labels.

    Returns {"auroc", "auprc", "ap@K" for each K in `k`, "spearman", "kendall"} -> float arrays
    [P]. A prompt whose binary labels are all equal is NaN in every metric (an all-positive prompt
    would give AP@k = 1 to any reward, and TextNorm's release leaves such prompts out of Spearman
    and Kendall too), so that every metric is averaged over the same prompts.
    """
    ks = _ks(k)
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    g = np.asarray(graded, dtype=np.float64)
    if s.ndim != 2 or y.shape != s.shape or g.shape != s.shape:
        raise ValueError(
            f"scores, labels and graded must be [P, M] arrays of one shape, got {s.shape}, {y.shape}, {g.shape}"
        )
    names = ("auroc", "auprc", *(f"ap@{j}" for j in ks), "spearman", "kendall")
    out = {name: np.full(s.shape[0], np.nan) for name in names}
    for i in range(s.shape[0]):
        out["auroc"][i] = auroc(s[i], y[i])
        if math.isnan(out["auroc"][i]):
            continue
        out["auprc"][i] = auprc(s[i], y[i])
        for j in ks:
            out[f"ap@{j}"][i] = ap_at_k(s[i], y[i], j)
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
