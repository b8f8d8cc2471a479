"""Statistics for the method experiments (issues 14 §3 and 15 §4): paired bootstrap intervals, t-intervals over
seeds, the binomial standard error, and the TELL "x-fold" data-efficiency read with its bootstrap interval.

Pure Python + numpy (no torch, no scipy), so the tables can be recomputed from the committed CSVs anywhere.

Conventions
-----------
* Outcome arrays are float64 after conversion: 1-D ``[n]`` (per item, or per seed) or 2-D ``[seeds, items]``.
  Items may be 0/1 correctness or any per-prompt score; every value must be finite.
* Every interval is a two-sided **percentile** (bootstrap) or **t** (over seeds) interval at level ``ci``
  (default 0.95). It is an interval for the *mean over the population the rows stand for* (seeds, prompts), not
  a prediction interval for one more run.
* A difference is always ``b - a`` (``b`` the new arm, ``a`` the baseline): positive means ``b`` is better when
  higher is better.
* Every resampling function takes ``seed`` and is deterministic for a given seed (numpy ``default_rng``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "Fold", "FoldInterval", "Interval", "binomial_se", "data_efficiency", "data_efficiency_bootstrap",
    "isotonic_increasing", "mean_ci", "paired_bootstrap", "paired_bootstrap_nested", "t_quantile",
]

Censored = Literal["below", "above"]
ItemsMode = Literal["nested", "crossed"]
MonotoneMode = Literal["isotonic", "running_max"]

_CHUNK_VALUES = 2_000_000  # resampled values held in memory at once (16 MB of float64)


# ---------------------------------------------------------------------------------------------------------------
# result types


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval.

    ``estimate`` is computed on the data as given (never the bootstrap mean); ``low``/``high`` bound the interval
    (NaN when no interval can be formed, e.g. one seed); ``n`` the number of top-level units (items for a flat
    bootstrap, seeds for a nested one or a t-interval); ``method`` names how the interval was made."""

    estimate: float
    low: float
    high: float
    n: int
    method: str

    @property
    def width(self) -> float:
        """``high - low`` (NaN when there is no interval)."""
        return self.high - self.low

    def contains(self, value: float) -> bool:
        """Whether ``low <= value <= high`` (False when there is no interval)."""
        return bool(self.low <= value <= self.high)

    def format(self, digits: int = 3, bound_digits: int | None = None) -> str:
        """``"0.712 (0.65–0.77)"``: the estimate at ``digits`` decimals, the bounds at ``bound_digits``
        (default ``digits - 1``, at least 0). Without an interval: ``"0.712 (n=1, no interval)"``."""
        bd = max(digits - 1, 0) if bound_digits is None else bound_digits
        est = f"{self.estimate:.{digits}f}"
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{est} (n={self.n}, no interval)"
        return f"{est} ({self.low:.{bd}f}–{self.high:.{bd}f})"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class Fold:
    """TELL's data efficiency at one point: ``value = n_needed / tell_n``, where ``n_needed`` is the number of
    unique task samples SFT would need (on its interpolated curve) to reach TELL's accuracy.

    ``censored`` is None for an interpolated value. Otherwise ``value`` is a **bound**, never an extrapolation:
    ``"above"`` — TELL's accuracy is above SFT's best point, so SFT needs more than its largest N and the true
    fold is *at least* ``value`` (= largest N / tell_n); ``"below"`` — TELL's accuracy is below SFT's accuracy at
    its smallest N, so the true fold is *at most* ``value`` (= smallest N / tell_n)."""

    value: float
    censored: Censored | None
    n_needed: float
    tell_n: float

    def format(self, digits: int = 1) -> str:
        """``"2.0x"``, ``"≥8.0x"`` (censored above) or ``"≤0.5x"`` (censored below)."""
        mark = {"above": "≥", "below": "≤", None: ""}[self.censored]
        return f"{mark}{self.value:.{digits}f}x"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class FoldInterval:
    """The x-fold read with its bootstrap percentile interval.

    ``estimate`` is :func:`data_efficiency` on the observed means. ``low``/``high`` are the ``(1-ci)/2`` and
    ``(1+ci)/2`` order statistics of the resampled folds, ordering a resample censored "below" under every
    interpolated one and one censored "above" over every interpolated one (their bounds make that ordering
    exact). An end that lands on a censored resample is itself a bound (``low.censored``/``high.censored``), e.g.
    ``high = ≥8.0x`` means the interval is open upwards past what SFT's grid can resolve. ``censored_below`` /
    ``censored_above`` count the censored resamples out of ``n_boot``."""

    estimate: Fold
    low: Fold
    high: Fold
    n_boot: int
    censored_below: int
    censored_above: int
    ci: float
    method: str

    @property
    def censored_fraction(self) -> float:
        """Fraction of resamples whose fold was a bound (either side) rather than an interpolation."""
        return (self.censored_below + self.censored_above) / self.n_boot

    def format(self, digits: int = 1) -> str:
        """``"2.0x (1.4x–≥8.0x; 12% censored)"``; the censored share is omitted when it is zero."""
        text = f"{self.estimate.format(digits)} ({self.low.format(digits)}–{self.high.format(digits)}"
        if self.censored_below or self.censored_above:
            text += f"; {100 * self.censored_fraction:.0f}% censored"
        return text + ")"

    def __str__(self) -> str:
        return self.format()


