import math

import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS, small_data, trained

import autoprec
from autoprec.data import EvalData
from autoprec.engine import RealEngine, SimEngine, make_engine, round_to
from autoprec.graph import build_graph
from autoprec.session import open_session
from autoprec.verify.real import predict_batches


def test_round_to_float16_overflows_and_flushes():
    x = keras.ops.convert_to_tensor(np.array([65504.0, 70000.0, -1e6, 2.0**-25, 2.0**-20, 1.0 + 2.0**-12], "float32"))
    r = keras.ops.convert_to_numpy(round_to(x, "float16"))
    assert r[0] == 65504.0 and np.isposinf(r[1]) and np.isneginf(r[2])
    assert r[3] == 0.0  # below half the smallest subnormal: flushed
    assert r[4] == pytest.approx(2.0**-20)  # subnormal, kept
    assert r[5] == 1.0  # below float16's resolution at 1
    b = keras.ops.convert_to_numpy(round_to(x, "bfloat16"))
    assert np.isfinite(b[:3]).all() and b[3] > 0


def _forward_all(engine, data):
    outs = [engine.forward(x, y)[0] for x, y in data.batches()]
    return np.concatenate(outs)


@pytest.mark.parametrize("kind", ["functional", "sequential", "nested"])
def test_switches_do_not_retrace(kind):
    model = trained(MODEL_BUILDERS[kind]())
    x, y = small_data(100)
    data = EvalData.get((x, y), batch_size=32)  # 3 full batches and one of 4
    g = build_graph(model)
    engine = SimEngine(model, g, formats=("mixed_float16", "mixed_bfloat16"))
    np.testing.assert_allclose(_forward_all(engine, data), model.predict(x, verbose=0), atol=1e-5)
    rng = np.random.default_rng(0)
    for _ in range(6):
        engine.set_assignment({u.path: rng.choice(["float32", "mixed_float16", "mixed_bfloat16"]) for u in g.eligible})
        _forward_all(engine, data)
    if keras.backend.backend() == "torch":
        return  # eager: nothing is traced, each call runs the graph (engine.traces counts calls)
    assert engine.traces == 1  # one generic trace: the smaller last batch reuses it (padded, on JAX)


def test_engine_agrees_with_real_policies_per_assignment():
    model = trained(MODEL_BUILDERS["nested"]())
    x, y = small_data(64)
    data = EvalData.get((x, y))
    g = build_graph(model)
    engine = SimEngine(model, g, formats=("mixed_float16",))
    units = [u.path for u in g.units]
    for chosen in ([], units, units[:2], units[2:]):
        assignment = {u: "mixed_float16" for u in chosen}
        engine.set_assignment(assignment)
        sim = _forward_all(engine, data)
        real = predict_batches(autoprec.apply_policy(model, g.resolve(assignment)), data)
        assert np.max(np.abs(sim - real)) < 2e-3


def test_real_engine_fallback_restores_policies():
    model = trained(MODEL_BUILDERS["subclassed"]())
    x, y = small_data(40)
    data = EvalData.get((x, y))
    g = build_graph(model, sample=x[:2])
    engine = make_engine(model, g, formats=("mixed_bfloat16",))
    assert isinstance(engine, RealEngine)
    with engine:
        engine.set_assignment({u.path: "mixed_bfloat16" for u in g.units})
        assert model.d1.compute_dtype == "bfloat16"
        out = _forward_all(engine, data)
        assert np.max(np.abs(out - model.predict(x, verbose=0))) < 1e-6
    assert model.d1.compute_dtype == "float32"
    assert engine.traces == 1


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("which", ["digits_cnn", "planted", "planted_weightless"])
def test_simulated_metric_matches_real_on_bundled_models(request, which, target):
    """The simulated and the real (Keras policies) metric of the same assignments.

    Tolerance: 2 samples' worth of accuracy (2/n). The engine reproduces the
    rounding of each layer's inputs, weights and outputs but not rounding
    inside a layer (the pre-activation of a Dense with an activation), which
    can flip a borderline argmax; measured agreement here is exact or within
    one sample. Where an assignment ruins the model (a drop over 10 points,
    twenty times any budget here), how ruined differs by rounding order (a
    real bfloat16 ``Rescaling`` rounds ``x * scale`` before adding the
    offset), so both must only be far over budget. Output errors agree
    within 0.01 absolute + 10% relative, whenever both are finite. The weightless model covers a large Rescaling,
    an exponential activation, an offset on an Add and a softmax over shifted
    logits, each switched on its own.
    """
    model, _, val = request.getfixturevalue(which)[:3]
    session = open_session(model, val, target=target)
    rng = np.random.default_rng(1)
    eligible = [i.path for i in session.graph.eligible]
    n = session.data.n
    for trial in range(4):
        assignment = {p: target for p in eligible if trial == 0 or rng.random() < 0.5}
        sim = session.evaluate(assignment)
        real = session.score_outputs(
            predict_batches(autoprec.apply_policy(model, session.graph.resolve(assignment)), session.data)
        )
        if real.nonfinite_outputs or real.drop > 0.1:
            # NaN propagation differs by kernel (oneDNN's float32 ReLU maps NaN
            # to 0, the float16 one keeps it): the simulated outputs may stay
            # finite, but they must be just as ruined, i.e. infeasible.
            assert sim.drop > 0.1, (assignment, sim, real)
            continue
        assert sim.drop <= 0.1, (assignment, sim, real)
        assert abs(sim.metric - real.metric) <= 2 / n + 1e-9, (assignment, sim, real)
        if math.isfinite(sim.output_error) and math.isfinite(real.output_error):
            assert abs(sim.output_error - real.output_error) <= 0.01 + 0.1 * real.output_error


