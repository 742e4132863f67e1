"""The session: per-sample metric values with each batch of the traced pass, and evaluations that stop early."""

import math

import keras
import numpy as np
import pytest
from conftest import padded_sequences, token_model

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


@pytest.mark.parametrize("source", ["arrays", "dataset"])
def test_a_padding_mask_weighs_the_metric_as_keras_evaluate_does(source):
    """Issue 25: a language model's padding must not count. The metric, the tokens the resolution counts and the
    right-or-wrong test all follow the padding mask passed as sample weights, as Keras's evaluate does."""
    import tensorflow as tf

    x, y, mask = padded_sequences()
    model = token_model(mask_zero=False)
    model.fit(x, y, sample_weight=mask, epochs=3, verbose=0)
    data = (x, y, mask) if source == "arrays" else tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(50)
    for metric in ("accuracy", "sparse_categorical_crossentropy"):
        session = open_session(model, data, target="mixed_float16", metric=metric, batch_size=64)
        keras_says = model.evaluate(x, y, sample_weight=mask, verbose=0, return_dict=True)
        assert session.baseline == pytest.approx(keras_says[metric], rel=1e-5)
        assert session.units_per_sample == pytest.approx(mask.sum() / len(x))  # the real tokens, not 12 a sequence
    assert session.data.weights is not None and abs(float(session.data.weights.mean()) - 1.0) < 1e-6
    accuracy = open_session(model, data, target="mixed_float16", metric="accuracy", batch_size=64)
    assert accuracy.binary_values  # counts of right real tokens
    unweighted = open_session(model, (x, y), target="mixed_float16", metric="accuracy", batch_size=64)
    assert abs(unweighted.baseline - accuracy.baseline) > 0.05  # the padding would have counted


def test_a_model_whose_outputs_carry_a_mask_is_measured_without_its_padding():
    """An Embedding(mask_zero=True) mask that reaches the outputs leaves the padding out of Keras's metrics; it
    must leave it out here too, alone and together with sample weights."""
    x, y, mask = padded_sequences(seed=1)
    model = token_model(mask_zero=True, seed=1)
    model.fit(x, y, epochs=3, verbose=0)
    session = open_session(model, (x, y), target="mixed_float16", metric="accuracy", batch_size=64)
    assert session.baseline == pytest.approx(model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"], rel=1e-5)
    assert session.units_per_sample == pytest.approx(mask.sum() / len(x))
    weights = np.random.default_rng(1).integers(0, 3, size=x.shape).astype("float32")  # one per token
    both = open_session(model, (x, y, weights), target="mixed_float16", metric="accuracy", batch_size=64)
    keras_says = model.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)["accuracy"]
    assert both.baseline == pytest.approx(keras_says, rel=1e-5)


def test_the_early_stop_under_weights_never_stops_a_pass_the_full_pass_would_keep(planted):
    """Weighted samples are worth more or less than one: the most a sample left can win back scales with its
    weight, so the certain-drop bound still lies under the drop of the whole pass."""
    model, _, (x, y), fragile = planted
    weights = np.random.default_rng(0).choice([0.0, 1.0, 3.0], size=len(y)).astype("float32")
    session = open_session(model, (x, y, weights), target="mixed_bfloat16", batch_size=32)
    assert np.all(session.baseline_values <= session.sample_scales + 1e-6) and np.all(session.baseline_values >= 0)
    ruin = {p: "mixed_bfloat16" for p in fragile["mixed_bfloat16"]}
    early = session.evaluate(ruin, budget=Budget.get("0.5%"))
    session._cache.clear()
    full = session.evaluate(ruin)
    assert early.rejected and early.samples < session.data.n
    assert full.drop >= early.drop - 1e-9
    keras_model = keras.models.clone_model(model)
    keras_model.set_weights(model.get_weights())
    keras_model.compile(loss="sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
    keras_says = keras_model.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)["accuracy"]
    assert session.baseline == pytest.approx(keras_says, rel=1e-5)


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        (lambda n: -np.ones(n), "DataError", "finite and non-negative"),
        (lambda n: np.zeros(n), "DataError", "some sample weight above zero"),
        (lambda n: np.ones((n, 5)), "DataError", r"shape \(n,\) or the labels' leading shape"),
        (lambda n: np.ones(n - 1), "DataError", "one sample weight per sample"),
    ],
)
def test_sample_weights_that_cannot_weigh_the_metric_are_refused(planted, weights, error, message):
    import autoprec.errors as errors

    model, _, (x, y), _ = planted
    with pytest.raises(getattr(errors, error), match=message):
        open_session(model, (x, y, weights(len(y))), target="mixed_float16")


