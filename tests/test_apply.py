import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS, small_data, trained

from autoprec import PrecisionPolicy, apply_policy
from autoprec.errors import ModelMismatchError, UnsupportedModelError
from autoprec.graph import build_graph, keyed_layers

SAMPLE = np.zeros((2, 12), "float32")


def all16(model, fmt):
    g = build_graph(model, sample=SAMPLE)
    return PrecisionPolicy(g.resolve({u.path: fmt for u in g.units}), target=fmt, layers=g.layer_facts()), g


def compute_dtypes(model):
    return {k: layer.compute_dtype for k, layer in keyed_layers(model).items() if layer.weights}


@pytest.mark.parametrize("kind", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("fmt", ["mixed_float16", "mixed_bfloat16"])
def test_apply_each_kind(kind, fmt, tmp_path):
    model = trained(MODEL_BUILDERS[kind]())
    x, _ = small_data()
    reference = model.predict(x, verbose=0)
    before = [w.copy() for w in model.get_weights()]
    policy, graph = all16(model, fmt)
    inplace = kind == "subclassed"
    tuned = apply_policy(model, policy, inplace=inplace)
    want = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}[fmt]
    for info in graph.layers:
        layer = info.layer if inplace else _find(tuned, info.path)
        expected = "float32" if info.pinned else want
        if info.is_unit or info.pinned:
            assert layer.compute_dtype == expected, info.path
    assert all(np.array_equal(a, b) for a, b in zip(before, tuned.get_weights(), strict=True))
    pred = tuned.predict(x, verbose=0)
    assert pred.dtype == np.float32  # outputs stay float32
    tolerance = 2e-2 if fmt == "mixed_float16" else 8e-2
    assert np.max(np.abs(pred - reference)) < tolerance
    is_lso = isinstance(tuned.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_lso == (fmt == "mixed_float16")
    if not inplace:
        assert all(layer.compute_dtype == "float32" for layer in model._flatten_layers(include_self=False))
        path = tmp_path / "tuned.keras"
        tuned.save(path)
        loaded = keras.models.load_model(path)
        assert compute_dtypes(loaded) == compute_dtypes(tuned)
        assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer) == is_lso
        assert np.max(np.abs(loaded.predict(x, verbose=0) - pred)) < 1e-6


def _find(model, path):
    return keyed_layers(model)[path]


def test_batchnorm_statistics_are_copied():
    model = trained(MODEL_BUILDERS["functional"](), epochs=2)
    bn = model.get_layer("bn")
    assert not np.allclose(bn.moving_mean.numpy(), 0)
    tuned = apply_policy(model, all16(model, "mixed_bfloat16")[0])
    np.testing.assert_array_equal(tuned.get_layer("bn").moving_mean.numpy(), bn.moving_mean.numpy())
    np.testing.assert_array_equal(tuned.get_layer("bn").moving_variance.numpy(), bn.moving_variance.numpy())