def test_layers_that_do_not_autocast_keep_their_inputs():
    """LayerNormalization reads float32 inputs as they come under a 16-bit policy: the engine must not round them."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    i = keras.Input((8,))
    h = keras.layers.Rescaling(1.0, offset=1024.0, name="shift")(keras.layers.Dense(16, name="d")(i))
    h = keras.layers.LayerNormalization(name="ln")(h)
    m = keras.Model(i, keras.layers.Dense(2, activation="softmax", name="out")(h))
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x, y, epochs=20, verbose=0)
    session = open_session(m, (x, y), target="mixed_float16")
    sim = session.evaluate({"ln": "mixed_float16"})
    real = session.score_outputs(predict_batches(autoprec.apply_policy(m, {"ln": "mixed_float16"}), session.data))
    assert abs(sim.drop - real.drop) <= 2 / 512


# Custom layers whose own arithmetic overflows float16 where their inputs, weights and outputs do not.
@keras.saving.register_keras_serializable("autoprec_tests")
class ExpNormalize(keras.layers.Layer):
    """exp without subtracting the max, then normalise: inf / inf in float16 once a logit passes 11."""

    def call(self, x):
        e = keras.ops.exp(x)
        return e / keras.ops.sum(e, axis=-1, keepdims=True)


@keras.saving.register_keras_serializable("autoprec_tests")
class RMSScale(keras.layers.Layer):
    """x / sqrt(mean(x**2)): the sum of squares overflows float16 for |x| in the hundreds."""

    def call(self, x):
        return x / keras.ops.sqrt(keras.ops.mean(keras.ops.square(x), axis=-1, keepdims=True) + 1e-6)


@keras.saving.register_keras_serializable("autoprec_tests")
class ScaledSoftmax(keras.layers.Layer):
    """A learnt projection to logits scaled past float16's range, then a softmax: the logits overflow."""

    def __init__(self, units=10, scale=1e5, **kwargs):
        super().__init__(**kwargs)
        self.units, self.scale = units, scale

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")

    def call(self, x):
        return keras.ops.softmax(keras.ops.matmul(x, self.w) * self.scale)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}


def _custom_model(layer, scale):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, name="d1")(inputs)
    h = keras.layers.Rescaling(scale, name="scale")(h) if scale != 1 else h
    h = layer(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(h))


@pytest.mark.parametrize(
    "layer, scale",
    [(ExpNormalize(name="custom"), 8.0), (RMSScale(name="custom"), 300.0), (ScaledSoftmax(name="custom"), 1.0)],
    ids=["exp", "sum_of_squares", "softmax_large_logits"],
)
def test_custom_layers_run_their_real_policy_in_the_simulation(layer, scale):
    """Where the engine cannot round inside a layer's call, it runs the real policy: simulated == real, NaNs included."""
    model = _custom_model(layer, scale)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    data = EvalData.get((x, np.zeros(64, "int32")))
    g = build_graph(model, sample=x[:8])
    engine = SimEngine(model, g, formats=("mixed_float16",))
    assignment = {"d1": "mixed_float16", "custom": "mixed_float16"}
    engine.set_assignment(assignment)
    sim = _forward_all(engine, data)
    real = predict_batches(autoprec.apply_policy(model, g.resolve(assignment)), data)
    float32 = predict_batches(model, data)
    broken = ~np.isfinite(real) | (np.abs(real - float32) > 0.1)
    assert broken.mean() > 0.5, "the planted overflow must show in the real float16 model"
    np.testing.assert_array_equal(np.isfinite(sim), np.isfinite(real))
    finite = np.isfinite(real)
    assert np.max(np.abs(sim[finite] - real[finite]), initial=0.0) < 2e-2
    # The custom layer in float32 and the rest in float16: finite, as the real model is.
    engine.set_assignment({"d1": "mixed_float16", "custom": "float32"})
    assert np.isfinite(_forward_all(engine, data)).all()
    assert model.get_layer("custom").compute_dtype == "float32"  # the trace gave the layer its policy back


