"""95% intervals against hand computations."""

import math

import numpy as np
import pytest

from t2i_rl.intervals import Z_95, bootstrap_mean_interval, wilson_interval


def test_wilson_matches_the_formula_worked_by_hand():
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre = (0.8 + 0.19207) / 1.38415 = 0.71674;
    # half = 1.95996 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22659
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4)
    assert high == pytest.approx(0.94332, abs=1e-4)


@pytest.mark.parametrize("k, n", [(0, 20), (20, 20), (3, 256), (128, 256)])
def test_wilson_stays_in_0_1_and_holds_the_rate(k, n):
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert low < high


def test_wilson_at_zero_successes_has_the_closed_form_upper_bound():
    n = 50
    assert wilson_interval(0, n)[1] == pytest.approx(Z_95**2 / (n + Z_95**2))


@pytest.mark.parametrize("k, n", [(1, 0), (-1, 10), (11, 10)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_bootstrap_resamples_prompts_not_images():
    # two prompts, each with identical images: only the prompt-level draw can vary the mean, so
    # the interval spans the two prompts' values (all-0, all-1 and mixed resamples)
    values = [0.0] * 8 + [1.0] * 8
    groups = ["a"] * 8 + ["b"] * 8
    low, high = bootstrap_mean_interval(values, groups, num_resamples=4000, seed=0)
    assert low == 0.0 and high == 1.0
    # the same 16 values as 16 prompts give the narrow, image-level interval
    low16, high16 = bootstrap_mean_interval(values, [str(i) for i in range(16)], num_resamples=4000, seed=0)
    assert 0.2 < low16 < 0.5 < high16 < 0.8


def test_bootstrap_agrees_with_the_normal_approximation_on_many_prompts():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 0.1, size=400)
    low, high = bootstrap_mean_interval(values, [str(i) for i in range(400)], num_resamples=4000, seed=0)
    half = Z_95 * values.std() / math.sqrt(400)
    assert low == pytest.approx(values.mean() - half, abs=0.002)
    assert high == pytest.approx(values.mean() + half, abs=0.002)


def test_bootstrap_is_deterministic_for_a_seed_and_constant_values_have_no_width():
    values, groups = [0.1, 0.5, 0.9, 0.4], ["a", "a", "b", "c"]
    assert bootstrap_mean_interval(values, groups, seed=3) == bootstrap_mean_interval(values, groups, seed=3)
    assert bootstrap_mean_interval([0.7] * 5, list("abcde")) == pytest.approx((0.7, 0.7))


@pytest.mark.parametrize("values, groups, message", [
    ([], [], "non-zero length"),
    ([1.0, 2.0], ["a"], "one non-zero length"),
    ([1.0, float("nan")], ["a", "b"], "NaN"),
])
def test_bootstrap_refuses_bad_input(values, groups, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_mean_interval(values, groups)


def test_paired_interval_resolves_a_change_the_separate_intervals_hide():
    from t2i_rl.intervals import paired_bootstrap_interval

    # 8 prompts of very different difficulty, each improved by 0.05 on every one of its 4 images
    base = np.repeat(np.linspace(0.1, 0.9, 8), 4) + np.tile([0.0, 0.01, -0.01, 0.0], 8)
    groups = [str(i) for i in range(8) for _ in range(4)]
    change, low, high = paired_bootstrap_interval(base, base + 0.05, groups)
    assert change == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    before = bootstrap_mean_interval(base, groups)
    after = bootstrap_mean_interval(base + 0.05, groups)
    assert after[0] < before[1]  # the separate intervals overlap
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap_interval([1.0, 2.0], [1.0], ["a", "b"])
