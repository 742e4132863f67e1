"""Typed errors. Every autoprec error derives from :class:`AutoprecError`.

Each class means one thing, and each also inherits the builtin that fits, so
callers may catch either:

>>> try:
...     raise ArgumentError("bad")
... except ValueError:
...     pass
"""

from __future__ import annotations


class AutoprecError(Exception):
    """Base class of every error autoprec raises on purpose."""


class ArgumentError(AutoprecError, ValueError):
    """An argument of a public function has the wrong type or value."""


class BudgetError(ArgumentError):
    """The accuracy budget is malformed (negative, NaN, unparsable, over 100%, or allowing anything)."""


class PolicyError(AutoprecError, ValueError):
    """A precision policy is malformed or names an unknown format."""


class SchemaError(PolicyError):
    """A policy file is not valid JSON or does not follow the schema."""


class ModelMismatchError(PolicyError):
    """A policy names layers this model does not have, or layers of another class."""


class PathCollisionError(AutoprecError, ValueError):
    """Two different layers share one ``layer.path``; a policy could not tell them apart."""


class UnsupportedModelError(AutoprecError, TypeError):
    """The model's kind or a layer in it is not supported for the requested operation."""


class ModelError(AutoprecError, ValueError):
    """The model itself is broken before any 16-bit question arises (non-finite weights or outputs)."""


class DataError(AutoprecError, ValueError):
    """Evaluation or training data is empty, malformed, non-finite, or does not fit the model."""


class MetricError(AutoprecError, ValueError):
    """The metric could not be resolved or computed."""


class UntrainedModelError(AutoprecError, ValueError):
    """The float32 model scores at chance level and no training data was given."""


class StudyError(AutoprecError, ValueError):
    """A stored Optuna study belongs to another search (model, units, formats, data or metric)."""


class OutputError(AutoprecError, OSError):
    """An output path cannot be written: missing parent, a file in the way, or locked by another run."""


class BackendError(AutoprecError, NotImplementedError):
    """A feature needs backend machinery that the active Keras backend lacks."""


def describe(value: object) -> str:
    """Format a received value for an error message: ``value (of type T)``.

    >>> describe(3)
    '3 (of type int)'
    """
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (of type {type(value).__name__})"


def check_int(name: str, value: object, minimum: int, *, allow_none: bool = False) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is an integer ``>= minimum`` (or None when allowed).

    NumPy integers are accepted; booleans are not.

    >>> check_int("n_trials", 5, 1)
    >>> check_int("n_trials", 0, 1)
    Traceback (most recent call last):
    ...
    autoprec.errors.ArgumentError: Expected n_trials to be an integer >= 1. Received: n_trials=0 (of type int).
    """
    import numbers

    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(f"Expected {name} to be an integer >= {minimum}. Received: {name}={describe(value)}.")


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is one of ``choices``.

    >>> check_choice("granularity", "block", ("layer", "block"))
    """
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"Expected {name} to be one of {list(choices)}. Received: {name}={describe(value)}.")
