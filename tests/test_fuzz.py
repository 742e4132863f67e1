"""Random inputs: every outcome is a result or an AutoprecError, never a raw traceback."""

import json

import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS, small_data, trained
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoprec
from autoprec import Budget, PrecisionPolicy
from autoprec.data import EvalData
from autoprec.errors import AutoprecError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

budgets = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.text(max_size=12),
    st.sampled_from(["0.5%", "1% relative", "rel:2%", "150%", "-1%", "nan", "inf%", "0", "1e-3", "rel:", "% relative"]),
    st.builds(np.float32, st.floats(-1, 1, width=32)),
    st.none(),
    st.booleans(),
    st.lists(st.floats(), max_size=2),
)


@SETTINGS
@given(budgets)
def test_budgets(value):
    try:
        budget = Budget.get(value)
    except AutoprecError:
        return
    assert budget.max_drop >= 0 and np.isfinite(budget.max_drop)
    assert budget.feasible(baseline=0.9, drop=0.0)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
layer_rows = st.fixed_dictionaries(
    {
        "path": st.one_of(st.text(max_size=6), st.integers()),
        "policy": st.sampled_from(["float32", "mixed_float16", "mixed_bfloat16", "float64", "int8", "", 3]),
    },
    optional={"class": json_values, "params": json_values, "flops": json_values, "keras_path": json_values},
)
documents = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "format": st.sampled_from(["autoprec.policy", "other"]),
            "schema_version": st.sampled_from([1, 2, "1", True]),
            "layers": st.one_of(st.lists(layer_rows, max_size=4), json_values),
        },
        optional={"target": st.sampled_from([None, "mixed_float16", "float16", 1])},
    ),
)


@SETTINGS
@given(doc=documents)
def test_policy_documents(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "p.json"
    path.write_text(json.dumps(doc))
    try:
        policy = PrecisionPolicy.load(path)
    except AutoprecError:
        return
    again = tmp_path_factory.mktemp("again") / "p.json"
    policy.save(again)
    assert PrecisionPolicy.load(again) == policy  # whatever loads, round-trips


dtypes = st.sampled_from(
    ["float16", "float32", "float64", "int8", "int32", "uint8", "bool", "complex64", "U3", "object"]
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@SETTINGS
@given(dtypes, shapes, dtypes, shapes, st.integers(1, 8))
def test_data_shapes_and_dtypes(x_dtype, x_shape, y_dtype, y_shape, batch):
    rng = np.random.default_rng(0)
    x = np.asarray(rng.normal(size=x_shape) * 3).astype(x_dtype) if x_dtype != "object" else np.empty(x_shape, object)
    y = (
        np.asarray(rng.integers(0, 3, size=y_shape)).astype(y_dtype)
        if y_dtype != "object"
        else np.empty(y_shape, object)
    )
    try:
        data = EvalData.get((x, y), batch_size=batch)
    except AutoprecError:
        return
    assert sum(len(b[1]) for b in data.batches()) == data.n


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return trained(MODEL_BUILDERS["sequential"](), n=256)


@pytest.mark.cpu_kind  # target="auto" charges this CPU's kind
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budgets,
    st.sampled_from(["mixed_float16", "mixed_bfloat16", "auto", "float16"]),
    st.integers(1, 6),
    st.sampled_from([None, "accuracy", "sparse_categorical_crossentropy", "bogus"]),
)
def test_tune_with_random_arguments(tiny, budget, target, n_trials, metric):
    try:
        result = autoprec.tune(
            tiny, small_data(256), budget=budget, target=target, n_trials=n_trials, metric=metric, verbose=0
        )
    except AutoprecError:
        return
    assert isinstance(result, autoprec.TuneResult)
    assert result.feasible == result.budget.feasible(baseline=result.baseline_metric, drop=result.drop)
