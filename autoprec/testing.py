"""Models with planted 16-bit hazards, for tests, benchmarks and examples (``autoprec.testing``).

Everything here runs offline: the digits data (:func:`digits_data`) ships
inside scikit-learn (``pip install autoprec[examples]``). The *planted* models take a trained
model and change weights so that the float32 function stays the same while
one region becomes fragile in 16-bit:

- :func:`plant_overflow` scales a ReLU layer's output up by a factor and the
  next layer's kernel down by it: in float16 the activations pass 65504
  and turn into inf.
- :func:`plant_offset` adds a large constant to a linear layer's output and
  subtracts it again in the next layer's bias: the signal rides on an offset
  whose spacing in bfloat16 (8-bit mantissa) is coarser than the signal.

- :func:`planted_weightless_mlp` puts every hazard in a weightless layer:
  a ``Rescaling`` by a large factor, an ``exponential`` activation, an
  offset riding on an ``Add`` of a constant branch, and a softmax over
  logits shifted by a large constant.

>>> from autoprec import testing
>>> [f.__name__ for f in (testing.planted_mlp, testing.planted_weightless_mlp)]
['planted_mlp', 'planted_weightless_mlp']
"""

from __future__ import annotations

from typing import Any

import numpy as np


def digits_data(*, seed: int = 0, val_fraction: float = 0.3, flat: bool = False):
    """The 1,797 8x8 digits images, scaled to [0, 1], split into train and validation.

    Returns ``((x_train, y_train), (x_val, y_val))``; ``x`` is ``(n, 8, 8, 1)``,
    or ``(n, 64)`` with ``flat=True``; ``y`` holds class ids 0-9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")
    x = x.reshape(len(x), 64) if flat else x[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def mlp(*, depth: int = 8, width: int = 64, inputs: int = 64, classes: int = 10, seed: int = 0, name: str = "mlp"):
    """A plain stack of ReLU Dense layers ``d1..dN`` and a softmax head ``out``.

    >>> len(mlp(depth=3).layers)
    5
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    x_in = keras.Input((inputs,), name="x")
    x = x_in
    for i in range(1, depth + 1):
        x = layers.Dense(width, activation="relu", name=f"d{i}")(x)
    out = layers.Dense(classes, activation="softmax", name="out")(x)
    model = keras.Model(x_in, out, name=name)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train(model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int = 10, batch_size: int = 64, seed: int = 0) -> Any:
    """Train briefly with a fixed seed and return the model."""
    import keras

    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    return model


def plant_overflow(
    model: Any, producer: str, consumer: str, x: np.ndarray, *, peak: float = 1e6, quantile: float = 1.0
) -> float:
    """Scale ``producer`` (ReLU-activated) so its largest activation on ``x`` is ``peak``.

    With ``quantile`` below 1, the ``quantile`` of the samples' largest
    activations is scaled to ``peak`` instead: with a ``peak`` just over
    float16's 65504, only about ``1 - quantile`` of the samples overflow.
    ``consumer``'s kernel is divided by the same factor, so the float32
    function is unchanged. Returns the factor.
    """
    import keras

    layer, nxt = model.get_layer(producer), model.get_layer(consumer)
    probe = keras.Model(model.inputs, layer.output)
    largest = np.abs(probe.predict(x, verbose=0)).reshape(len(x), -1).max(axis=1)
    current = float(np.quantile(largest, quantile))
    factor = peak / max(current, 1e-12)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * factor, bias * factor])
    weights = nxt.get_weights()
    nxt.set_weights([weights[0] / factor, *weights[1:]])
    return factor


def plant_offset(model: Any, producer: str, consumer: str, *, offset: float = 512.0) -> None:
    """Add ``offset`` to a linear ``producer``'s outputs and remove it in ``consumer``'s bias.

    Both must be Dense layers and ``producer`` must have no activation: an
    offset in front of a nonlinearity would change the float32 function.
    """
    layer, nxt = model.get_layer(producer), model.get_layer(consumer)
    activation = getattr(layer.activation, "__name__", "")
    if activation != "linear":
        raise ValueError(
            f"Expected a linear producer for plant_offset. Received {producer!r} with activation {activation!r}."
        )
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, bias + offset])
    k2, b2 = nxt.get_weights()
    nxt.set_weights([k2, b2 - offset * k2.sum(axis=0)])


