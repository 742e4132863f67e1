"""A held-out check: evaluation data the search never sees, on which the winner must also hold.

The search picks, among many candidates, those whose measured drop happens to
be small on the data it searched on, so a bound on that same data is
optimistic. :func:`split_holdout` sets part of the evaluation data aside
before anything is measured (``holdout=`` of :func:`autoprec.tune`: a
fraction, separate ``(x, y)`` data, ``None``, or ``"auto"``), and
:func:`held_session` scores the float32 model there once, so that the
verification can judge the winner on both parts with the same rule.

``"auto"`` holds out a seeded random 20% from 5,000 evaluation samples on,
and nothing below that; tune says which.

>>> import numpy as np
>>> rest, held, why = split_holdout((np.zeros((10, 2)), np.zeros(10)), 0.3)
>>> rest.n, held.n, why
(7, 3, 'holdout=0.3: 3 of 10 samples held out')
"""

from __future__ import annotations

import itertools
import numbers
from typing import Any

import numpy as np

from autoprec.data import EvalData
from autoprec.errors import ArgumentError, describe

AUTO = "auto"
AUTO_FRACTION = 0.2
# From here a fifth (1,000 samples) bounds a right-or-wrong metric that changed nothing at about 0.0016 (95%):
# fine enough for a 0.5% budget. The rule reads the sample count only, so every run on the same data (a resumed
# study under another budget) splits it alike.
AUTO_MIN_SAMPLES = 5000
_EXPECTED = "holdout='auto', a fraction between 0 and 0.5, separate (x, y) evaluation data, or None"


def check_holdout(value: Any) -> Any:
    """Validate ``holdout=`` without reading any data.

    >>> check_holdout(0.25), check_holdout(None), check_holdout("auto")
    (0.25, None, 'auto')
    """
    if value is None or value == AUTO:
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not 0 < float(value) <= 0.5:
            raise ArgumentError(f"Expected {_EXPECTED}. Received: holdout={describe(value)}.")
        return float(value)
    if isinstance(value, str):
        raise ArgumentError(f"Expected {_EXPECTED}. Received: holdout={describe(value)}.")
    return value  # data: EvalData.get checks it where it is read


def split_holdout(
    data: Any,
    holdout: Any,
    *,
    model: Any = None,
    nonfinite: str = "raise",
    seed: int = 0,
) -> tuple[Any, EvalData | None, str]:
    """``(search data, held-out EvalData or None, why)`` for ``holdout=`` (see the module docstring)."""
    if holdout is None:
        return data, None, "holdout=None: no held-out check"
    if not (isinstance(holdout, (numbers.Real, str))):
        held = EvalData.get(holdout, what="holdout", model=model, nonfinite=nonfinite)
        return data, held, f"held-out data passed as holdout= ({held.n} samples)"
    ev = EvalData.get(data, model=model, nonfinite=nonfinite)
    if holdout == AUTO:
        if ev.n < AUTO_MIN_SAMPLES:
            return (
                data,
                None,
                (
                    f"holdout='auto': no held-out check on {ev.n} samples (auto holds out a fifth from "
                    f"{AUTO_MIN_SAMPLES} samples on; pass holdout=0.2 or separate data to check anyway)"
                ),
            )
        fraction = AUTO_FRACTION
    else:
        fraction = float(holdout)
    rest, held = ev.split(fraction, seed=seed)
    if held.n == 0 or rest.n == 0:
        raise ArgumentError(
            f"Expected holdout={holdout!r} to leave samples on both sides. Received {ev.n} samples: "
            f"{rest.n} to search on and {held.n} held out. Pass more data or another fraction."
        )
    shown = repr(holdout) if isinstance(holdout, str) else f"{holdout:g}"
    return rest, held, f"holdout={shown}: {held.n} of {ev.n} samples held out"


def held_session(session: Any, held: EvalData) -> Any:
    """A session over the held-out data: the float32 model's outputs and metric there, for verification only."""
    import dataclasses

    import keras

    from autoprec.session import with_output_masks
    from autoprec.verify.real import predict_batches

    held = with_output_masks(session.model, held.rebatch(session.data.batch_size))
    full = predict_batches(session.model, held)
    offsets = np.cumsum([0] + [len(keras.tree.flatten(x)[0]) for x, _ in held.batches()])
    outputs = [
        keras.tree.map_structure(lambda a, lo=lo, hi=hi: a[lo:hi], full) for lo, hi in itertools.pairwise(offsets)
    ]
    metric = session.metric
    if metric.per_sample is not None:
        values = metric.values(*metric.select(held.y, full), metric.weights_of(held.weights))
        baseline = float(np.mean(values))
    else:
        values, baseline = None, metric.compute(held.y, full, held.weights)
    return dataclasses.replace(
        session,
        data=held,
        engine=None,
        baseline=baseline,
        baseline_outputs=outputs,
        baseline_values=values,
        holdout=None,
        _cache={},
        _real={},
    )
