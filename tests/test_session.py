"""The session: per-sample metric values with each batch of the traced pass, and evaluations that stop early."""

import math

import keras
import numpy as np
import pytest

from autoprec.budget import Budget
from autoprec.session import open_session


def test_per_sample_values_come_with_each_batch_of_the_one_traced_pass(planted):
    model, _, val, _ = planted
    session = open_session(model, val, target="mixed_float16", batch_size=64)
    x, y = next(iter(session.data.batches()))
    _, values = session.engine.forward(x, y)
    assert values is not None and values.shape == (len(x),)  # per batch, not over whole arrays afterwards
    if keras.backend.backend() in ("tensorflow", "jax"):
        # one trace of the model: knowing the metric (from the baseline's outputs) traces it no more
        assert session.engine.traces == 1
    assert abs(float(np.mean(session.baseline_values)) - session.baseline) < 1e-9


def test_an_evaluation_certainly_over_budget_stops_early_and_says_so(planted):
    model, _, val, fragile = planted
    # The bfloat16 offset region destroys accuracy and never overflows, on any CPU: the drop stays finite. (A
    # float16 overflow is not usable here: whether inf becomes NaN or 0 after a ReLU depends on the CPU's kernels.)
    session = open_session(model, val, target="mixed_bfloat16", batch_size=32)
    ruin = {p: "mixed_bfloat16" for p in fragile["mixed_bfloat16"]}
    budget = Budget.get("0.5%")
    early = session.evaluate(ruin, budget=budget)
    assert early.rejected and early.samples < session.data.n
    assert not budget.feasible(baseline=session.baseline, drop=early.drop)
    session._cache.clear()
    full = session.evaluate(ruin)  # without a budget: every sample, and the drop the early stop bounded
    assert not full.rejected and full.samples == session.data.n
    assert full.nonfinite_outputs == 0 and math.isfinite(full.drop) and full.drop >= early.drop - 1e-9


def test_labels_the_metric_cannot_read_are_a_data_error_with_the_shapes():
    """Class ids scored by mse against two outputs failed inside TensorFlow with its own traceback."""
    from autoprec.errors import DataError

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    with pytest.raises(DataError, match=r"'mean_squared_error'.*shape \[\(64,\)\].*\(64, 2\)"):
        open_session(model, (x, np.zeros(64, "int32")), metric="mse", target="mixed_float16")
