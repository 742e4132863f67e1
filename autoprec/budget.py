"""The accuracy budget: the largest metric drop allowed against the float32 baseline.

:class:`Budget` alone decides feasibility. Printed at the start of every run:

- absolute (the default): ``drop <= max_drop``
- relative: ``drop <= max_drop * |baseline|``

where ``drop = baseline - metric`` when higher is better (accuracy) and
``drop = metric - baseline`` when lower is better (a loss), both measured in
the same run on the same data (:meth:`Budget.drop`). ``"0.5%"`` and
``0.005`` mean the same absolute drop: half a percentage point of accuracy.
A relative budget is spelled out: ``Budget(0.01, relative=True)``,
``"1% relative"`` or ``"rel:1%"``. A non-finite drop (a model whose outputs
went NaN) is never feasible.

>>> Budget.get("0.5%")
Budget(max_drop=0.005, relative=False)
>>> Budget.get("2% relative").allowed(0.5)
0.01
>>> Budget.drop(baseline=0.9, value=0.85, higher_is_better=True)
0.05...

Bound to its baseline and the metric's direction (:meth:`Budget.bind`), a
budget judges a measured value or drop on its own:

>>> rule = Budget.get("0.5%").bind(baseline=0.9, higher_is_better=True)
>>> rule.feasible(rule.drop(0.897)), rule.feasible(rule.drop(0.89))
(True, False)
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from autoprec.errors import BudgetError, describe

_RELATIVE = re.compile(r"^\s*(?:rel(?:ative)?\s*[:=]?\s*(?P<a>.+?)|(?P<b>.+?)\s*(?:rel|relative))\s*$", re.IGNORECASE)
_SLACK = 1e-9  # float sums of per-sample values differ in the last bits
_EXAMPLE = "a budget such as '0.5%', 0.005, '1% relative' or 'rel:1%'"


@dataclass(frozen=True)
class Budget:
    """An accuracy budget. See the module docstring for the formula.

    Example:
        >>> Budget(0.01, relative=True).feasible(baseline=0.9, drop=0.005)
        True
    """

    max_drop: float
    relative: bool = False

    def __post_init__(self) -> None:
        value = self.max_drop
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise BudgetError(f"Expected max_drop to be a finite number >= 0. Received: max_drop={describe(value)}.")
        if value < 0:
            raise BudgetError(
                f"Expected a budget >= 0 (the largest allowed drop). Received: {float(value):g}. "
                "A drop is positive when the metric gets worse."
            )
        if self.relative and value > 1:
            raise BudgetError(
                f"Expected a relative budget of at most 100%. Received: {float(value):.4g} ({float(value):.2%})."
            )
        object.__setattr__(self, "max_drop", float(value))

    @classmethod
    def get(cls, value: Any) -> Budget:
        """Accept a Budget, a number (NumPy numbers too), ``"0.5%"``, ``"0.005"``, ``"1% relative"`` or ``"rel:1%"``."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or value is None:
            raise BudgetError(f"Expected {_EXAMPLE}. Received: budget={describe(value)}.")
        if isinstance(value, numbers.Real):
            return cls(float(value))
        if not isinstance(value, str):
            raise BudgetError(f"Expected {_EXAMPLE}. Received: budget={describe(value)}.")
        match = _RELATIVE.match(value.strip())
        text = (match.group("a") or match.group("b")).strip() if match else value.strip()
        percent = text.endswith("%")
        try:
            number = float(text[:-1].strip() if percent else text)
        except ValueError:
            raise BudgetError(f"Expected {_EXAMPLE}. Received: budget={value!r}, which does not parse.") from None
        if math.isnan(number):
            raise BudgetError(f"Expected a number for the budget. Received: budget={value!r} (NaN).")
        if percent and number > 100:
            raise BudgetError(f"Expected a percentage of at most 100%. Received: budget={value!r}.")
        return cls(number / 100.0 if percent else number, relative=bool(match))

    @staticmethod
    def drop(*, baseline: float, value: float, higher_is_better: bool) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse); NaN stays NaN."""
        return baseline - value if higher_is_better else value - baseline

    def bind(
        self, *, baseline: float, higher_is_better: bool, metric: str = "metric", confidence: float | None = None
    ) -> BoundBudget:
        """This budget against a float32 ``baseline``: the object that judges every drop of one run."""
        return BoundBudget(self, float(baseline), bool(higher_is_better), metric, confidence)

    def allowed(self, baseline: float) -> float:
        """The largest drop allowed for this baseline."""
        return self.max_drop * abs(baseline) if self.relative else self.max_drop

    def feasible(self, *, baseline: float, drop: float) -> bool:
        """True when ``drop`` is finite and within :meth:`allowed`."""
        return drop is not None and math.isfinite(drop) and drop <= self.allowed(baseline) + _SLACK

    def check_meaningful(self, *, baseline: float, higher_is_better: bool, bounded_below: bool, metric: str) -> None:
        """Refuse a budget that allows every result: a drop past a bounded metric's floor.

        For accuracy (never below 0) a budget of ``baseline`` or more would call
        a model that is always wrong feasible.
        """
        if higher_is_better and bounded_below and baseline > 0 and self.allowed(baseline) >= baseline:
            raise BudgetError(
                f"Expected a budget smaller than the float32 baseline {metric}={baseline:.4g}. Received: {self}, which "
                f"allows any result at all ({metric} cannot fall below 0). Budgets are drops: '0.5%' means half a "
                "point."
            )

    def formula(self, *, metric: str, higher_is_better: bool, baseline: float, confidence: float | None = None) -> str:
        """The feasibility rule in words and numbers, as printed at the start of a run.

        With ``confidence``, the rule is on the drop's one-sided upper bound
        at that confidence, paired over the same samples (:mod:`autoprec.verify.bounds`).

        >>> Budget(0.005).formula(metric="accuracy", higher_is_better=True, baseline=0.9, confidence=0.95)
        'feasible when the 95% upper bound on drop <= 0.005, where drop = baseline - accuracy and ...'
        """
        drop = f"drop = baseline - {metric}" if higher_is_better else f"drop = {metric} - baseline"
        subject = f"the {confidence:.0%} upper bound on drop" if confidence is not None else "drop"
        if self.relative:
            rule = f"{subject} <= {self.max_drop:g} * |baseline| = {self.allowed(baseline):.6g}"
        else:
            rule = f"{subject} <= {self.max_drop:g}"
        return f"feasible when {rule}, where {drop} and baseline = {baseline:.6g} (float32, same data)"

    def __str__(self) -> str:
        return f"{self.max_drop:.4%} relative" if self.relative else f"{self.max_drop:g} absolute"


@dataclass(frozen=True)
class BoundBudget:
    """A :class:`Budget` bound to its float32 baseline and metric direction: one run's feasibility rule.

    Example:
        >>> rule = Budget(0.01, relative=True).bind(baseline=2.0, higher_is_better=False, metric="loss")
        >>> rule.allowed, rule.drop(2.01), rule.feasible(0.03)
        (0.02, 0.00999..., False)
    """

    budget: Budget
    baseline: float
    higher_is_better: bool = True
    metric: str = "metric"
    confidence: float | None = None  # the drop it judges is the upper bound at this confidence (None: the drop)

    @property
    def allowed(self) -> float:
        """The largest drop allowed."""
        return self.budget.allowed(self.baseline)

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the baseline (positive = worse)."""
        return Budget.drop(baseline=self.baseline, value=value, higher_is_better=self.higher_is_better)

    def feasible(self, drop: float) -> bool:
        """True when ``drop`` is finite and within :attr:`allowed`."""
        return self.budget.feasible(baseline=self.baseline, drop=drop)

    def formula(self) -> str:
        """The feasibility rule in words and numbers (see :meth:`Budget.formula`)."""
        return self.budget.formula(
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            baseline=self.baseline,
            confidence=self.confidence,
        )

    def check_meaningful(self, *, bounded_below: bool) -> None:
        """Refuse a budget that allows every result (see :meth:`Budget.check_meaningful`)."""
        self.budget.check_meaningful(
            baseline=self.baseline,
            higher_is_better=self.higher_is_better,
            bounded_below=bounded_below,
            metric=self.metric,
        )

    def __str__(self) -> str:
        return f"{self.budget} (allowed drop {self.allowed:.4g} from {self.metric}={self.baseline:.4g})"
