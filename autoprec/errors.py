"""Typed errors. Every autoprec error derives from :class:`AutoprecError`.

Subclasses also inherit the builtin that fits, so callers may catch either:

>>> try:
...     raise PolicyError("bad")
... except ValueError:
...     pass
"""

from __future__ import annotations


class AutoprecError(Exception):
    """Base class of every error autoprec raises on purpose."""


class PolicyError(AutoprecError, ValueError):
    """A precision policy is malformed, names an unknown format, or does not fit."""


class SchemaError(PolicyError):
    """A policy file is not valid JSON or does not follow the schema."""


class ModelMismatchError(PolicyError):
    """A policy was made for a model whose layers differ from this one."""


class PathCollisionError(AutoprecError, ValueError):
    """Two different layers share one ``layer.path``; a policy could not tell them apart."""


class UnsupportedModelError(AutoprecError, TypeError):
    """The model's kind or a layer in it is not supported for the requested operation."""


class DataError(AutoprecError, ValueError):
    """Evaluation or training data is empty, malformed, or does not fit the model."""


class MetricError(AutoprecError, ValueError):
    """The metric could not be resolved or computed."""


class BudgetError(AutoprecError, ValueError):
    """The accuracy budget is malformed (negative, NaN, unparsable, or over 100%)."""


class UntrainedModelError(AutoprecError, ValueError):
    """The float32 model scores at chance level and no training data was given."""


class BackendError(AutoprecError, NotImplementedError):
    """A feature needs backend machinery that the active Keras backend lacks."""


class VerificationError(AutoprecError, RuntimeError):
    """Verification with real Keras policies failed in a way no fallback can fix."""


def describe(value: object) -> str:
    """Format a received value for an error message: ``value (of type T)``.

    >>> describe(3)
    '3 (of type int)'
    """
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (of type {type(value).__name__})"
