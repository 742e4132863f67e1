"""Quantized candidates: int8, int4 and float8 through Keras's own quantize, searched under the budget."""

import keras
import numpy as np
import pytest

import autoprec
from autoprec import testing
from autoprec.errors import ArgumentError
from autoprec.formats import split, weight_bytes
from autoprec.graph import build_graph, keyed_layers
from autoprec.quantize import is_quantizable, quantized_twin
from autoprec.session import open_session
from autoprec.verify.real import predict_batches

L = keras.layers


@pytest.fixture(scope="module")
def digits_mlp():
    (x_train, y_train), val = testing.digits_data(flat=True)
    keras.utils.set_random_seed(0)
    model = testing.train(testing.mlp(depth=3, width=256), x_train, y_train, epochs=12)
    return model, (x_train, y_train), val


@pytest.fixture(scope="module")
def with_int4(digits_mlp):
    """One size-optimised tune with int8 and int4 candidates, shared by the tests that read its result and its report
    (each tune costs about 15 s on 2 cores)."""
    model, _, val = digits_mlp
    return autoprec.tune(
        model,
        val,
        budget="1%",
        target="mixed_bfloat16",
        candidates=("float32", "mixed_bfloat16", "int8", "int4"),
        n_trials=30,
        verbose=0,
    )


@pytest.fixture(scope="module")
def digits_transformer():
    """Rows of the 8x8 image as a sequence of 8 tokens: Dense embedding, attention, LayerNorm, a Dense FFN."""
    (x_train, y_train), (x_val, y_val) = testing.digits_data()
    x_train, x_val = x_train[..., 0], x_val[..., 0]
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8))
    h = L.Dense(32, name="embed")(i)
    h = L.LayerNormalization(name="ln1")(L.Add(name="res1")([h, L.MultiHeadAttention(2, 16, name="mha")(h, h)]))
    f = L.Dense(64, activation="relu", name="ffn1")(h)
    h = L.LayerNormalization(name="ln2")(L.Add(name="res2")([h, L.Dense(32, name="ffn2")(f)]))
    h = L.Dense(64, activation="relu", name="head1")(L.Flatten(name="flat")(h))
    out = L.Dense(10, activation="softmax", name="out")(h)
    model = keras.Model(i, out, name="digits_transformer")
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=10, batch_size=64, verbose=0)
    return model, (x_train, y_train), (x_val, y_val)


def test_what_keras_can_quantize():
    i = keras.Input((4, 8))
    h = L.Dense(8, name="d")(i)
    h = L.EinsumDense("abc,cd->abd", output_shape=(4, 8), name="e")(h)
    h = L.Conv1D(8, 3, padding="same", name="c")(h)
    g = build_graph(keras.Model(i, L.MultiHeadAttention(1, 4, name="mha")(h, h)))
    assert {i.path: i.quantizable for i in g.layers} == {"d": True, "e": True, "c": False, "mha": False}

    class MyDense(L.Dense):
        pass

    custom = MyDense(4)
    custom.build((None, 3))
    assert not is_quantizable(custom)  # Keras quantizes the exact classes only


def test_twin_matches_keras_quantize_and_bytes():
    d = L.Dense(32, name="d")
    d.build((None, 16))
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    twin = quantized_twin(d, "int8_from_float32")
    twin_out = np.asarray(twin(x))
    clone = L.Dense.from_config(d.get_config())
    clone.build((None, 16))
    clone.set_weights(d.get_weights())
    clone.quantize("int8")
    np.testing.assert_array_equal(twin_out, np.asarray(clone(x)))
    assert np.max(np.abs(twin_out - np.asarray(d(x)))) < 0.05
    assert split("int4/128_from_mixed_bfloat16") == ("int4", "mixed_bfloat16")
    assert weight_bytes(1000, "int8_from_mixed_bfloat16") == 1000 and weight_bytes(1000, "mixed_bfloat16") == 4000


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8_from_mixed_bfloat16", "int4_from_mixed_bfloat16", "float8_from_mixed_bfloat16"])
def test_simulated_and_real_quantized_metrics_agree(digits_mlp, fmt):
    """The engine's quantized twins and the emitted model (Keras's quantize) give the same predictions."""
    model, _, val = digits_mlp
    session = open_session(model, val, target="mixed_bfloat16", formats=("mixed_bfloat16", fmt))
    session.engine.calibrate(session.data.batches())
    rng = np.random.default_rng(0)
    units = [u.path for u in session.graph.units]
    n = session.data.n
    for trial in range(3):
        assignment = {u: (fmt if trial == 0 or rng.random() < 0.5 else "mixed_bfloat16") for u in units}
        sim = session.evaluate(assignment)
        emitted = autoprec.apply_policy(model, session.graph.resolve(assignment), calibration_data=val)
        real = session.score_outputs(predict_batches(emitted, session.data))
        assert abs(sim.metric - real.metric) <= 2 / n + 1e-9, (assignment, sim, real)


