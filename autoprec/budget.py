"""The accuracy budget: the largest metric drop allowed against the float32 baseline.

Feasibility, printed at the start of every run:

- absolute (the default): ``drop <= max_drop``
- relative: ``drop <= max_drop * |baseline|``

where ``drop = baseline - metric`` when higher is better (accuracy) and
``drop = metric - baseline`` when lower is better (a loss), both measured in
the same run on the same data. ``"0.5%"`` and ``0.005`` mean the same absolute
drop: half a percentage point of accuracy. A relative budget is spelled out:
``Budget(0.01, relative=True)``, ``"1% relative"`` or ``"rel:1%"``.

>>> Budget.parse("0.5%")
Budget(max_drop=0.005, relative=False)
>>> Budget.parse("2% relative").allowed(0.5)
0.01
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from autoprec.errors import BudgetError, describe

_RELATIVE = re.compile(r"^\s*(?:rel(?:ative)?\s*[:=]?\s*(?P<a>.+?)|(?P<b>.+?)\s*(?:rel|relative))\s*$", re.IGNORECASE)


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            raise BudgetError(f"Expected max_drop to be a finite number >= 0. Received: max_drop={describe(value)}.")
        if value < 0:
            raise BudgetError(f"Expected a budget >= 0 (the largest allowed drop). Received: {value}. A drop is positive when the metric gets worse.")
        if self.relative and value > 1:
            raise BudgetError(f"Expected a relative budget of at most 100%. Received: {value:.4g} ({value:.2%}).")
        object.__setattr__(self, "max_drop", float(value))

    @classmethod
    def parse(cls, value: Any) -> "Budget":
        """Accept a Budget, a number, ``"0.5%"``, ``"0.005"``, ``"1% relative"`` or ``"rel:1%"``."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or value is None:
            raise BudgetError(f"Expected a budget such as '0.5%', 0.005 or '1% relative'. Received: budget={describe(value)}.")
        if isinstance(value, (int, float)):
            return cls(value)
        if not isinstance(value, str):
            raise BudgetError(f"Expected a budget such as '0.5%', 0.005 or '1% relative'. Received: budget={describe(value)}.")
        relative = False
        text = value.strip()
        match = _RELATIVE.match(text)
        if match:
            relative = True
            text = (match.group("a") or match.group("b")).strip()
        percent = text.endswith("%")
        try:
            number = float(text[:-1].strip() if percent else text)
        except ValueError:
            raise BudgetError(
                f"Expected a budget such as '0.5%', '0.005', '1% relative' or 'rel:1%'. Received: budget={value!r}, "
                "which does not parse."
            ) from None
        if math.isnan(number):
            raise BudgetError(f"Expected a number for the budget. Received: budget={value!r} (NaN).")
        if percent:
            if number > 100:
                raise BudgetError(f"Expected a percentage of at most 100%. Received: budget={value!r}.")
            number /= 100.0
        return cls(number, relative=relative)

    def allowed(self, baseline: float) -> float:
        """The largest drop allowed for this baseline."""
        return self.max_drop * abs(baseline) if self.relative else self.max_drop

    def feasible(self, *, baseline: float, drop: float) -> bool:
        """True when ``drop`` is finite and within :meth:`allowed` (1e-9 slack for float sums)."""
        return drop is not None and math.isfinite(drop) and drop <= self.allowed(baseline) + 1e-9

    def formula(self, *, metric: str, higher_is_better: bool, baseline: float) -> str:
        """The feasibility rule in words and numbers, as printed at the start of a run."""
        drop = f"drop = baseline - {metric}" if higher_is_better else f"drop = {metric} - baseline"
        if self.relative:
            rule = f"drop <= {self.max_drop:g} * |baseline| = {self.allowed(baseline):.6g}"
        else:
            rule = f"drop <= {self.max_drop:g}"
        return f"feasible when {rule}, where {drop} and baseline = {baseline:.6g} (float32, same data)"

    def __str__(self) -> str:
        return f"{self.max_drop:.4%} relative" if self.relative else f"{self.max_drop:g} absolute"
