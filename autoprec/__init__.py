"""autoprec: find which Keras layers may compute in 16-bit floats, under an accuracy budget.

>>> import autoprec
>>> result = autoprec.tune(model, (x_val, y_val), budget="0.5%")  # doctest: +SKIP
>>> result.policy.save("policy.json")                              # doctest: +SKIP

``import autoprec`` is cheap: Keras (and so TensorFlow), Optuna and
matplotlib are imported when a function that needs them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoprec._lazy import exports

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
    from autoprec.profiling.sensitivity import profile as profile
    from autoprec.result import TuneResult as TuneResult
    from autoprec.tuner import tune as tune
    from autoprec.verify.measured import measure as measure

# Public name -> module that defines it. Resolved on first access (PEP 562),
# so that importing autoprec pulls in neither TensorFlow nor Optuna.
_EXPORTS = {
    "PrecisionPolicy": "autoprec.policy",
    "apply_policy": "autoprec.apply",
    "build_graph": "autoprec.graph",
    "ModelGraph": "autoprec.graph",
    "profile": "autoprec.profiling.sensitivity",
    "tune": "autoprec.tuner",
    "measure": "autoprec.verify.measured",
    "TuneOptions": "autoprec.options",
    "TuneResult": "autoprec.result",
    "AdaptivePrecision": "autoprec.adaptive",
    "Budget": "autoprec.budget",
    "Reason": "autoprec.decisions",
    "errors": "autoprec.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


__getattr__, _ = exports("autoprec", _EXPORTS)


def __dir__() -> list[str]:
    return __all__