@pytest.mark.slow
def test_tune_for_size_with_int8(digits_mlp, with_int4, tmp_path):
    model, _, val = digits_mlp
    result = autoprec.tune(
        model,
        val,
        budget="1%",
        target="mixed_bfloat16",
        candidates=("float32", "mixed_bfloat16", "int8"),
        objective="size",
        n_trials=25,
        verbose=0,
    )
    assert result.feasible and result.drop <= 0.01
    assert result.objective == "size"
    quantized = result.policy.quantized
    assert quantized and all(name == "int8_from_mixed_bfloat16" for name in quantized.values())
    assert result.size_ratio >= 2.5
    assert "size" in result.summary() and "optimised" in result.summary()
    layers = keyed_layers(result.model)
    assert all(layers[p].quantization_mode == "int8" for p in quantized)
    # the policy round-trips: JSON, apply_policy and .keras save/load give identical predictions
    x = val[0][:64]
    result.policy.save(tmp_path / "policy.json")
    again = autoprec.apply_policy(model, autoprec.PrecisionPolicy.load(tmp_path / "policy.json"))
    np.testing.assert_array_equal(again.predict(x, verbose=0), result.model.predict(x, verbose=0))
    result.model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0))
    assert with_int4.objective == "size"  # integer candidates: size unless speed is asked for
    assert with_int4.feasible and with_int4.size_ratio > result.size_ratio


@pytest.mark.slow
def test_transformer_quantizes_its_dense_layers(digits_transformer):
    model, _, val = digits_transformer
    result = autoprec.tune(
        model,
        val,
        budget="1%",
        target="mixed_bfloat16",
        candidates=("float32", "mixed_bfloat16", "int8"),
        n_trials=20,
        verbose=0,
    )
    assert result.feasible
    assert set(result.policy.quantized) <= {"embed", "ffn1", "ffn2", "head1"} and result.policy.quantized


def test_integer_candidates_are_refused_for_the_training_check(digits_mlp):
    model, train, val = digits_mlp
    with pytest.raises(ArgumentError, match="inference"):
        autoprec.tune(
            model, val, candidates=("float32", "int8"), verify="train", train_data=train, n_trials=3, verbose=0
        )
    with pytest.raises(ArgumentError, match="candidates"):
        autoprec.tune(model, val, candidates=("float32", "mixed_bfloat16", "int3"), n_trials=3, verbose=0)
    with pytest.raises(ArgumentError, match="objective"):
        autoprec.tune(model, val, objective="fame", n_trials=3, verbose=0)


def test_speed_objective_uses_a_measured_factor(digits_mlp):
    model, _, val = digits_mlp
    result = autoprec.tune(
        model,
        val,
        budget="1%",
        target="mixed_bfloat16",
        objective="speed",
        candidates=("float32", "mixed_bfloat16", "int8"),
        n_trials=10,
        verbose=0,
    )
    factor = result.stats["quantized_speed"]["int8"]
    assert factor > 0  # measured on this device; on this CPU int8 is slower than float32
    if factor < 1:
        assert not result.policy.quantized  # the search does not pick a slower format for speed


@pytest.mark.slow
def test_report_shows_integer_formats_and_the_size_tradeoff(with_int4, tmp_path):
    from autoprec.report import pages as report
    from autoprec.report import plots

    result = with_int4
    result.save(tmp_path / "run")
    saved = report.load_saved(tmp_path / "run")
    trade = plots.tradeoff_data(saved)
    assert trade["x_label"].startswith("weights smaller") and trade["chosen"][0] == pytest.approx(result.size_ratio)
    assert len(trade["speedup"]) == int(result.trials["evaluated"].sum())
    text = (tmp_path / "run" / "report.md").read_text()
    assert "smaller than float32; the search optimised size" in text
    assert "int4" in text or "int8" in text
    assert plots._decision_color("int8_from_mixed_bfloat16") == plots.COLORS["int8"]
