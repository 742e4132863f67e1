"""The built-in example: the digits data, a small CNN, and ``make demo``.

The digits data ships inside scikit-learn (``pip install autoprec[examples]``),
so everything here runs offline.

>>> (x_train, y_train), (x_val, y_val) = digits_data()  # doctest: +SKIP
>>> x_train.shape[1:], int(y_val.max())                  # doctest: +SKIP
((8, 8, 1), 9)
"""

from __future__ import annotations

import os
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


def run_demo(output: str | os.PathLike = "reports/demo", *, n_trials: int = 40, epochs: int = 8, verbose: int = 1) -> Any:
    """Train the bundled digits CNN briefly, tune it for float16 with a training check, save everything."""
    from autoprec.testing import train
    from autoprec.tuner import tune

    train_data, val = digits_data()
    model = train(digits_model(), *train_data, epochs=epochs)
    if verbose:
        print(f"autoprec demo: digits CNN trained {epochs} epochs on {len(train_data[0])} images; tuning on {len(val[0])}.")
    result = tune(model, val, budget="0.5%", target="mixed_float16", n_trials=n_trials, seed=0,
                  verify="train", train_data=train_data, steps=60, verbose=verbose)
    written = result.save(output)
    if verbose:
        print(f"autoprec demo: wrote {len(written)} files under {output}/ (open report.html)")
    return result
