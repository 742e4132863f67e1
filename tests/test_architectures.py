"""Architectures no issue names: the engine must agree with real Keras policies on each."""

import keras
import numpy as np
import pytest
from conftest import check_tuned, simulate

import autoprec
from autoprec.session import open_session
from autoprec.verify.real import predict_batches

L = keras.layers


def transformer():
    i = keras.Input((12, 16))
    a = L.MultiHeadAttention(2, 8, name="mha")(i, i)
    x = L.LayerNormalization(name="ln1")(L.Add(name="res1")([i, a]))
    f = L.Dense(32, activation="gelu", name="ffn1")(x)
    x = L.LayerNormalization(name="ln2")(L.Add(name="res2")([x, L.Dense(16, name="ffn2")(f)]))
    o = L.Dense(3, activation="softmax", name="out")(L.GlobalAveragePooling1D(name="gap")(x))
    return keras.Model(i, o), (12, 16)


def masked_lstm():
    i = keras.Input((10,), dtype="int32")
    x = L.Embedding(50, 16, mask_zero=True, name="emb")(i)
    x = L.LSTM(16, name="lstm")(x)
    o = L.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(i, o), None


def conv1d_gru():
    i = keras.Input((20, 4))
    x = L.Conv1D(16, 3, padding="same", activation="relu", name="c1")(i)
    x = L.DepthwiseConv1D(3, padding="same", name="dw")(x)
    x = L.GRU(8, name="gru")(x)
    o = L.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(i, o), (20, 4)


def two_inputs():
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    x = L.Concatenate(name="cat")(
        [L.Dense(8, activation="relu", name="da")(a), L.Dense(8, activation="relu", name="db")(b)]
    )
    o = L.Dense(3, activation="softmax", name="out")(L.Dense(8, activation="relu", name="mix")(x))
    return keras.Model([a, b], o), None


def data_for(name, model, shape, rng, n=160):
    if name == "masked_lstm":
        x = rng.integers(1, 50, size=(n, 10))
        x[:, 7:] = 0  # padding the mask must hide
    elif name == "two_inputs":
        x = [rng.normal(size=(n, 6)).astype("float32"), rng.normal(size=(n, 4)).astype("float32")]
    else:
        x = rng.normal(size=(n, *shape)).astype("float32")
    flat = np.concatenate([a.reshape(n, -1) for a in (x if isinstance(x, list) else [x])], axis=1).astype("float32")
    y = (flat[:, :6] @ rng.normal(size=(6, 3))).argmax(-1)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    return x, y


@pytest.mark.parametrize("name", ["transformer", "masked_lstm", "conv1d_gru", "two_inputs"])
@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_engine_matches_real_policies(name, target):
    keras.utils.set_random_seed(0)
    model, shape = globals()[name]()
    x, y = data_for(name, model, shape, np.random.default_rng(0))
    ctx = open_session(model, (x, y), target=target, metric="accuracy")
    units = [u.path for u in ctx.graph.eligible]
    assert units
    for assignment in ({u: target for u in units}, {u: target for u in units[::2]}):
        sim = simulate(ctx, assignment)
        real = predict_batches(autoprec.apply_policy(model, ctx.graph.resolve(assignment)), ctx.data)
        tolerance = 0.02 if target == "mixed_float16" else 0.08
        assert np.max(np.abs(sim - real)) < tolerance, (name, assignment)
    assert ctx.engine.traces <= 2


def test_masked_lstm_engine_respects_the_mask():
    keras.utils.set_random_seed(0)
    model, _ = masked_lstm()
    x, y = data_for("masked_lstm", model, None, np.random.default_rng(1))
    ctx = open_session(model, (x, y), target="mixed_bfloat16", metric="accuracy")
    np.testing.assert_allclose(np.concatenate(ctx.baseline_outputs), model.predict(x, verbose=0), atol=1e-5)
    masked = simulate(ctx, {"emb": "mixed_bfloat16"})
    real = predict_batches(autoprec.apply_policy(model, ctx.graph.resolve({"emb": "mixed_bfloat16"})), ctx.data)
    assert np.max(np.abs(masked - real)) < 0.05


def test_tune_transformer_and_save(tmp_path):
    keras.utils.set_random_seed(0)
    model, shape = transformer()
    x, y = data_for("transformer", model, shape, np.random.default_rng(0))
    result = autoprec.tune(model, (x, y), budget="2%", target="mixed_bfloat16", n_trials=8, verbose=0)
    assert result.verification["feasible"]
    result.save(tmp_path)
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.get_layer("mha").compute_dtype == result.model.get_layer("mha").compute_dtype


@keras.saving.register_keras_serializable("autoprec_tests")
class ExpSoftmax(L.Layer):
    """A user's softmax without the max subtracted: ``exp`` overflows float16 once a logit passes 11."""

    def call(self, x):
        e = keras.ops.exp(x)
        return e / keras.ops.sum(e, axis=-1, keepdims=True)


def _variable_length_attention(rng):
    """Tokens of any length into MultiHeadAttention; the label is whether small tokens make up a quarter of the row."""
    tokens = keras.Input((None,), dtype="int32")
    e = L.Embedding(32, 32, name="embed")(tokens)
    a = L.MultiHeadAttention(4, 8, name="mha")(e, e)
    x = L.LayerNormalization(name="ln1")(L.Add(name="res1")([e, a]))
    f = L.Dense(64, activation="relu", name="ffn1")(x)
    x = L.LayerNormalization(name="ln2")(L.Add(name="res2")([x, L.Dense(32, name="ffn2")(f)]))
    model = keras.Model(tokens, L.Dense(2, name="out")(L.GlobalAveragePooling1D(name="pool")(x)))
    t = rng.integers(0, 32, size=(1536, 16)).astype("int32")
    return model, t, ((t < 8).mean(axis=1) > 0.25).astype("int32")


def _custom_exp(rng):
    x = rng.normal(size=(1536, 16)).astype("float32")
    y = np.argmax(x[:, :4] + 0.5 * x[:, 4:8], axis=1).astype("int32")
    i = keras.Input((16,))
    h = L.Dense(64, name="logits")(L.Dense(128, activation="relu", name="d1")(i))
    h = ExpSoftmax(name="custom")(L.Rescaling(0.5, name="sharpen")(L.Dense(4, name="proj")(h)))
    return keras.Model(i, L.Dense(4, name="out")(h)), x, y


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "build", [_variable_length_attention, _custom_exp], ids=["attention_none_length", "custom_exp"]
)
def test_plain_keras_models_tune_emit_reload_and_report(build, target, tmp_path):
    """Issue 25's zoo outside KerasHub: variable-length attention, and a custom layer with an internal exp."""
    keras.utils.set_random_seed(0)
    model, x, y = build(np.random.default_rng(0))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x[:1024], y[:1024], epochs=20, batch_size=64, verbose=0)
    x, y = x[1024:], y[1024:]
    result = autoprec.tune(model, (x, y), budget="0.5%", target=target, device="gpu", n_trials=10, seed=0, verbose=0)
    report = check_tuned(model, result, x, y, tmp_path)
    assert "## Inside the blocks" in report or build is _custom_exp
    if build is _variable_length_attention:
        sub = result.sublayers
        assert {"mha/query", "mha/key", "mha/value", "mha/attention_output"} <= set(sub["path"]), set(sub["path"])
    elif target == "mixed_float16":
        assert dict(result.policy.items())["custom"] == "float32"  # the exp overflows float16, and only there
