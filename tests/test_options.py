"""tune's options: an explicit keyword-only signature that matches TuneOptions, validated before any model work."""

import dataclasses
import inspect
import pydoc
import time

import numpy as np
import pytest

import autoprec
from autoprec.errors import ArgumentError, BudgetError, DataError
from autoprec.options import TuneOptions

POSITIONAL = ("model", "data", "budget")
DERIVED = {"budget", "target", "target_why", "choices", "objective"}  # worked out by create, not given as is


def test_every_option_is_in_the_signature_keyword_only_with_the_options_default():
    params = inspect.signature(autoprec.tune).parameters
    assert tuple(params)[:3] == POSITIONAL and params["budget"].default == "0.5%"
    options = [p for name, p in params.items() if name not in POSITIONAL]
    assert options and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options)
    fields = {f.name: f for f in dataclasses.fields(TuneOptions)}
    assert {p.name for p in options} == (set(fields) - {"budget", "target_why", "choices"}) | {"candidates"}
    for p in options:
        if p.name in DERIVED | {"candidates"}:
            assert p.default is None, p.name  # None: create works it out from the other options
            continue
        f = fields[p.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert p.default == default, f"tune({p.name}={p.default!r}) but TuneOptions.{p.name} = {default!r}"


def test_help_documents_every_option_once():
    text = pydoc.render_doc(autoprec.tune, renderer=pydoc.plaintext)
    doc = inspect.getdoc(autoprec.tune)
    for name in inspect.signature(autoprec.tune).parameters:
        assert f"{name}=" in text or f"{name}:" in text, name
        assert doc.count(f"\n    {name}:") + doc.startswith(f"{name}:") <= 1
        assert f"    {name}: " in doc, f"{name} is not documented in tune's docstring"


def test_a_typo_in_an_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="n_trails"):
        autoprec.tune(None, None, "1%", n_trails=3)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"storage": "notadb://x"}, ArgumentError, "SQLAlchemy"),
        ({"budget": "half a percent"}, BudgetError, "does not parse"),
        ({"candidates": ("float32", "mixed_float32")}, ArgumentError, "candidates"),
        ({"granularity": "row"}, ArgumentError, "granularity"),
        ({"verify": "train"}, DataError, "train_data"),
        ({"confidence": 1.5}, ArgumentError, "confidence"),
        ({"inplace": "yes"}, ArgumentError, "inplace"),
        ({"search_only": True}, ArgumentError, "storage"),
    ],
)
def test_bad_options_fail_in_under_a_second_before_any_model_work(kwargs, error, fragment):
    class Untouchable:
        """A model that fails the test if anything reads it."""

        def __getattr__(self, name):
            raise AssertionError(f"the model was read ({name}) before the options were checked")

    budget = kwargs.pop("budget", "1%")
    x = np.zeros((4, 3), "float32")
    started = time.monotonic()
    with pytest.raises(error, match=fragment):
        autoprec.tune(Untouchable(), (x, np.zeros(4)), budget, **kwargs)
    assert time.monotonic() - started < 1.0