# ---------------------------------------------------------------------------------------------------------------
# argument checks


def _array(x: ArrayLike, name: str, fn: str, ndim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{fn}: {name} must be numeric, got {type(x).__name__}: {exc}") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{fn}: {name} has {bad} NaN/inf value(s); drop or score those items first")
    return arr


def _check_ci(ci: float, fn: str) -> float:
    if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not 0.0 < ci < 1.0:
        raise ValueError(f"{fn}: ci must be a level in (0, 1), got {ci!r}")
    return float(ci)


def _check_n_boot(n_boot: int, fn: str) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"{fn}: n_boot must be a positive integer, got {n_boot!r}")
    return int(n_boot)


def _check_items(items: str, fn: str) -> None:
    if items not in ("nested", "crossed"):
        raise ValueError(f"{fn}: items must be 'nested' or 'crossed', got {items!r}")


# ---------------------------------------------------------------------------------------------------------------
# resampling core


def _resample_means(cells: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator, items: ItemsMode,
                    paired: bool) -> np.ndarray:
    """Bootstrap means of each cell: ``[n_boot, len(cells)]``.

    A cell is ``[seeds]`` or ``[seeds, items]``. Seeds are drawn with replacement; for 2-D cells items are then
    drawn with replacement too: ``nested`` draws fresh item indices for every drawn seed, ``crossed`` draws one
    set of item indices per resample and applies it to every drawn seed. ``paired`` uses the same draws for every
    cell (all cells must then share one shape): seed s and item j mean the same unit in every cell."""
    out = np.empty((n_boot, len(cells)))
    groups = [list(range(len(cells)))] if paired else [[i] for i in range(len(cells))]
    for group in groups:
        shape = cells[group[0]].shape
        per_resample = int(np.prod(shape))
        chunk = max(1, _CHUNK_VALUES // per_resample)
        for start in range(0, n_boot, chunk):
            c = min(chunk, n_boot - start)
            seeds = rng.integers(0, shape[0], size=(c, shape[0]))
            if len(shape) == 1:
                for i in group:
                    out[start:start + c, i] = cells[i][seeds].mean(axis=1)
                continue
            if items == "nested":
                idx = rng.integers(0, shape[1], size=(c, shape[0], shape[1]))
            else:
                idx = np.broadcast_to(rng.integers(0, shape[1], size=(c, 1, shape[1])), (c, shape[0], shape[1]))
            for i in group:
                out[start:start + c, i] = cells[i][seeds[:, :, None], idx].mean(axis=(1, 2))
    return out


def _percentile(values: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------
# paired differences


def paired_bootstrap(a: ArrayLike, b: ArrayLike, *, n_boot: int = 10_000, seed: int = 0,
                     ci: float = 0.95) -> Interval:
    """Mean paired difference ``mean(b - a)`` with a bootstrap percentile interval.

    ``a``, ``b``: 1-D ``[n]``, the two arms' outcomes on the *same* units in the same order (per-test-prompt 0/1
    correctness of two arms on one prompt set, or per-seed metrics of two arms run with the same seeds). Units are
    resampled with replacement as pairs, so whatever the arms share per unit (prompt difficulty, seed luck)
    cancels. The interval is for the mean difference over the population the units are drawn from. With n = 1
    there is nothing to resample: the estimate comes back with NaN bounds. With few units (say < 10 seeds) the
    percentile interval is too narrow; prefer :func:`mean_ci` on the per-seed differences there."""
    fn = "paired_bootstrap"
    a_arr, b_arr = _array(a, "a", fn, ndim=1), _array(b, "b", fn, ndim=1)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"{fn}: a has {a_arr.size} items but b has {b_arr.size}; they must be paired one to one")
    n_boot, ci = _check_n_boot(n_boot, fn), _check_ci(ci, fn)
    diff = b_arr - a_arr
    method = f"paired bootstrap, percentile, {n_boot} resamples"
    if diff.size == 1:
        return Interval(float(diff[0]), math.nan, math.nan, 1, method)
    boot = _resample_means([diff], n_boot, np.random.default_rng(seed), "nested", paired=True)[:, 0]
    return Interval(float(diff.mean()), *_percentile(boot, ci), diff.size, method)


def paired_bootstrap_nested(a: ArrayLike, b: ArrayLike, *, n_boot: int = 10_000, seed: int = 0, ci: float = 0.95,
                            items: ItemsMode = "nested") -> Interval:
    """Mean paired difference ``mean(b - a)`` over seeds × items with a two-level bootstrap percentile interval.

    ``a``, ``b``: 2-D ``[seeds, items]``; row s of both arms was trained with seed s, column j is the same test
    item in both arms. Each resample draws seeds with replacement, then items with replacement:

    * ``items="nested"`` (default): fresh item indices for every drawn seed — the two-stage bootstrap for items
      nested in seeds. Resampling at both stages counts the item noise a second time (the seed means already
      carry it), which leans conservative and offsets the narrowness of a percentile bootstrap over few seeds.
    * ``items="crossed"``: one draw of item indices per resample, shared by all drawn seeds — the design when the
      same fixed test prompts are scored under every seed (the TELL experiment's test split): a prompt that
      favours arm b does so under every seed, and only a shared draw carries that into the interval. When that
      shared prompt effect is large next to the 0/1 noise, ``nested`` can be too narrow; ``crossed`` is wider.

    In simulations of 3–5 seeds × 100–200 prompts of 0/1 outcomes (seed and shared prompt×arm effects included)
    ``nested`` covered the true difference at 0.93–0.96 for a nominal 0.95 and ``crossed`` at 0.98–1.0: report
    ``nested`` and check the conclusion survives ``crossed``. When seeds dominate the noise, compare with
    :func:`mean_ci` over the per-seed mean differences (``(b - a).mean(axis=1)``), which is exact for normal seeds.

    The estimate is the grand mean of ``b - a`` (= the mean of per-seed mean differences; every seed has the same
    items). ``n`` in the result is the number of seeds. With one seed this is a bootstrap over items only."""
    fn = "paired_bootstrap_nested"
    a_arr, b_arr = _array(a, "a", fn, ndim=2), _array(b, "b", fn, ndim=2)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"{fn}: a has shape {a_arr.shape} but b has {b_arr.shape}; both must be [seeds, items] "
                         "with the same seeds and items")
    n_boot, ci = _check_n_boot(n_boot, fn), _check_ci(ci, fn)
    _check_items(items, fn)
    diff = b_arr - a_arr
    boot = _resample_means([diff], n_boot, np.random.default_rng(seed), items, paired=True)[:, 0]
    method = f"two-level bootstrap (seeds, then items {items}), percentile, {n_boot} resamples"
    return Interval(float(diff.mean()), *_percentile(boot, ci), diff.shape[0], method)


