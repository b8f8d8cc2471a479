"""benchmarks.methods.stats: the intervals and the x-fold read the TELL / NEO tables are built from (issues 14 §3,
15 §4). Analytic cases where the answer is known, censoring on both sides, the monotone fix-up, coverage of the
intervals in simulation (deterministic seeds), and bad inputs naming the argument."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.methods.stats import (Fold, Interval, binomial_se, data_efficiency, data_efficiency_bootstrap,
                                      isotonic_increasing, mean_ci, paired_bootstrap, paired_bootstrap_nested,
                                      t_quantile)


def test_module_imports_without_torch():
    code = "import sys, benchmarks.methods.stats; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Interval ------------------------------------------------------------------------------------------------


def test_interval_format_and_no_interval():
    iv = Interval(0.7123, 0.6512, 0.7689, 3, "t")
    assert iv.format(3) == "0.712 (0.65–0.77)"
    assert iv.format(2, bound_digits=3) == "0.71 (0.651–0.769)"
    assert iv.contains(0.7) and not iv.contains(0.8)
    assert iv.width == pytest.approx(0.7689 - 0.6512)
    one = Interval(0.5, math.nan, math.nan, 1, "one value")
    assert one.format(3) == "0.500 (n=1, no interval)"
    assert not one.contains(0.5)
    with pytest.raises(AttributeError):
        iv.estimate = 1.0  # frozen


# --- paired_bootstrap ----------------------------------------------------------------------------------------


def test_paired_bootstrap_estimate_is_mean_difference_and_seeded():
    a = [0, 1, 1, 0, 1, 0, 0, 1]
    b = [1, 1, 1, 0, 1, 1, 0, 1]
    iv = paired_bootstrap(a, b, n_boot=2000, seed=3)
    assert iv.estimate == pytest.approx(0.25)
    assert iv.n == 8 and iv.low <= 0.25 <= iv.high and iv.low >= 0.0  # b never loses: no resample below 0
    assert paired_bootstrap(a, b, n_boot=2000, seed=3) == iv
    x = np.random.default_rng(0).normal(size=(2, 30))  # continuous: another seed moves the bounds
    assert paired_bootstrap(*x, n_boot=500, seed=3) == paired_bootstrap(*x, n_boot=500, seed=3)
    assert paired_bootstrap(*x, n_boot=500, seed=4) != paired_bootstrap(*x, n_boot=500, seed=3)


def test_paired_bootstrap_pairs_cancel_shared_unit_effects():
    # b = a + 0.1 on every unit, with large unit-to-unit spread: the paired interval is the point 0.1
    a = np.random.default_rng(0).normal(0, 5, 40)
    iv = paired_bootstrap(a, a + 0.1, n_boot=500)
    assert iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)


def test_paired_bootstrap_width_matches_the_normal_interval_for_large_n():
    d = np.random.default_rng(2).normal(0.3, 1.0, 400)
    iv = paired_bootstrap(np.zeros(400), d, n_boot=4000)
    normal_half = 1.959964 * d.std() / math.sqrt(400)
    assert iv.width / 2 == pytest.approx(normal_half, rel=0.08)
    assert paired_bootstrap(np.zeros(400), d, n_boot=4000, ci=0.5).width / 2 == pytest.approx(
        0.674490 * d.std() / math.sqrt(400), rel=0.1)


def test_paired_bootstrap_one_unit_has_no_interval():
    iv = paired_bootstrap([0.3], [0.5])
    assert iv.estimate == pytest.approx(0.2) and math.isnan(iv.low) and math.isnan(iv.high) and iv.n == 1


def test_paired_bootstrap_covers_true_difference_at_nominal_rate():
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(200):
        a = (rng.random(60) < 0.6).astype(float)
        b = (rng.random(60) < 0.7).astype(float)
        hits += paired_bootstrap(a, b, n_boot=1000, seed=i).contains(0.1)
    assert 0.88 <= hits / 200 <= 0.99


@pytest.mark.parametrize("a, b, ci, n_boot, match", [
    ([0, 1, 1], [0, 1], 0.95, 100, r"a has 3 items but b has 2"),
    ([], [], 0.95, 100, r"\ba is empty"),
    ([0, 1], [0, float("nan")], 0.95, 100, r"\bb has 1 NaN"),
    ([[0, 1]], [[0, 1]], 0.95, 100, r"\ba must be 1-D"),
    ([0, 1], [1, 1], 1.5, 100, r"\bci must be"),
    ([0, 1], [1, 1], 0.95, 0, r"\bn_boot must be"),
])
def test_paired_bootstrap_bad_inputs_name_the_argument(a, b, ci, n_boot, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, ci=ci, n_boot=n_boot)


def test_paired_bootstrap_non_numeric_names_the_argument():
    with pytest.raises(TypeError, match=r"\bb must be numeric"):
        paired_bootstrap([0, 1], ["x", "y"])


# --- paired_bootstrap_nested ---------------------------------------------------------------------------------


def test_nested_bootstrap_covers_true_difference_at_nominal_rate():
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(200):
        p_a = np.clip(0.6 + rng.normal(0, 0.1, 100), 0, 1)  # prompt difficulty, shared by both arms
        seed_effect = rng.normal(0, 0.05, (5, 1))
        a = (rng.random((5, 100)) < p_a).astype(float)
        b = (rng.random((5, 100)) < np.clip(p_a + 0.1 + seed_effect, 0, 1)).astype(float)
        hits += paired_bootstrap_nested(a, b, n_boot=300, seed=i).contains(0.1)
    assert 0.88 <= hits / 200 <= 0.99


def test_crossed_items_carry_a_prompt_effect_shared_by_all_seeds():
    # the difference depends only on the prompt (same under every seed): seeds add no information about it, so
    # the crossed interval must be ~sqrt(seeds) times the nested one, which treats each seed's prompts as new
    rng = np.random.default_rng(1)
    diff = np.tile(rng.normal(0.1, 1.0, 50), (9, 1))
    zeros = np.zeros_like(diff)
    nested = paired_bootstrap_nested(zeros, diff, n_boot=2000, items="nested")
    crossed = paired_bootstrap_nested(zeros, diff, n_boot=2000, items="crossed")
    assert nested.estimate == crossed.estimate == pytest.approx(diff.mean())
    assert crossed.width > 2.0 * nested.width
    assert crossed.n == 9 and "crossed" in crossed.method


def test_nested_bootstrap_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"a has shape \(2, 3\) but b has \(2, 4\)"):
        paired_bootstrap_nested(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\bb must be 2-D"):
        paired_bootstrap_nested(np.zeros((2, 3)), np.zeros(6))
    with pytest.raises(ValueError, match=r"\bitems must be"):
        paired_bootstrap_nested(np.zeros((2, 3)), np.zeros((2, 3)), items="prompts")
    with pytest.raises(ValueError, match=r"\ba has 1 NaN"):
        paired_bootstrap_nested([[0, math.nan]], [[0, 1]])


# --- binomial_se, t_quantile, mean_ci ------------------------------------------------------------------------


def test_binomial_se():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.7, 200) == pytest.approx(math.sqrt(0.21 / 200))
    assert binomial_se(1.0, 10) == 0.0
    with pytest.raises(ValueError, match=r"\bp must be"):
        binomial_se(1.2, 10)
    with pytest.raises(ValueError, match=r"\bn must be"):
        binomial_se(0.5, 0)
    with pytest.raises(ValueError, match=r"\bn must be"):
        binomial_se(0.5, 10.5)


@pytest.mark.parametrize("level, df, expected", [
    (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 3, 3.1824), (0.95, 4, 2.7764), (0.95, 9, 2.2622),
    (0.95, 29, 2.0452), (0.99, 5, 4.0321), (0.90, 10, 1.8125), (0.95, 1000, 1.9623),
])
def test_t_quantile_matches_tables(level, df, expected):
    assert t_quantile(level, df) == pytest.approx(expected, abs=1e-4)


def test_mean_ci_t_interval():
    iv = mean_ci([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert iv.estimate == 2.0 and iv.low == pytest.approx(2 - half) and iv.high == pytest.approx(2 + half)
    assert iv.n == 3 and "2 df" in iv.method


def test_mean_ci_one_seed_returns_value_and_nan_width():
    iv = mean_ci([0.7])
    assert iv.estimate == 0.7 and math.isnan(iv.width) and iv.format() == "0.700 (n=1, no interval)"


def test_mean_ci_covers_at_nominal_rate_with_three_seeds():
    rng = np.random.default_rng(11)
    hits = sum(mean_ci(rng.normal(0.5, 0.1, 3)).contains(0.5) for _ in range(400))
    assert 0.92 <= hits / 400 <= 0.98


def test_mean_ci_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"\bvalues has 1 NaN"):
        mean_ci([0.5, math.nan])
    with pytest.raises(ValueError, match=r"\bvalues is empty"):
        mean_ci([])
    with pytest.raises(ValueError, match=r"\bci must be"):
        mean_ci([0.5, 0.6], ci=0)


# --- data_efficiency -----------------------------------------------------------------------------------------

GRID = [4, 8, 16, 32, 64, 128, 256]
CONCAVE = [0.05, 0.2, 0.33, 0.44, 0.52, 0.58, 0.61]  # rising, flattening: a typical learning curve


def test_two_fold_shift_reads_two_at_every_interior_point():
    # TELL at N reaches SFT's accuracy at 2N: fold 2 whatever the shape of the curve between grid points
    for n, target in zip(GRID[:-1], CONCAVE[1:]):
        fold = data_efficiency(GRID, CONCAVE, n, target)
        assert fold.censored is None and fold.value == pytest.approx(2.0) and fold.n_needed == pytest.approx(2 * n)


def test_interpolation_is_linear_in_log_n_off_the_grid():
    acc = [0.1 * math.log2(n) for n in GRID]  # SFT linear in log N: interpolation is exact anywhere
    for n in (5, 10, 23, 100):
        fold = data_efficiency(GRID, acc, n, 0.1 * math.log2(2 * n))
        assert fold.value == pytest.approx(2.0)
    assert data_efficiency(GRID, acc, 16, 0.1 * math.log2(16 * 10)).value == pytest.approx(10.0)


def test_grid_order_does_not_matter():
    perm = [3, 0, 6, 1, 5, 2, 4]
    shuffled = data_efficiency([GRID[i] for i in perm], [CONCAVE[i] for i in perm], 8, 0.4)
    assert shuffled == data_efficiency(GRID, CONCAVE, 8, 0.4)


def test_censored_above_and_below_return_grid_bounds_never_extrapolations():
    above = data_efficiency(GRID, CONCAVE, 32, 0.9)
    assert above == Fold(256 / 32, "above", 256.0, 32.0) and above.format() == "≥8.0x"
    below = data_efficiency(GRID, CONCAVE, 8, 0.01)
    assert below == Fold(4 / 8, "below", 4.0, 8.0) and below.format() == "≤0.5x"
    # the ends themselves are reached, not censored
    assert data_efficiency(GRID, CONCAVE, 8, 0.05) == Fold(0.5, None, 4.0, 8.0)
    assert data_efficiency(GRID, CONCAVE, 8, 0.61) == Fold(32.0, None, 256.0, 8.0)


def test_flat_stretch_reads_the_first_n_that_reaches_the_level():
    fold = data_efficiency([4, 8, 16, 32], [0.2, 0.5, 0.5, 0.5], 2, 0.5)
    assert fold.n_needed == pytest.approx(8.0) and fold.value == pytest.approx(4.0)


def test_isotonic_fit():
    assert isotonic_increasing([0.5, 0.7, 0.6, 0.8]) == pytest.approx([0.5, 0.65, 0.65, 0.8])
    assert isotonic_increasing([0.1, 0.2, 0.3]) == pytest.approx([0.1, 0.2, 0.3])
    assert isotonic_increasing([0.4, 0.3, 0.2]) == pytest.approx([0.3, 0.3, 0.3])
    assert isotonic_increasing([0.1, 0.5, 0.2, 0.2, 0.6]) == pytest.approx([0.1, 0.3, 0.3, 0.3, 0.6])


def test_monotone_fix_up_isotonic_and_running_max():
    n, acc = [4, 8, 16, 32], [0.2, 0.5, 0.4, 0.6]  # a noisy dip at N=16
    # isotonic: [0.2, 0.45, 0.45, 0.6]: 0.45 is first reached at N=8
    assert data_efficiency(n, acc, 4, 0.45).value == pytest.approx(2.0)
    # running max: [0.2, 0.5, 0.5, 0.6]: 0.45 is 5/6 of the way from 4 to 8 in log N
    assert data_efficiency(n, acc, 4, 0.45, monotone="running_max").value == pytest.approx(2 ** (5 / 6))
    # a level above the dip is read on the fitted segment 0.45 (N=16) -> 0.6 (N=32), not on the raw 0.4 -> 0.6
    assert data_efficiency(n, acc, 4, 0.55).n_needed == pytest.approx(16 * 2 ** (2 / 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sft_n=[4, 8], sft_acc=[0.1, 0.2, 0.3]), r"sft_n has 2 points but sft_acc has 3"),
    (dict(sft_n=[4], sft_acc=[0.1]), r"sft_n needs at least 2 points"),
    (dict(sft_n=[4, 4, 8], sft_acc=[0.1, 0.2, 0.3]), r"sft_n has repeated values"),
    (dict(sft_n=[0, 8], sft_acc=[0.1, 0.2]), r"sft_n must be positive"),
    (dict(sft_acc=[0.1, math.nan, 0.3]), r"sft_acc has 1 NaN"),
    (dict(tell_n=0), r"tell_n must be a positive"),
    (dict(tell_acc=math.nan), r"tell_acc must be a finite"),
    (dict(monotone="none"), r"monotone must be"),
])
def test_data_efficiency_bad_inputs_name_the_argument(kwargs, match):
    args = dict(sft_n=[4, 8, 16], sft_acc=[0.1, 0.2, 0.3], tell_n=4, tell_acc=0.2) | kwargs
    with pytest.raises(ValueError, match=match):
        data_efficiency(**args)


# --- data_efficiency_bootstrap -------------------------------------------------------------------------------


def _p(n: float) -> float:
    return 0.2 + 0.1 * math.log2(n / 4)  # SFT accuracy 0.2 at N=4 .. 0.7 at N=128


def _simulate(rng: np.random.Generator, seeds: int = 3, items: int = 200, tell_acc: float = _p(32)):
    seed_effect = rng.normal(0, 0.02, (seeds, 1))
    sft = {n: (rng.random((seeds, items)) < _p(n) + seed_effect).astype(float) for n in (4, 8, 16, 32, 64, 128)}
    tell = (rng.random((seeds, items)) < tell_acc + seed_effect).astype(float)
    return sft, tell


def test_fold_bootstrap_estimate_is_the_fold_of_the_means_and_seeded():
    sft, tell = _simulate(np.random.default_rng(0))
    res = data_efficiency_bootstrap(sft, tell, 16, n_boot=400, seed=2)
    expected = data_efficiency(list(sft), [v.mean() for v in sft.values()], 16, tell.mean())
    assert res.estimate == expected
    assert res.low.value <= res.estimate.value <= res.high.value
    assert res.n_boot == 400 and res.censored_below == res.censored_above == 0
    assert data_efficiency_bootstrap(sft, tell, 16, n_boot=400, seed=2) == res
    assert "paired" in res.method and "nested" in res.method


def test_fold_bootstrap_covers_a_true_two_fold():
    rng = np.random.default_rng(5)
    hits, estimates = 0, []
    for i in range(100):
        sft, tell = _simulate(rng)  # TELL at N=16 scores SFT's accuracy at N=32: true fold 2
        res = data_efficiency_bootstrap(sft, tell, 16, n_boot=200, seed=i)
        hits += res.low.value <= 2.0 <= res.high.value
        estimates.append(res.estimate.value)
    assert hits / 100 >= 0.88
    assert 1.7 <= float(np.median(estimates)) <= 2.3


def test_fold_bootstrap_counts_censored_resamples():
    sft, _ = _simulate(np.random.default_rng(1))
    always_right = np.ones((3, 200))
    res = data_efficiency_bootstrap(sft, always_right, 16, n_boot=300)
    assert res.estimate.censored == "above" and res.censored_above == 300 and res.censored_fraction == 1.0
    assert res.low == res.high == Fold(128 / 16, "above", 128.0, 16.0)
    assert res.format() == "≥8.0x (≥8.0x–≥8.0x; 100% censored)"

    always_wrong = np.zeros((3, 200))
    res = data_efficiency_bootstrap(sft, always_wrong, 16, n_boot=300)
    assert res.censored_below == 300 and res.high == Fold(4 / 16, "below", 4.0, 16.0)

    # TELL at SFT's top accuracy: part of the resamples land above the curve, part interpolate
    top = (np.random.default_rng(9).random((3, 200)) < _p(128)).astype(float)
    res = data_efficiency_bootstrap(sft, top, 16, n_boot=400)
    assert 0.05 < res.censored_fraction < 0.95 and res.censored_below == 0
    assert res.high.censored == "above" and res.low.censored is None


def test_fold_bootstrap_per_seed_cells_and_unpaired_cells():
    rng = np.random.default_rng(3)
    sft = {n: _p(n) + rng.normal(0, 0.01, 4) for n in (4, 8, 16, 32, 64)}
    res = data_efficiency_bootstrap(sft, _p(32) + rng.normal(0, 0.01, 4), 8, n_boot=500)
    assert res.estimate.value == pytest.approx(4.0, rel=0.15) and "items" not in res.method
    uneven = dict(sft) | {64: _p(64) + rng.normal(0, 0.01, 2)}
    with pytest.raises(ValueError, match=r"paired=True needs one shape"):
        data_efficiency_bootstrap(uneven, _p(32) + np.zeros(4), 8, n_boot=50)
    res = data_efficiency_bootstrap(uneven, _p(32) + np.zeros(4), 8, n_boot=500, paired=False)
    assert res.low.value <= res.estimate.value <= res.high.value and "independent" in res.method


def test_fold_bootstrap_bad_inputs_name_the_argument():
    sft = {4: np.zeros((2, 5)), 8: np.ones((2, 5))}
    with pytest.raises(ValueError, match=r"\bsft must map at least 2"):
        data_efficiency_bootstrap({4: np.zeros(3)}, np.zeros(3), 4)
    with pytest.raises(ValueError, match=r"\bsft keys must be the sample counts"):
        data_efficiency_bootstrap({"n4": np.zeros(3), 8: np.zeros(3)}, np.zeros(3), 4)
    with pytest.raises(ValueError, match=r"sft\[8\] has 1 NaN"):
        data_efficiency_bootstrap({4: np.zeros(3), 8: [0, math.nan, 1]}, np.zeros(3), 4)
    with pytest.raises(ValueError, match=r"\btell has 1 NaN"):
        data_efficiency_bootstrap(sft, [[0, 1, 1, 0, math.nan], [0, 1, 1, 0, 1]], 4)
    with pytest.raises(ValueError, match=r"mixes \[seeds\] and \[seeds, items\]"):
        data_efficiency_bootstrap(sft, np.zeros(2), 4)
    with pytest.raises(ValueError, match=r"\btell_n must be"):
        data_efficiency_bootstrap(sft, np.zeros((2, 5)), -1)
    with pytest.raises(ValueError, match=r"\bitems must be"):
        data_efficiency_bootstrap(sft, np.zeros((2, 5)), 4, items="all")
