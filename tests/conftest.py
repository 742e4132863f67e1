"""Shared fixtures: seed everything, restore the global dtype policy, clear the Keras session."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("KERAS_BACKEND") == "jax":
    # XLA keeps a bfloat16 op's result in float32 inside a fusion unless told not to ("excess
    # precision"): a real bfloat16 model on JAX is then more precise than its policy says. The tests
    # hold the engine to the policy's own arithmetic, which XLA computes with this flag (measured:
    # simulated and real drops then agree exactly on the planted model). Set before JAX starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import keras
import numpy as np
import pytest

# Scripts the tests run as subprocesses, not test modules: --doctest-modules must not import them.
collect_ignore = ["tune_worker.py"]

# The planted MLP's search under float16 has little to do: the profile rules its overflowing layers out of float16,
# and the first trial meets the budget. With this three-way choice the search weighs bfloat16 against float16 for
# them and their neighbours: the tests of resuming, sharing and killing a study (and tune_worker.py) use it.
THREE_WAY = ("float32", "mixed_bfloat16", "mixed_float16")


# Where autoprec lets this machine's kind of CPU decide: the local device profile, which target="auto" (tune's
# default) and device="this" charge. (target="auto" itself picks bfloat16 on any CPU.) A test that reaches it
# must be marked cpu_kind; it then runs twice, as on this kind of CPU and as on the other (AUTOPREC_CPU_FAST_BF16
# forces the profile), so both kinds are covered whichever machine runs it. A slow one runs on this kind only.
CPU_KIND_READERS = frozenset({"local_device"})


def pytest_generate_tests(metafunc):
    definition = metafunc.definition
    if definition.get_closest_marker("cpu_kind") is not None and definition.get_closest_marker("slow") is None:
        metafunc.fixturenames.append("_cpu")
        metafunc.parametrize("_cpu", ["this_cpu", "other_cpu"])


@pytest.fixture(autouse=True)
def _cpu_kind(request, monkeypatch):
    import sys

    from autoprec import backends

    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("_cpu") == "other_cpu":
        monkeypatch.setenv(backends.FAST_BF16_ENV, "0" if backends.cpu_has_fast_bf16() else "1")
    real, consulted, outer = backends.cpu_has_fast_bf16, [], os.environ.get(backends.FAST_BF16_ENV)

    def recording() -> bool:
        # A test that sets AUTOPREC_CPU_FAST_BF16 itself has chosen the kind: running it again would change nothing.
        chosen = os.environ.get(backends.FAST_BF16_ENV) != outer
        if not chosen and sys._getframe(1).f_code.co_name in CPU_KIND_READERS:
            consulted.append(sys._getframe(1).f_code.co_name)
        return real()

    monkeypatch.setattr(backends, "cpu_has_fast_bf16", recording)
    yield
    if consulted and request.node.get_closest_marker("cpu_kind") is None:
        pytest.fail(
            f"{request.node.nodeid} let the CPU's kind decide (the local device profile: target='auto' or "
            "device='this') but is not marked @pytest.mark.cpu_kind; mark it, so that it also runs as on the "
            "other kind of CPU"
        )


@pytest.fixture(autouse=True)
def _clean_keras_state():
    policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy(policy)
    keras.backend.clear_session()


def functional_model():
    inputs = keras.Input((12,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="h1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dense(16, activation="relu", name="h2")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(h)
    model = keras.Model(inputs, out, name="func")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def sequential_model():
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="relu", name="s1"),
            keras.layers.Dense(16, activation="relu", name="s2"),
            keras.layers.Dense(3, activation="softmax", name="s_out"),
        ],
        name="seq",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def nested_model():
    inner_in = keras.Input((16,), name="inner_x")
    inner_h = keras.layers.Dense(16, activation="relu", name="inner_dense")(inner_in)
    inner_h = keras.layers.BatchNormalization(name="inner_bn")(inner_h)
    inner = keras.Model(inner_in, inner_h, name="inner")
    inputs = keras.Input((12,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="outer_dense")(inputs)
    h = inner(h)
    h = keras.layers.Add(name="skip")([h, keras.layers.Dense(16, name="proj")(inputs)])
    out = keras.layers.Dense(3, activation="softmax", name="outer_out")(h)
    model = keras.Model(inputs, out, name="nested")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@keras.saving.register_keras_serializable(package="autoprec_tests")
class SubclassedModel(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(16, activation="relu", name="sub_d1")
        self.d2 = keras.layers.Dense(16, activation="relu", name="sub_d2")
        self.head = keras.layers.Dense(3, activation="softmax", name="sub_out")

    def call(self, x, training=False):
        return self.head(self.d2(self.d1(x)))


def subclassed_model():
    model = SubclassedModel(name="subclassed")
    model(np.zeros((1, 12), "float32"))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def small_data(n=128, features=12, classes=3, seed=0):
    w = np.random.default_rng(seed + 1000).normal(size=(features, classes))  # the task does not depend on n
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def trained(model, n=96, epochs=30):
    x, y = small_data(n)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def padded_sequences(n=192, steps=12, vocab=20, seed=0):
    """Token ids padded with 0 after a random length, per-token labels, and the padding mask (float32).

    A real token's label is a function of it (learnable); a padding token's is noise, as nothing should learn it.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, steps + 1, size=n)
    mask = (np.arange(steps)[None] < lengths[:, None]).astype("float32")
    x = (rng.integers(1, vocab, size=(n, steps)) * mask).astype("int32")
    y = np.where(mask > 0, (3 * x + 1) % vocab, rng.integers(0, vocab, size=(n, steps))).astype("int32")
    return x, y, mask