# ---------------------------------------------------------------------------------------------------------------
# closed-form intervals


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` independent items. For two
    arms scored on the same items the SE of the difference is smaller than ``sqrt(se_a² + se_b²)``; use
    :func:`paired_bootstrap` for differences."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_se: p must be a proportion in [0, 1], got {p!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"binomial_se: n must be a positive integer count of items, got {n!r}")
    return math.sqrt(p * (1.0 - p) / n)


def _t_cdf_abs(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (the finite series of Abramowitz & Stegun 26.7.3/4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term, total = math.cos(theta), math.cos(theta)
        for k in range(3, df - 1, 2):  # coefficients 2·4···(k-1) / 1·3···k on cos^k
            term *= c2 * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # coefficients 1·3···(k-1) / 2·4···k on cos^k
        term *= c2 * (k - 1) / k
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """Two-sided critical value ``t`` with P(|T| <= t) = ``level`` for Student's t with integer ``df`` >= 1
    (e.g. level 0.95, df 2 -> 4.303). Bisection on the exact CDF; accurate to ~1e-10."""
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"t_quantile: df must be a positive integer, got {df!r}")
    level = _check_ci(level, "t_quantile")
    lo, hi = 0.0, 1.0
    while _t_cdf_abs(hi, int(df)) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf_abs(mid, int(df)) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: ArrayLike, *, ci: float = 0.95) -> Interval:
    """Mean of ``values`` (1-D ``[n]``, typically one metric per seed) with the t-interval
    ``mean ± t_{n-1} · sd / sqrt(n)`` (sd with n-1 in the denominator). Assumes the seeds are independent draws
    and their metric roughly normal; with 3 seeds the interval is wide (t = 4.30) — that is the information.
    With n = 1 the value comes back with NaN bounds (no spread can be estimated from one seed)."""
    fn = "mean_ci"
    arr = _array(values, "values", fn, ndim=1)
    ci = _check_ci(ci, fn)
    n = arr.size
    if n == 1:
        return Interval(float(arr[0]), math.nan, math.nan, 1, "one value, no interval")
    half = t_quantile(ci, n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    mean = float(arr.mean())
    return Interval(mean, mean - half, mean + half, n, f"t-interval, {n - 1} df")


# ---------------------------------------------------------------------------------------------------------------
# the x-fold read (issue 14 §3)


def isotonic_increasing(y: ArrayLike) -> np.ndarray:
    """Least-squares non-decreasing fit of ``y`` (1-D, equal weights; pool-adjacent-violators). A dip is replaced
    by the mean of the points it violates with, e.g. ``[0.5, 0.7, 0.6, 0.8] -> [0.5, 0.65, 0.65, 0.8]``."""
    arr = _array(y, "y", "isotonic_increasing", ndim=1)
    means: list[float] = []
    sizes: list[int] = []
    for v in arr:
        means.append(float(v))
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, n2 = means.pop(), sizes.pop()
            m1, n1 = means.pop(), sizes.pop()
            means.append((m1 * n1 + m2 * n2) / (n1 + n2))
            sizes.append(n1 + n2)
    return np.repeat(means, sizes)


def _sft_curve(sft_n: ArrayLike, sft_acc: ArrayLike, monotone: str, fn: str) -> tuple[np.ndarray, np.ndarray]:
    n_arr, acc = _array(sft_n, "sft_n", fn, ndim=1), _array(sft_acc, "sft_acc", fn, ndim=1)
    if n_arr.shape != acc.shape:
        raise ValueError(f"{fn}: sft_n has {n_arr.size} points but sft_acc has {acc.size}")
    if n_arr.size < 2:
        raise ValueError(f"{fn}: sft_n needs at least 2 points to interpolate, got {n_arr.size}")
    if np.any(n_arr <= 0):
        raise ValueError(f"{fn}: sft_n must be positive sample counts, got {n_arr.tolist()}")
    order = np.argsort(n_arr, kind="stable")
    n_arr, acc = n_arr[order], acc[order]
    if np.any(np.diff(n_arr) == 0):
        raise ValueError(f"{fn}: sft_n has repeated values {n_arr.tolist()}; average the repeats first")
    if monotone == "isotonic":
        acc = isotonic_increasing(acc)
    elif monotone == "running_max":
        acc = np.maximum.accumulate(acc)
    else:
        raise ValueError(f"{fn}: monotone must be 'isotonic' or 'running_max', got {monotone!r}")
    return n_arr, acc


def _fold(log_n: np.ndarray, n_grid: np.ndarray, curve: np.ndarray, tell_n: float, tell_acc: float) -> Fold:
    if tell_acc < curve[0]:
        return Fold(float(n_grid[0] / tell_n), "below", float(n_grid[0]), tell_n)
    if tell_acc > curve[-1]:
        return Fold(float(n_grid[-1] / tell_n), "above", float(n_grid[-1]), tell_n)
    j = int(np.argmax(curve >= tell_acc))  # first grid point reaching TELL's accuracy
    if j == 0 or curve[j] == tell_acc:  # reached exactly at a grid point: no round trip through log/exp
        needed = float(n_grid[j])
    else:  # curve[j-1] < tell_acc <= curve[j]: a strictly rising segment
        frac = (tell_acc - curve[j - 1]) / (curve[j] - curve[j - 1])
        needed = float(np.exp(log_n[j - 1] + frac * (log_n[j] - log_n[j - 1])))
    return Fold(needed / tell_n, None, needed, tell_n)


def _check_tell(tell_n: float, fn: str) -> float:
    if isinstance(tell_n, bool) or not isinstance(tell_n, (int, float, np.integer, np.floating)) \
            or not math.isfinite(tell_n) or tell_n <= 0:
        raise ValueError(f"{fn}: tell_n must be a positive sample count, got {tell_n!r}")
    return float(tell_n)


def data_efficiency(sft_n: ArrayLike, sft_acc: ArrayLike, tell_n: float, tell_acc: float, *,
                    monotone: MonotoneMode = "isotonic") -> Fold:
    """How many times more unique task samples SFT needs than TELL for TELL's accuracy.

    ``sft_n``, ``sft_acc``: 1-D ``[points]``, SFT's unique task samples N and its accuracy there (any order, no
    repeated N, at least 2 points). ``tell_n``, ``tell_acc``: one TELL point. SFT's curve is made non-decreasing
    first — ``monotone="isotonic"`` (default) is the least-squares monotone fit (pool adjacent violators: a dip
    is averaged with its neighbour, so neither a lucky nor an unlucky point drives the read);
    ``"running_max"`` carries every best-so-far forward (favours SFT: it reaches a level at the N of its
    luckiest point, so it gives the smaller, more conservative fold). Then accuracy is interpolated piecewise
    linearly in log N, and ``n_needed`` is the *first* N where the curve reaches ``tell_acc``; the result is
    ``n_needed / tell_n``.

    Never extrapolates: a ``tell_acc`` above the curve's top or below its bottom comes back censored (see
    :class:`Fold`) with the grid end as a bound."""
    fn = "data_efficiency"
    n_grid, curve = _sft_curve(sft_n, sft_acc, monotone, fn)
    tell_n = _check_tell(tell_n, fn)
    if isinstance(tell_acc, bool) or not isinstance(tell_acc, (int, float, np.integer, np.floating)) \
            or not math.isfinite(tell_acc):
        raise ValueError(f"{fn}: tell_acc must be a finite number, got {tell_acc!r}")
    return _fold(np.log(n_grid), n_grid, curve, tell_n, float(tell_acc))


def _fold_key(f: Fold) -> float:
    return {"below": -math.inf, "above": math.inf, None: f.value}[f.censored]


def data_efficiency_bootstrap(sft: Mapping[float, ArrayLike], tell: ArrayLike, tell_n: float, *,
                              n_boot: int = 10_000, seed: int = 0, ci: float = 0.95,
                              items: ItemsMode = "nested", paired: bool = True,
                              monotone: MonotoneMode = "isotonic") -> FoldInterval:
    """:func:`data_efficiency` with a bootstrap percentile interval.

    ``sft``: ``{N: outcomes}`` for every SFT point; ``tell``: TELL's outcomes at ``tell_n``. Each outcome array is
    ``[seeds]`` (one metric per seed) or ``[seeds, items]`` (per-prompt scores per seed); a cell's accuracy is the
    mean of its array. Every resample redraws seeds (and items, ``nested`` or ``crossed`` as in
    :func:`paired_bootstrap_nested`), recomputes every cell's mean, makes the SFT curve monotone again and reads
    the fold again.

    ``paired=True`` (default) uses the same seed and item draws in every cell, which requires one shape for all
    cells and means seed s / item j is the same unit everywhere (the experiment's nested subsets per seed and its
    fixed test prompts): the correlation between the curve and the TELL point then carries into the interval.
    ``paired=False`` resamples every cell independently (cells may then have different seed counts).

    Resamples whose fold is censored are kept and ordered beyond every interpolated one (see
    :class:`FoldInterval`); their number is reported. A large censored share means the N grid does not bracket
    TELL's accuracy: widen the grid rather than read the bound as a number."""
    fn = "data_efficiency_bootstrap"
    if not isinstance(sft, Mapping) or len(sft) < 2:
        raise ValueError(f"{fn}: sft must map at least 2 sample counts N to outcome arrays, got "
                         f"{type(sft).__name__} of {len(sft) if isinstance(sft, Mapping) else '?'}")
    n_boot, ci = _check_n_boot(n_boot, fn), _check_ci(ci, fn)
    _check_items(items, fn)
    tell_n = _check_tell(tell_n, fn)
    keys = list(sft)
    bad_keys = [k for k in keys if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating))]
    if bad_keys:
        raise ValueError(f"{fn}: sft keys must be the sample counts N (numbers), got {bad_keys!r}")
    cells = []
    for k in keys:
        arr = _array(sft[k], f"sft[{k!r}]", fn)
        if arr.ndim not in (1, 2):
            raise ValueError(f"{fn}: sft[{k!r}] must be [seeds] or [seeds, items], got shape {arr.shape}")
        cells.append(arr)
    tell_arr = _array(tell, "tell", fn)
    if tell_arr.ndim not in (1, 2):
        raise ValueError(f"{fn}: tell must be [seeds] or [seeds, items], got shape {tell_arr.shape}")
    cells.append(tell_arr)
    if len({c.ndim for c in cells}) != 1:
        raise ValueError(f"{fn}: mixes [seeds] and [seeds, items] cells: {[c.shape for c in cells]}")
    if paired and len({c.shape for c in cells}) != 1:
        shapes = {**{f"sft[{k!r}]": c.shape for k, c in zip(keys, cells)}, "tell": tell_arr.shape}
        raise ValueError(f"{fn}: paired=True needs one shape for every cell (same seeds, same items); got "
                         f"{shapes}. Pass paired=False to resample the cells independently")
    n_grid, curve = _sft_curve([float(k) for k in keys], [c.mean() for c in cells[:-1]], monotone, fn)
    estimate = _fold(np.log(n_grid), n_grid, curve, tell_n, float(tell_arr.mean()))

    order = np.argsort(np.asarray(keys, dtype=np.float64), kind="stable")
    log_n = np.log(n_grid)
    means = _resample_means(cells, n_boot, np.random.default_rng(seed), items, paired)
    folds = []
    for row in means:
        sft_means = row[:-1][order]
        boot_curve = isotonic_increasing(sft_means) if monotone == "isotonic" else np.maximum.accumulate(sft_means)
        folds.append(_fold(log_n, n_grid, boot_curve, tell_n, float(row[-1])))
    ranked = sorted(folds, key=_fold_key)
    below = sum(f.censored == "below" for f in folds)
    above = sum(f.censored == "above" for f in folds)

    def order_stat(q: float) -> Fold:  # the inverted-CDF quantile: an actual resample, never an interpolation
        return ranked[min(max(math.ceil(q * n_boot) - 1, 0), n_boot - 1)]

    method = (f"bootstrap ({'paired' if paired else 'independent'} cells; seeds"
              f"{', then items ' + items if cells[0].ndim == 2 else ''}), {monotone} SFT curve, "
              f"log-N interpolation, percentile, {n_boot} resamples")
    return FoldInterval(estimate, order_stat((1 - ci) / 2), order_stat((1 + ci) / 2), n_boot, below, above, ci,
                        method)
