import itertools
import math

import numpy as np
import pytest

from t2i_rl.metrics import aggregate, ap_at_k, auprc, auroc, kendall, prompt_metrics, spearman


# --- AUROC -----------------------------------------------------------------------------------

def test_auroc_perfect_reversed_and_ties():
    labels = [1, 1, 0, 0]
    assert auroc([4, 3, 2, 1], labels) == 1.0
    assert auroc([1, 2, 3, 4], labels) == 0.0
    # pairs (pos, neg): (.9,.5)=1 (.9,.1)=1 (.5,.5)=1/2 (.5,.1)=1  -> 3.5 / 4
    assert auroc([0.9, 0.5, 0.5, 0.1], labels) == 0.875
    assert auroc([7, 7, 7, 7], labels) == 0.5  # a constant reward is chance
    assert auroc([0.3, 0.1, 0.2], [True, False, True]) == 1.0  # bool labels


def test_auroc_is_the_fraction_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.integers(0, 4, 9).astype(float)
        y = rng.integers(0, 2, 9)
        if y.min() == y.max():
            continue
        pos, neg = s[y == 1], s[y == 0]
        pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
        assert auroc(s, y) == pytest.approx(np.mean(pairs))


# --- AUPRC -----------------------------------------------------------------------------------

def test_auprc_hand_examples():
    # ranks: + - + -  -> (1/2)*1 + (1/2)*(2/3)
    assert auprc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert auprc([4, 3, 2, 1], [1, 1, 0, 0]) == 1.0
    # ranks: - - + +  -> (1/2)*(1/3) + (1/2)*(2/4)
    assert auprc([4, 3, 2, 1], [0, 0, 1, 1]) == pytest.approx(5 / 12)
    # a tie is one threshold: at 0.5 both tied images come in (tp 2 of 3 seen)
    assert auprc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # constant scores: precision is the base rate at the only threshold
    assert auprc([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(0.25)


def test_auprc_does_not_depend_on_input_order_under_ties():
    s = np.array([0.5, 0.5, 0.5, 0.2, 0.9])
    y = np.array([1, 0, 0, 1, 1])
    ref = auprc(s, y)
    for perm in itertools.permutations(range(5)):
        assert auprc(s[list(perm)], y[list(perm)]) == pytest.approx(ref)


# --- AP@k ------------------------------------------------------------------------------------

def test_ap_at_k_hand_examples():
    s = [0.9, 0.8, 0.7, 0.6]
    assert ap_at_k(s, [1, 0, 1, 0], k=1) == 1.0
    assert ap_at_k(s, [1, 0, 1, 0], k=2) == 1.0  # one hit in the top 2, at precision 1
    assert ap_at_k(s, [1, 0, 1, 0], k=3) == pytest.approx((1 + 2 / 3) / 2)
    assert ap_at_k(s, [0, 1, 1, 0], k=4) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert ap_at_k(s, [0, 0, 0, 1], k=2) == 0.0  # no hit in the top 2
    assert ap_at_k(s, [0, 0, 0, 1], k=4) == 0.25  # divided by the hits, not by min(k, #positives)
    assert ap_at_k(s, [0, 0, 0, 0], k=4) == 0.0
    assert ap_at_k(s, [1, 1, 1, 0], k=2) == 1.0
    assert ap_at_k(s, [1, 0, 1, 0], k=10) == pytest.approx((1 + 2 / 3) / 2)  # k beyond M


def test_ap_at_k_averages_over_tie_orders():
    # top two tied (one positive): the top is positive half of the time
    assert ap_at_k([1, 1, 0], [1, 0, 1], k=1) == pytest.approx(0.5)
    # orders (+ - +): 1 ; (- + +): 1/2   -> mean 0.75
    assert ap_at_k([1, 1, 0], [1, 0, 1], k=2) == pytest.approx(0.75)
    # a tie group cut by k: 2 positives among 4 tied images, 2 in the top 2: no hit with
    # probability 1/6, one hit (mean precision 3/4) with 4/6, two with 1/6
    assert ap_at_k([1, 1, 1, 1], [1, 0, 1, 0], k=2) == pytest.approx(4 / 6 * 3 / 4 + 1 / 6)


def test_ap_at_k_matches_brute_force_over_tie_orders():
    def ap_ordered(y, k):
        hits, total = 0, 0.0
        for i in range(min(k, len(y))):
            if y[i]:
                hits += 1
                total += hits / (i + 1)
        return total / hits if hits else 0.0

    rng = np.random.default_rng(1)
    for _ in range(40):
        s = rng.integers(0, 3, 6).astype(float)
        y = rng.integers(0, 2, 6)
        k = int(rng.integers(1, 7))
        orders = []
        for perm in itertools.permutations(range(6)):
            perm = np.array(perm)
            o = perm[np.argsort(-s[perm], kind="stable")]
            orders.append(ap_ordered(list(y[o]), k))
        assert ap_at_k(s, y, k) == pytest.approx(np.mean(orders))


def test_ap_at_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        ap_at_k([1, 2], [0, 1], k=0)


# --- rank correlations -----------------------------------------------------------------------

def test_spearman_and_kendall_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert kendall([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(4 / 6)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with a tie in the targets: C=2, D=0, n0=3, ties in targets=1 -> 2 / sqrt(3 * 2)
    assert kendall([1, 2, 3], [0.5, 0.5, 1.0]) == pytest.approx(2 / math.sqrt(6))


def test_rank_correlation_edge_cases():
    assert math.isnan(spearman([1, 2, 3], [0.5, 0.5, 0.5]))  # nothing to rank against
    assert math.isnan(kendall([1, 2, 3], [0.5, 0.5, 0.5]))
    assert spearman([2, 2, 2], [0.1, 0.5, 1.0]) == 0.0  # a reward that cannot tell them apart
    assert kendall([2, 2, 2], [0.1, 0.5, 1.0]) == 0.0


# --- undefined prompts, input checks, per-prompt and aggregation --------------------------------

def test_all_equal_labels_give_nan():
    for labels in ([1, 1, 1], [0, 0, 0]):
        assert math.isnan(auroc([1, 2, 3], labels))
        assert math.isnan(auprc([1, 2, 3], labels))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="binary"):
        auroc([1, 2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        auprc([1, 2, 3], [0, 1])


def test_prompt_metrics_and_aggregate_skip_prompts_that_do_not_count():
    scores = np.array([[4, 3, 2, 1], [1, 2, 3, 4], [1, 2, 3, 4]], dtype=float)
    labels = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    graded = np.array([[1, 1, 0.5, 0.25], [1, 1, 0.5, 0.25], [1, 1, 0.9, 0.75]])
    per = prompt_metrics(scores, labels, graded, k=(2, 5))
    assert set(per) == {"auroc", "auprc", "ap@2", "ap@5", "spearman", "kendall"}
    np.testing.assert_allclose(per["auroc"][:2], [1.0, 0.0])
    # the all-positive prompt counts for no metric: not a free AP@k of 1, and no Spearman or
    # Kendall although its graded target varies
    for metric, values in per.items():
        assert np.isnan(values[2]), metric
    assert per["ap@2"][0] == 1.0 and per["ap@2"][1] == 0.0
    assert per["ap@5"][1] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert list(prompt_metrics(scores, labels, graded)) == ["auroc", "auprc", "ap@5", "ap@10", "ap@25",
                                                            "spearman", "kendall"]

    agg = aggregate(per)
    assert agg["auroc"] == {"mean": 0.5, "n": 2}
    assert agg["ap@2"]["n"] == 2 and agg["spearman"]["n"] == 2
    only_first = aggregate(per, mask=np.array([True, False, True]))
    assert only_first["auroc"] == {"mean": 1.0, "n": 1}
    none = aggregate(per, mask=np.array([False, False, True]))
    assert none["auroc"]["n"] == 0 and math.isnan(none["auroc"]["mean"])


def test_prompt_metrics_checks_shapes():
    with pytest.raises(ValueError, match=r"\[P, M\]"):
        prompt_metrics(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 2)))
