"""The verification: the winner with real Keras policies, the training check, and the statistics that judge it.

- :mod:`autoprec.verify.real`: real-policy evaluation, the loss-scaled training check, fall-back;
- :mod:`autoprec.verify.bounds`: paired upper confidence bounds on a drop;
- :mod:`autoprec.verify.holdout`: the held-out part the search never sees;
- :mod:`autoprec.verify.measured`: policies measured on the machine that will train (``autoprec.measure``).

>>> from autoprec.verify import paired_upper_bound  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoprec._lazy import exports

if TYPE_CHECKING:
    from autoprec.verify.bounds import bootstrap_upper_bound as bootstrap_upper_bound
    from autoprec.verify.bounds import paired_upper_bound as paired_upper_bound
    from autoprec.verify.holdout import split_holdout as split_holdout
    from autoprec.verify.measured import measure as measure
    from autoprec.verify.real import TrainCheck as TrainCheck
    from autoprec.verify.real import train_check as train_check
    from autoprec.verify.real import verify_eval as verify_eval

_EXPORTS = {
    "verify_eval": "autoprec.verify.real",
    "train_check": "autoprec.verify.real",
    "TrainCheck": "autoprec.verify.real",
    "paired_upper_bound": "autoprec.verify.bounds",
    "bootstrap_upper_bound": "autoprec.verify.bounds",
    "split_holdout": "autoprec.verify.holdout",
    "measure": "autoprec.verify.measured",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = exports(__name__, _EXPORTS)