def test_recurrent_and_bidirectional_weights_are_copied():
    """Bidirectional's sublayers get other paths in Keras's clone; their weights must still be copied, not left random."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8))
    h = keras.layers.GRU(16, return_sequences=True, name="gru")(i)
    h = keras.layers.Bidirectional(keras.layers.LSTM(8), name="bi")(h)
    model = keras.Model(i, keras.layers.Dense(10, name="out")(h))
    x = np.random.default_rng(0).normal(size=(4, 8, 8)).astype("float32")
    want = model.predict(x, verbose=0)
    for policy in ({}, {"gru": "mixed_bfloat16", "bi": "mixed_bfloat16"}):
        got = apply_policy(model, policy).predict(x, verbose=0)
        assert np.max(np.abs(got - want)) <= (1e-6 if not policy else 0.05 * np.max(np.abs(want)))


def test_never_wrapped_twice_and_custom_optimizer():
    model = MODEL_BUILDERS["functional"]()
    policy = all16(model, "mixed_float16")[0]
    first = apply_policy(model, policy)
    second = apply_policy(first, policy)
    assert isinstance(second.optimizer, keras.optimizers.LossScaleOptimizer)
    assert not isinstance(second.optimizer.inner_optimizer, keras.optimizers.LossScaleOptimizer)
    given = apply_policy(model, policy, optimizer=keras.optimizers.SGD(0.1))
    assert isinstance(given.optimizer.inner_optimizer, keras.optimizers.SGD)


def test_float32_policy_is_not_wrapped_and_trains():
    model = MODEL_BUILDERS["sequential"]()
    tuned = apply_policy(model, {})
    assert not isinstance(tuned.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = small_data()
    history = tuned.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_output_layers_stay_float32_whatever_the_policy_says():
    model = MODEL_BUILDERS["functional"]()
    g = build_graph(model)
    policy = PrecisionPolicy({p: "mixed_float16" for p in g.all_paths()})
    tuned = apply_policy(model, policy)
    assert tuned.get_layer("out").compute_dtype == "float32"
    assert tuned.get_layer("h1").compute_dtype == "float16"


def test_float16_model_trains_with_loss_scale():
    model = trained(MODEL_BUILDERS["nested"]())
    tuned = apply_policy(model, all16(model, "mixed_float16")[0])
    x, y = small_data()
    history = tuned.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert all(np.isfinite(history.history["loss"]))


def test_subclassed_needs_inplace():
    model = MODEL_BUILDERS["subclassed"]()
    with pytest.raises(UnsupportedModelError, match="inplace=True"):
        apply_policy(model, all16(model, "mixed_float16")[0])


def test_inplace_rebuilds_traced_functions():
    model = MODEL_BUILDERS["subclassed"]()
    x, _ = small_data()
    model.predict(x, verbose=0)
    assert model.predict_function is not None
    apply_policy(model, all16(model, "mixed_bfloat16")[0], inplace=True)
    assert model.predict_function is None
    assert model.d1.compute_dtype == "bfloat16"


def test_subclassed_policy_survives_save_load_through_policy_json(tmp_path):
    """Keras rebuilds a subclassed model's layers with default dtypes on load; the policy file restores them."""
    model = trained(MODEL_BUILDERS["subclassed"]())
    policy, _ = all16(model, "mixed_float16")
    apply_policy(model, policy, inplace=True)
    x, _ = small_data()
    pred = model.predict(x, verbose=0)
    model.save(tmp_path / "sub.keras")
    policy.save(tmp_path / "policy.json")
    loaded = keras.models.load_model(tmp_path / "sub.keras")
    apply_policy(loaded, str(tmp_path / "policy.json"), inplace=True)
    assert compute_dtypes(loaded) == compute_dtypes(model)
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.max(np.abs(loaded.predict(x, verbose=0) - pred)) < 1e-6


def test_policy_for_another_model():
    policy = all16(MODEL_BUILDERS["functional"](), "mixed_float16")[0]
    with pytest.raises(ModelMismatchError, match="in the policy but not in the model"):
        apply_policy(MODEL_BUILDERS["sequential"](), policy)


def test_policy_from_json_path(tmp_path):
    model = MODEL_BUILDERS["functional"]()
    policy = all16(model, "mixed_bfloat16")[0]
    policy.save(tmp_path / "p.json")
    tuned = apply_policy(model, str(tmp_path / "p.json"))
    assert tuned.get_layer("h2").compute_dtype == "bfloat16"


def test_layers_absent_from_the_policy_keep_a_non_float32_dtype():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name="wide", dtype="float64")(inputs)
    out = keras.layers.Dense(2, name="head")(keras.layers.Dense(4, name="mid")(h))
    model = keras.Model(inputs, out)
    tuned = apply_policy(model, {"mid": "mixed_bfloat16"})
    assert tuned.get_layer("wide").compute_dtype == "float64"
    assert tuned.get_layer("mid").compute_dtype == "bfloat16"