@keras.saving.register_keras_serializable("autoprec_tests")
class ResidualMLP(keras.layers.Layer):
    """A user's block: ``x + down(up(norm(x)))``, its weights all in its sublayers. With ``strict``, the sum is
    the backend's own ``x + y``, which TensorFlow refuses for a float16 and a float32 tensor."""

    def __init__(self, width=32, strict=False, **kwargs):
        super().__init__(**kwargs)
        self.width, self.strict = width, strict
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.up = keras.layers.Dense(2 * width, activation="relu", name="up")
        self.down = keras.layers.Dense(width, name="down")

    def build(self, shape):
        self.norm.build(shape)
        self.up.build(shape)
        self.down.build((*shape[:-1], 2 * self.width))

    def call(self, x):
        h = self.down(self.up(self.norm(x)))
        return x + h if self.strict else keras.ops.add(x, h)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "strict": self.strict}


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_sublayers_inside_a_block_are_decisions_the_engine_runs_as_the_real_model(target):
    """Issue 25: each sublayer of an author-written block is a node; any mix inside the block simulates what the
    model with those policies computes, and the block's sublayers get their own calls back after the trace."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, name="d1")(inputs)
    h = ResidualMLP(name="block")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32") * 4
    data = EvalData.get((x, np.zeros(64, "int32")))
    g = build_graph(model, sample=x[:8])
    assert g.inner == {"block": ("block/norm", "block/up", "block/down")}
    assert g["block"].role == "block" and not g["block"].eligible
    assert [g[p].role for p in g.inner["block"]] == ["weighted"] * 3
    assert g["block/up"].flops == pytest.approx(2 * 32 * 64 + 64, rel=0.05)  # its own matmul, not the block's
    engine = SimEngine(model, g, formats=(target,))
    inner = list(g.inner["block"])
    for chosen in ([], inner, ["block/up"], ["block/norm", "block/down"], ["d1", "block/up", "block/down"]):
        assignment = {p: target for p in chosen}
        names = g.resolve(assignment)
        # The block (its own ops) computes in float32 with every sublayer in float32, else in the 16-bit format.
        assert names["block"] == (target if set(inner) & set(chosen) else "float32")
        engine.set_assignment(assignment)
        sim = _forward_all(engine, data)
        tuned = autoprec.apply_policy(model, names)
        assert {p: getattr(tuned.get_layer("block"), p.split("/")[1]).compute_dtype for p in inner} == {
            p: "float32" if p not in chosen else keras.dtype_policies.get(target).compute_dtype for p in inner
        }
        real = predict_batches(tuned, data)
        assert np.max(np.abs(sim - real)) < 3e-2 * np.max(np.abs(real)), chosen
    assert all("call" not in layer.__dict__ for layer in model.get_layer("block")._flatten_layers())
    # A sublayer pinned by keep_float32 (or a block named there): the others in 16-bit run around it.
    pinned = build_graph(model, sample=x[:8], keep_float32=["block/up"])
    assert build_graph(model, sample=x[:8], keep_float32=["block"])["block/up"].pinned == "PINNED_USER"
    engine = SimEngine(model, pinned, formats=(target,))
    assignment = {"block/norm": target, "block/down": target}
    engine.set_assignment(assignment)
    real = predict_batches(autoprec.apply_policy(model, pinned.resolve(assignment)), data)
    assert np.max(np.abs(_forward_all(engine, data) - real)) < 3e-2 * np.max(np.abs(real))


def test_a_sublayer_whose_output_the_block_cannot_mix_stays_with_its_block():
    """A block whose author adds with TensorFlow's ``x + y`` fails on a float16 and a float32 tensor: autoprec tries
    each sublayer in float32 on the recorded call, and the one whose output meets that sum (``down``) is no
    decision of its own but computes with its block, so no emitted model mixes what the block cannot run."""
    inputs = keras.Input((16,))
    h = ResidualMLP(strict=True, name="block")(keras.layers.Dense(32, name="d1")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    data = EvalData.get((x, np.zeros(64, "int32")))
    g = build_graph(model, sample=x[:8])
    if keras.backend.backend() == "tensorflow":
        assert g.inner == {"block": ("block/norm", "block/up")} and "block/down" in g["block"].sublayers
    engine = SimEngine(model, g, formats=("mixed_float16",))
    for chosen in (["block/up"], ["block/norm"], ["d1", "block/norm", "block/up"]):
        names = g.resolve({p: "mixed_float16" for p in chosen})
        engine.set_assignment({p: "mixed_float16" for p in chosen})
        real = predict_batches(autoprec.apply_policy(model, names), data)  # runs: down computes with its block
        assert np.max(np.abs(_forward_all(engine, data) - real)) < 3e-2 * np.max(np.abs(real)), chosen


def test_quantized_sublayers_inside_a_block():
    """A block's Dense sublayers may take a quantized format (the block itself never does): the engine traces the
    block's quantized branch with its float part, and the mix matches the model apply_policy emits."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = ResidualMLP(name="block")(keras.layers.Dense(32, name="d1")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    data = EvalData.get((x, np.zeros(64, "int32")))
    g = build_graph(model, sample=x[:8])
    engine = SimEngine(model, g, formats=("mixed_bfloat16", "int8_from_mixed_bfloat16"))
    assignment = {"block/up": "int8_from_mixed_bfloat16", "block/norm": "mixed_bfloat16"}
    engine.set_assignment(assignment)
    real = predict_batches(autoprec.apply_policy(model, g.resolve(assignment)), data)
    assert np.max(np.abs(_forward_all(engine, data) - real)) < 5e-2 * np.max(np.abs(real))