def token_model(*, mask_zero, vocab=20, seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((None,), dtype="int32")
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Embedding(vocab, 16, mask_zero=mask_zero)(i))
    model = keras.Model(i, keras.layers.Dense(vocab, activation="softmax")(h))
    weighted = ["accuracy", "sparse_categorical_crossentropy"]  # Keras's weighted means (its loss divides by the size)
    model.compile("adam", "sparse_categorical_crossentropy", weighted_metrics=weighted)
    return model


MODEL_BUILDERS = {
    "functional": functional_model,
    "sequential": sequential_model,
    "nested": nested_model,
    "subclassed": subclassed_model,
}


@pytest.fixture(scope="session")
def planted():
    """The bundled planted MLP (trained once per session): (model, train, val, fragile)."""
    from autoprec import testing

    return testing.planted_mlp()


@pytest.fixture(scope="session")
def digits_cnn():
    """The bundled digits CNN, trained briefly once per session: (model, train, val)."""
    from autoprec import demo, testing

    train, val = testing.digits_data()
    model = testing.train(demo.digits_model(), *train, epochs=4)
    return model, train, val


@pytest.fixture(scope="session")
def planted_weightless():
    """The planted MLP whose hazards sit in weightless layers: (model, train, val, fragile)."""
    from autoprec import testing

    return testing.planted_weightless_mlp()


def simulate(session, assignment):
    """The simulated outputs of ``assignment`` over all the session's data (NumPy)."""
    session.engine.set_assignment(assignment)
    outs = [session.engine.forward(x, y)[0] for x, y in session.data.batches()]
    return keras.tree.map_structure(lambda *p: np.concatenate(p), *outs)


def kernel_share_16bit(model, exempt=()):
    """Share of Dense/EinsumDense kernel parameters whose layer really computes in 16-bit (``exempt`` paths left out)."""
    total = low = 0
    for layer in model._flatten_layers(include_self=False):
        if type(layer).__name__ in ("Dense", "EinsumDense") and getattr(layer, "kernel", None) is not None:
            if any(layer.path.startswith(p) for p in exempt):
                continue
            n = int(np.prod(layer.kernel.shape))
            total += n
            low += n * (layer.compute_dtype in ("float16", "bfloat16"))
    return low / total


def layer_dtypes(model):
    """``[(class, compute_dtype)]`` of every layer, sublayers included: what a reload must give back."""
    return [(type(layer).__name__, layer.compute_dtype) for layer in model._flatten_layers(include_self=False)]


def check_tuned(model, result, x, y, tmp_path, *, metric="accuracy", budget=0.005, exempt=()):
    """What a user relies on from a tuned model: the real drop, the 16-bit share, the speed-up, the reload, the report."""
    real = result.model.evaluate(x, y, verbose=0, return_dict=True)
    baseline = model.evaluate(x, y, verbose=0, return_dict=True)
    assert baseline[metric] - real[metric] <= budget + 1e-6
    assert result.drop <= result.allowed_drop + 1e-9
    share = kernel_share_16bit(result.model, exempt)
    assert share >= 0.9, f"only {share:.0%} of the matmul kernels compute in 16-bit"
    assert result.speedup_estimate > 1.2
    path = os.fspath(tmp_path / "tuned.keras")
    result.model.save(path)
    reloaded = keras.saving.load_model(path)
    assert layer_dtypes(reloaded) == layer_dtypes(result.model)
    np.testing.assert_array_equal(
        np.asarray(reloaded.predict(x, verbose=0), "float32"), np.asarray(result.model.predict(x, verbose=0), "float32")
    )
    result.save(tmp_path / "report")
    return (tmp_path / "report" / "report.md").read_text()