def planted_mlp(*, seed: int = 0, depth: int = 8, width: int = 64, epochs: int = 15):
    """A trained digits MLP with an overflow region (d3->d4) and a bfloat16 offset region (d6->d7).

    Returns ``(model, (x_train, y_train), (x_val, y_val), fragile)`` where
    ``fragile`` maps each format to the layers planted fragile in it.
    """
    import keras
    from keras import layers

    (x_train, y_train), (x_val, y_val) = digits_data(seed=seed, flat=True)
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((64,), name="x")
    x = x_in
    for i in range(1, depth + 1):
        # d6 is linear: an offset on a ReLU layer's output would be clipped.
        x = layers.Dense(width, activation=None if i == 6 else "relu", name=f"d{i}")(x)
    out = layers.Dense(10, activation="softmax", name="out")(x)
    model = keras.Model(x_in, out, name="planted_mlp")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train(model, x_train, y_train, epochs=epochs, seed=seed)
    plant_overflow(model, "d3", "d4", x_train)
    plant_offset(model, "d6", "d7", offset=2048.0)
    fragile = {"mixed_float16": ["d3", "d4", "d6", "d7"], "mixed_bfloat16": ["d6", "d7"]}
    return model, (x_train, y_train), (x_val, y_val), fragile


def planted_weightless_mlp(*, seed: int = 0, width: int = 128, epochs: int = 15):
    """A trained digits MLP whose 16-bit hazards all sit in weightless layers.

    Trained in float32 with every planted constant neutral (scale 1, offset
    0), then planted so that the float32 function stays the same:

    - ``up``/``down``: ``Rescaling`` by 1e5 and back: float16 overflows at ``up``;
    - ``exp_in``/``exp``/``exp_out``: ``exp(t + 11) * e^-11 - 1`` around an
      ``exponential`` activation: float16 overflows at ``exp``, and bfloat16's
      8-bit mantissa blurs ``t + 11``;
    - ``const``/``add``/``unshift``: a constant branch adds 16384 and a
      ``Rescaling`` takes it away: the signal rides on an offset whose spacing
      in either format (16 in float16, 128 in bfloat16) is coarser than the signal;
    - ``shift``/``attn``: logits shifted by 3e4 into a ``Softmax`` in the
      middle of the network (softmax ignores the shift in float32), scaled
      by its 32 inputs after it (``attn_scale``).

    Returns ``(model, (x_train, y_train), (x_val, y_val), fragile)``;
    ``fragile`` maps each format to the weightless layers that must stay
    float32 in it.
    """
    import keras
    from keras import layers

    (x_train, y_train), (x_val, y_val) = digits_data(seed=seed, flat=True)
    keras.utils.set_random_seed(seed)

    def dense(name: str, act: str | None = None, units: int = width) -> Any:
        return layers.Dense(units, activation=act, name=name)

    x_in = keras.Input((64,), name="x")
    h = dense("d1", "relu")(x_in)
    h = layers.Rescaling(1.0, name="up")(dense("d2")(h))
    h = layers.ReLU(name="relu2")(layers.Rescaling(1.0, name="down")(h))
    h = layers.Rescaling(1.0, offset=0.0, name="exp_in")(dense("d3", "tanh")(h))
    # exp(t) - 1 stays centred on zero, which a wide next layer needs to train
    h = layers.Rescaling(1.0, offset=-1.0, name="exp_out")(layers.Activation("exponential", name="exp")(h))
    h = dense("d5")(dense("d4", "relu")(h))
    const = layers.Dense(width, kernel_initializer="zeros", bias_initializer="zeros", trainable=False, name="const")(h)
    h = layers.Rescaling(1.0, offset=0.0, name="unshift")(layers.Add(name="add")([h, const]))
    h = layers.Rescaling(1.0, offset=0.0, name="shift")(dense("d7", units=32)(dense("d6", "relu")(h)))
    # probabilities times their count: about 1 each, not 1/32, so the layers after it still learn
    h = dense("d8", "relu")(layers.Rescaling(32.0, name="attn_scale")(layers.Softmax(name="attn")(h)))
    out = layers.Dense(10, activation="softmax", name="out")(h)
    model = keras.Model(x_in, out, name="planted_weightless")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train(model, x_train, y_train, epochs=epochs, seed=seed)
    _plant_weightless(model)
    fragile = {
        "mixed_float16": ["up", "down", "exp", "exp_out", "add", "unshift", "shift", "attn"],
        "mixed_bfloat16": ["add", "unshift", "shift", "attn"],
    }
    return model, (x_train, y_train), (x_val, y_val), fragile


