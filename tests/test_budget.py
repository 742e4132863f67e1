import math

import pytest

from autoprec import Budget
from autoprec.errors import BudgetError


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0.5%", Budget(0.005)),
        (0.005, Budget(0.005)),
        ("0.005", Budget(0.005)),
        (0, Budget(0.0)),
        ("1% relative", Budget(0.01, relative=True)),
        ("rel:1%", Budget(0.01, relative=True)),
        ("relative 2%", Budget(0.02, relative=True)),
        ("0.03 rel", Budget(0.03, relative=True)),
        (Budget(0.1), Budget(0.1)),
        ("100%", Budget(1.0)),
    ],
)
def test_forms(value, expected):
    assert Budget.get(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (-0.1, ">= 0"),
        ("-1%", ">= 0"),
        (math.nan, "finite"),
        ("nan", "NaN"),
        ("half a point", "does not parse"),
        ("150%", "at most 100%"),
        (None, "Expected a budget"),
        (True, "Expected a budget"),
        ([0.1], "Expected a budget"),
        ("200% relative", "at most 100%"),
    ],
)
def test_invalid(value, message):
    with pytest.raises(BudgetError, match=message):
        Budget.get(value)


def test_feasibility_and_formula():
    absolute = Budget.get("0.5%")
    assert absolute.feasible(baseline=0.9, drop=0.005) and not absolute.feasible(baseline=0.9, drop=0.0051)
    assert not absolute.feasible(baseline=0.9, drop=math.nan)
    relative = Budget.get("10% relative")
    assert relative.allowed(-2.0) == pytest.approx(0.2)
    text = relative.formula(metric="loss", higher_is_better=False, baseline=2.0)
    assert "drop = loss - baseline" in text and "0.2" in text
    assert "baseline - accuracy" in absolute.formula(metric="accuracy", higher_is_better=True, baseline=0.9)
