"""Bundled examples: the scikit-learn digits data, a small model, and planted hazards.

Everything here runs offline: the digits data ships inside scikit-learn.
The *planted* models take a trained model and change weights so that the
float32 function stays the same while one region becomes fragile in 16-bit:

- :func:`plant_overflow` scales a ReLU layer's output up by a factor and the
  next layer's kernel down by it: in float16 the activations pass 65504
  and turn into inf.
- :func:`plant_offset` adds a large constant to a linear layer's output and
  subtracts it again in the next layer's bias: the signal rides on an offset
  whose spacing in bfloat16 (8-bit mantissa) is coarser than the signal.

>>> from autoprec import examples
>>> (x_train, y_train), (x_val, y_val) = examples.digits_data()
>>> x_train.shape[1:], int(y_val.max())
((8, 8, 1), 9)
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


def digits_model(*, seed: int = 0):
    """A small CNN for the digits: two convolutions, batch norm, two dense layers, softmax.

    >>> digits_model().count_params() > 10000
    True
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(32, 3, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(name="conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    x = layers.Dense(64, activation="relu", name="fc2")(x)
    x = layers.Dense(10, name="logits")(x)
    outputs = layers.Softmax(name="probs")(x)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def mlp(
    *, depth: int = 8, width: int = 64, inputs: int = 64, classes: int = 10, seed: int = 0, name: str = "mlp"
):
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


def plant_overflow(model: Any, producer: str, consumer: str, x: np.ndarray, *, peak: float = 1e6) -> float:
    """Scale ``producer`` (ReLU-activated) so its largest activation on ``x`` is ``peak``.

    ``consumer``'s kernel is divided by the same factor, so the float32
    function is unchanged. Returns the factor.
    """
    import keras

    layer, nxt = model.get_layer(producer), model.get_layer(consumer)
    probe = keras.Model(model.inputs, layer.output)
    current = float(np.max(np.abs(probe.predict(x, verbose=0))))
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
        raise ValueError(f"Expected a linear producer for plant_offset. Received {producer!r} with activation {activation!r}.")
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
