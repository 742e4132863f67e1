"""autoprec: find which Keras layers may compute in 16-bit floats, under an accuracy budget.

>>> import autoprec
>>> result = autoprec.tune(model, (x_val, y_val), budget="0.5%")  # doctest: +SKIP
>>> result.policy.save("policy.json")                              # doctest: +SKIP

``import autoprec`` is cheap: Keras (and so TensorFlow), Optuna and
matplotlib are imported when a function that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names resolve to (``X as X``: re-exported), for type checkers and the docs
    from autoprec import errors as errors
    from autoprec.adaptive import AdaptivePrecision as AdaptivePrecision
    from autoprec.apply import apply_policy as apply_policy
    from autoprec.budget import Budget as Budget
    from autoprec.decisions import Reason as Reason
    from autoprec.graph import ModelGraph as ModelGraph
    from autoprec.graph import build_graph as build_graph
    from autoprec.options import TuneOptions as TuneOptions
    from autoprec.policy import PrecisionPolicy as PrecisionPolicy
    from autoprec.result import TuneResult as TuneResult
    from autoprec.sensitivity import profile as profile
    from autoprec.tuner import tune as tune

# Public name -> module that defines it. Resolved on first access (PEP 562),
# so that importing autoprec pulls in neither TensorFlow nor Optuna.
_EXPORTS = {
    "PrecisionPolicy": "autoprec.policy",
    "apply_policy": "autoprec.apply",
    "build_graph": "autoprec.graph",
    "ModelGraph": "autoprec.graph",
    "profile": "autoprec.sensitivity",
    "tune": "autoprec.tuner",
    "TuneOptions": "autoprec.options",
    "TuneResult": "autoprec.result",
    "AdaptivePrecision": "autoprec.adaptive",
    "Budget": "autoprec.budget",
    "Reason": "autoprec.decisions",
    "errors": "autoprec.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'autoprec' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"autoprec.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