def _plant_weightless(model: Any) -> None:
    """Set the planted constants; each pair cancels in float32."""
    big, offset, shift = 1e5, 11.0, 3e4
    model.get_layer("up").scale, model.get_layer("down").scale = big, 1.0 / big
    model.get_layer("exp_in").offset, model.get_layer("exp_out").scale = offset, float(np.exp(-offset))
    const = model.get_layer("const")
    const.bias.assign(np.full(const.bias.shape, 16384.0, "float32"))
    model.get_layer("unshift").offset = -16384.0
    model.get_layer("shift").offset = shift
    # The constants are Python floats read when a function is traced: drop the stale traces.
    model.train_function = model.test_function = model.predict_function = None


def mild_weightless_mlp(
    *,
    seed: int = 0,
    width: int = 64,
    blocks: int = 4,
    offset: float = 64.0,
    n: int = 6000,
    epochs: int = 12,
    n_val: int | None = None,
):
    """A trained MLP for a synthetic 10-class task with mild 16-bit hazards in weightless blocks.

    Six Dense layers ``d1..d6`` (``d6`` the softmax head); between ``d1..d5``,
    ``blocks`` weightless blocks ``b{i}_up`` / ``b{i}_relu`` / ``b{i}_down``
    that add ``offset``, apply a ReLU and take the offset away again: the
    identity in float32 on the (bounded, tanh) signal, while in bfloat16 (8-bit
    mantissa) or float16 the signal rides on the offset's coarse spacing and
    loses a little accuracy, with no overflow and no flush.

    Returns ``(model, (x_train, y_train), (x_val, y_val), fragile)`` with
    ``fragile`` the weightless layers that round the offset signal; ``n``
    training and ``n_val`` (default ``n``) validation samples from one
    distribution, so a large ``n_val`` gives splits to tune on and a large
    held-out part to check the budget on.
    """
    import keras
    from keras import layers

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 32)) * 0.5  # overlapping classes: many borderline samples
    total = n + (n if n_val is None else int(n_val))
    labels = rng.integers(0, 10, size=total)
    x = (centres[labels] + rng.normal(size=(total, 32))).astype("float32")
    y = labels.astype("int32")
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((32,), name="x")
    h = layers.Dense(width, activation="tanh", name="d1")(x_in)
    fragile = []
    for i in range(1, 6):
        if i <= blocks:
            h = layers.Rescaling(1.0, offset=offset, name=f"b{i}_up")(h)
            h = layers.ReLU(name=f"b{i}_relu")(h)
            h = layers.Rescaling(1.0, offset=-offset, name=f"b{i}_down")(h)
            fragile += [f"b{i}_up", f"b{i}_relu", f"b{i}_down"]
        h = layers.Dense(width if i < 5 else 10, activation="tanh" if i < 5 else "softmax", name=f"d{i + 1}")(h)
    model = keras.Model(x_in, h, name="mild_weightless")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train(model, x[:n], y[:n], epochs=epochs, seed=seed)
    return model, (x[:n], y[:n]), (x[n:], y[n:]), fragile
