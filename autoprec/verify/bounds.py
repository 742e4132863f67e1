"""How sure a measured drop is: one-sided upper confidence bounds on a paired drop.

The float32 model and a candidate are scored on the same samples, so the drop
is the mean of paired per-sample differences ``d_i`` (positive where the
candidate is worse). Judging the budget by an upper bound on the mean of
``d`` at ``confidence`` (0.95 by default in :func:`autoprec.tune`) makes the
promise hold on data tune never saw, at that confidence, instead of on the
few samples it searched on.

- Right-or-wrong metrics (accuracy): only the discordant samples carry
  information: ``w`` that the candidate gets wrong and float32 right, ``b``
  the other way round. The bound is Agresti and Min's adjusted Wald bound on
  a paired difference of proportions (half a sample added to each cell),
  with a continuity correction of half a sample; its coverage stays near
  nominal down to a few discordant samples, and with none it is about
  ``(z + 0.5) / n``, not 0.
- Other per-sample values (cross-entropy, squared or absolute error): the
  mean of ``d`` plus Student's t quantile times its standard error.
- Metrics that are not a mean over samples (AUC, F1, a callable): a paired
  bootstrap over samples (:func:`bootstrap_upper_bound`).

>>> b = np.ones(1000)
>>> c = b.copy(); c[:3] = 0   # three samples the candidate gets wrong
>>> round(paired_upper_bound(b, c, higher_is_better=True, binary=True, confidence=0.95), 4)
0.0068
>>> round(paired_upper_bound(b, b, higher_is_better=True, binary=True, confidence=0.95), 4)  # none flipped
0.0021
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95
AUTO = "auto"
BOOTSTRAP_ROUNDS = 200
# "auto" judges by the bound where a candidate may still flip a few predictions within the budget: where the bound
# of one that flips none takes at most this share of it. Below that, a bound would leave 16-bit nothing to spend.
AUTO_ROOM = 0.5


def check_confidence(value: Any) -> float | str | None:
    """``"auto"``, ``None`` (judge the point estimate) or a confidence strictly between 0.5 and 1.

    >>> check_confidence(0.95), check_confidence(None), check_confidence("auto")
    (0.95, None, 'auto')
    """
    from autoprec.errors import ArgumentError, describe

    if value is None or (isinstance(value, str) and value == AUTO):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 < float(value) < 1.0:
        raise ArgumentError(
            f"Expected confidence as a number between 0.5 and 1 (e.g. 0.95), 'auto', or None to judge the measured "
            f"drop itself. Received: confidence={describe(value)}."
        )
    return float(value)


def auto_confidence(units: int, allowed: float, *, binary: bool) -> tuple[float | None, int]:
    """What ``confidence="auto"`` judges by on ``units`` samples for a budget ``allowed``, and the units it would need.

    :data:`DEFAULT_CONFIDENCE` wherever the data can resolve the budget at it.
    For a right-or-wrong metric that is known before any candidate: the bound
    of a candidate that changes nothing must leave room under the budget
    (:data:`AUTO_ROOM`); below that the point estimate (``None``), since at
    95% no candidate that changes a prediction could pass. Other metrics'
    bounds depend on how much a candidate moves the values, so they keep the
    bound (tune says afterwards what the data resolved).

    >>> auto_confidence(2000, 0.005, binary=True)
    (0.95, 2000)
    >>> auto_confidence(500, 0.005, binary=True)
    (None, 858)
    """
    if not binary or allowed <= 0:
        return DEFAULT_CONFIDENCE, units
    # no_change_bound(n) is about (z + 0.5) / n: solve for the n that leaves the room.
    estimate = (NormalDist().inv_cdf(DEFAULT_CONFIDENCE) + 0.5) / (AUTO_ROOM * allowed)
    if not estimate < sys.maxsize:  # a budget of 1e-300 asks for more samples than an int counts
        return None, sys.maxsize
    need = math.ceil(estimate)
    while no_change_bound(need, DEFAULT_CONFIDENCE) > AUTO_ROOM * allowed:
        need += max(1, need // 100)
    return (DEFAULT_CONFIDENCE if units >= need else None), max(units, need)


def paired_differences(base: np.ndarray, cand: np.ndarray, *, higher_is_better: bool) -> np.ndarray:
    """Per-sample drops ``d_i``: positive where the candidate is worse than float32."""
    base, cand = np.asarray(base, np.float64), np.asarray(cand, np.float64)
    return base - cand if higher_is_better else cand - base


def paired_upper_bound(
    base: np.ndarray,
    cand: np.ndarray,
    *,
    higher_is_better: bool,
    binary: bool,
    confidence: float,
    units: float = 1,
) -> float:
    """One-sided upper bound on the mean drop at ``confidence`` (``inf`` for non-finite values).

    ``units`` is what one sample's value averages over: the tokens of a
    sequence for a per-token accuracy (values in steps of ``1 / units``);
    under a padding mask, the real tokens of a sequence on average.
    Tokens of one sequence are not independent, so the bound is the larger of
    two: Student's bound over sequences, which holds whatever the tokens'
    correlation but says nothing where few tokens changed (no spread, no
    width), and the proportions bound over the net changed tokens, which is
    right where few did.

    >>> base = np.ones(256); cand = base.copy(); cand[:2] = 15 / 16   # 2 of 4,096 tokens flipped
    >>> round(paired_upper_bound(base, cand, higher_is_better=True, binary=True, confidence=0.95, units=16), 4)
    0.0013
    """
    d = paired_differences(base, cand, higher_is_better=higher_is_better)
    n = len(d)
    if n == 0:
        return math.nan
    if not np.all(np.isfinite(d)):
        return math.inf
    if binary and units == 1:
        return _paired_proportions_upper(int(np.count_nonzero(d > 0)), int(np.count_nonzero(d < 0)), n, confidence)
    mean = float(d.mean())
    if n < 2:
        return math.inf
    sd = float(d.std(ddof=1))
    student = mean + t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    if not binary:
        return student
    tokens = np.rint(d * units)  # net tokens worse (+) or better (-) in each sequence
    worse, better = int(tokens[tokens > 0].sum()), int(-tokens[tokens < 0].sum())
    return max(student, _paired_proportions_upper(worse, better, max(1, round(n * units)), confidence))


def no_change_bound(n: int, confidence: float) -> float:
    """The bound on a right-or-wrong metric for a candidate that changed none of ``n`` predictions.

    No budget below it can be met by a 16-bit candidate on ``n`` samples.

    >>> round(no_change_bound(1000, 0.95), 4)
    0.0021
    """
    return _paired_proportions_upper(0, 0, n, confidence)


def _paired_proportions_upper(worse: int, better: int, n: int, confidence: float) -> float:
    """Agresti and Min's adjusted bound on a paired difference of proportions.

    Half a sample is added to each cell of the 2x2 table before the Wald
    bound, which keeps its coverage near nominal down to a handful of
    discordant samples, and gives a bound above zero (about ``z / n``) when
    none is discordant: that no sample flipped on ``n`` does not show that
    none ever would.
    """
    w, b, total = worse + 0.5, better + 0.5, n + 2.0
    diff = (w - b) / total
    var = ((w + b) - (w - b) ** 2 / total) / total**2
    # Plus a continuity correction of half a sample: the Wald form alone covers about 92-94% at a nominal 95%
    # (seeded simulations of 0.2-5% flip rates on 1,000 samples); with it, 94-99%.
    margin = NormalDist().inv_cdf(confidence) * math.sqrt(max(var, 0.0)) + 0.5 / n
    return max(diff + margin, (worse - better) / n)


def t_quantile(confidence: float, dof: int) -> float:
    """Student's t quantile, by the Cornish-Fisher expansion (within 0.5% of exact from 5 degrees of freedom).

    >>> round(t_quantile(0.95, 1000), 3), round(t_quantile(0.95, 10), 2)
    (1.646, 1.81)
    """
    z = NormalDist().inv_cdf(confidence)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def bootstrap_upper_bound(
    score: Callable[[np.ndarray], float],
    n: int,
    *,
    confidence: float,
    point: float,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> float:
    """Upper bound on a drop that is not a mean over samples, by a paired bootstrap.

    ``score(indices)`` returns the drop measured on the resampled ``indices``
    (both models on the same resample). The bound is the ``confidence``
    quantile of the resampled drops, never below the measured ``point``.

    >>> rng = np.random.default_rng(0); d = rng.normal(0.01, 0.1, 2000)
    >>> ub = bootstrap_upper_bound(lambda i: float(d[i].mean()), 2000, confidence=0.95, point=float(d.mean()))
    >>> bool(abs(ub - (d.mean() + 1.645 * d.std() / np.sqrt(2000))) < 0.002)
    True
    """
    if not math.isfinite(point):
        return math.inf
    rng = np.random.default_rng(seed)
    drops = np.array([score(rng.integers(0, n, n)) for _ in range(rounds)], dtype=np.float64)
    if not np.all(np.isfinite(drops)):
        return math.inf
    return max(point, float(np.quantile(drops, confidence)))


def samples_to_resolve(allowed: float, *, binary: bool, spread: float | None = None, confidence: float) -> int:
    """The evaluation samples needed before a drop of ``allowed`` can be told from a drop of zero.

    Right-or-wrong metrics: one sample changes the metric by ``1/n``, so ``n >= 1/allowed``.
    Continuous per-sample values with standard deviation ``spread`` of the
    paired differences: the bound's margin ``t * spread / sqrt(n)`` must fit
    under ``allowed``.

    >>> samples_to_resolve(0.005, binary=True, confidence=0.95)
    200
    >>> samples_to_resolve(0.01, binary=False, spread=0.1, confidence=0.95)
    271
    """
    if allowed <= 0:
        return 0
    if binary or spread is None:
        return math.ceil(1.0 / allowed - 1e-9)
    z = NormalDist().inv_cdf(confidence)
    return math.ceil((z * spread / allowed) ** 2)