def test_equal_weights_change_nothing_and_a_callable_metric_refuses_weights(planted):
    from autoprec.errors import MetricError

    model, _, (x, y), _ = planted
    plain = open_session(model, (x, y), target="mixed_float16")
    threes = open_session(model, (x, y, np.full(len(y), 3.0)), target="mixed_float16")
    assert threes.data.weights is None and threes.baseline == plain.baseline
    halves = np.where(np.arange(len(y)) % 2 == 0, 1.0, 0.0)
    with pytest.raises(MetricError, match="takes no weights"):
        open_session(model, (x, y, halves), target="mixed_float16", metric=lambda t, p: 0.0, higher_is_better=True)


def test_a_padding_mask_input_without_weights_gets_a_hint(caplog):
    """A KerasHub-style ``padding_mask`` input with padding, per-token labels and no weights: every token counts,
    as in Keras's evaluate without weights, and the warning says how to count only the real ones."""
    inputs = {n: keras.Input((None,), dtype="int32", name=n) for n in ("token_ids", "padding_mask")}
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Embedding(10, 8)(inputs["token_ids"])))
    x = {"token_ids": np.ones((8, 5), "int32"), "padding_mask": np.array([[1, 1, 1, 0, 0]] * 8, "int32")}
    y = np.ones((8, 5), "int32")
    with caplog.at_level("WARNING", logger="autoprec"):
        assert open_session(model, (x, y), target="mixed_float16", metric="accuracy").units_per_sample == 5
    assert "Pass (x, y, x['padding_mask'])" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="autoprec"):
        weighted = open_session(model, (x, y, x["padding_mask"]), target="mixed_float16", metric="accuracy")
    assert weighted.units_per_sample == 3 and "padding_mask" not in caplog.text


def test_right_or_wrong_counts_hold_over_long_sequences_of_any_length():
    """float32 means of 0/1 tokens (weighted or not) are whole counts only to float32 precision: over 2,000 tokens
    (not a power of two) a per-token accuracy is still right-or-wrong, so its bound counts the changed tokens."""
    x, y, mask = padded_sequences(n=32, steps=2000, seed=3)
    model = token_model(mask_zero=False, seed=3)
    for data in ((x, y), (x, y, mask)):
        session = open_session(model, data, target="mixed_float16", metric="accuracy")
        assert session.binary_values, data[2:]


def test_output_masks_follow_each_output_by_its_name():
    """Two outputs, listed [tokens, cls] (not in the sorted order of a dict's keys): the per-token output's
    Embedding mask weighs its metric, the pooled output has none, as in Keras's evaluate."""
    x, y, mask = padded_sequences(n=128, seed=4)
    keras.utils.set_random_seed(4)
    i = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 16, mask_zero=True)(i)
    tokens = keras.layers.Dense(20, activation="softmax", name="tokens")(h)
    cls = keras.layers.Dense(2, activation="softmax", name="cls")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(i, [tokens, cls])
    labels = {"tokens": y, "cls": (x[:, 0] > 10).astype("int32")}
    model.compile(
        "adam", ["sparse_categorical_crossentropy"] * 2, metrics={"tokens": ["accuracy"], "cls": ["accuracy"]}
    )
    model.fit(x, labels, epochs=3, verbose=0)
    keras_says = model.evaluate(x, labels, verbose=0, return_dict=True)
    for name in ("tokens", "cls"):
        session = open_session(model, (x, labels), target="mixed_float16", metric={name: "accuracy"})
        assert session.baseline == pytest.approx(keras_says[f"{name}_accuracy"], rel=1e-5), name
    assert session.units_per_sample == 1  # cls: one label per sequence, not the tokens of the other output


def test_weights_of_the_wrong_length_or_a_split_without_weight_are_data_errors():
    from autoprec.data import EvalData
    from autoprec.errors import DataError

    x = np.ones((10, 2), "float32")
    x[0, 0] = np.nan
    with pytest.raises(DataError, match="one sample weight per sample"):
        EvalData.get((x, np.zeros(10), np.ones(9)), nonfinite="drop")
    weights = np.zeros(10)
    weights[:2] = 1.0
    data = EvalData.get((np.ones((10, 2)), np.zeros(10), weights))
    with pytest.raises(DataError, match="held-out part of 5 samples whose sample weights are all zero|searched part"):
        for seed in range(20):  # some seed puts both weighted samples on one side
            data.split(0.5, seed=seed)