def test_the_nonfinite_walk_names_the_sublayer_inside_a_block_before_the_block():
    """Verify's fall-back returns the sublayer where inf is born, not the whole block around it."""
    from autoprec.verify.real import nonfinite_origins

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = ResidualMLP(name="block")(keras.layers.Dense(32, name="d1")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    up = model.get_layer("block").up
    up.kernel.assign(up.kernel.numpy() * 1e6)  # its outputs pass 65504 in float16
    x = np.random.default_rng(0).normal(size=(16, 16)).astype("float32")
    g = build_graph(model, sample=x[:8])
    real = autoprec.apply_policy(model, g.resolve({p: "mixed_float16" for p in ("d1", *g.inner["block"])}))
    origins = nonfinite_origins(real, x)
    assert origins[:2] == ["block/up", "block"], origins
    assert nonfinite_origins(model, x) == []
    assert all("call" not in layer.__dict__ for layer in real.get_layer("block")._flatten_layers())


@pytest.mark.parametrize("engine_kind", ["sim", "real"])
def test_weighted_per_sample_values_come_from_the_traced_pass_on_every_backend(engine_kind):
    """Per-token weights (a padding mask) reach the engine batch by batch, the smaller last batch too (padded to
    the traced size under JAX): the mean of the values is Keras's weighted metric, on each backend."""
    rng = np.random.default_rng(0)
    n, steps, vocab = 70, 6, 9
    x = rng.integers(1, vocab, size=(n, steps)).astype("int32")
    mask = (np.arange(steps)[None] < rng.integers(2, steps + 1, size=n)[:, None]).astype("float32")
    y = (x * 7 % vocab).astype("int32")
    i = keras.Input((steps,), dtype="int32")
    out = keras.layers.Dense(vocab, activation="softmax")(keras.layers.Embedding(vocab, 8)(i))
    model = keras.Model(i, out)
    model.compile("adam", "sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
    model.fit(x, y, sample_weight=mask, epochs=5, verbose=0)
    session = open_session(model, (x, y, mask), target="mixed_float16", metric="accuracy", batch_size=32)
    engine = session.engine if engine_kind == "sim" else RealEngine(model, session.graph, formats=("mixed_float16",))
    engine.use_metric(session.metric)
    values = np.concatenate([engine.forward(x_, y_, w)[1] for x_, y_, w in session.data.weighted_batches()])
    keras_says = model.evaluate(x, y, sample_weight=mask, verbose=0, return_dict=True)["accuracy"]
    assert values.shape == (n,) and float(values.mean()) == pytest.approx(keras_says, rel=1e-5)
    assert session.baseline == pytest.approx(keras_says, rel=1e-5)
