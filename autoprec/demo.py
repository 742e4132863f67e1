"""The built-in example: two digits models and ``make demo``.

The digits data (:func:`autoprec.testing.digits_data`) ships inside
scikit-learn (``pip install autoprec[examples]``), so everything here runs
offline.

:func:`digits_model` is a plain small CNN: every layer of it computes in
float16 within half a point of accuracy, so tuning it is a one-trial search.
The demo (:func:`run_demo`) tunes :func:`detector_model` instead, where the
answer is not trivial. It reads the digits as a detector delivers them, raw
counts up to 200,000 per pixel, and two regions of it are fragile in float16
for reasons practitioners meet in real models:

- ``conv1`` reads the raw counts unnormalised (batch norm comes after it, as
  in many first layers): its outputs reach about 1.2e5, past float16's
  largest value, 65504, so it overflows to inf, and so would the inputs of
  ``conv1_bn`` behind it.
- An attention head scores each of the 16 patches (``attn_logits``) and
  weighs them with a softmax (``attn``). The logits ride on a common offset
  of 4096: their bias starts there. A softmax ignores an offset shared by
  all its inputs, so float32 trains as it would without it; near 4096
  float16 resolves only steps of 4, and logit differences smaller than that
  are lost. It stands in for the large attention logits of real transformers.

Everything else may compute in float16, and the search has to find that out.

>>> (x_train, y_train), (x_val, y_val) = digits_data()  # doctest: +SKIP
>>> x_train.shape[1:], int(y_val.max())                  # doctest: +SKIP
((8, 8, 1), 9)
"""

from __future__ import annotations

import os
from typing import Any

from autoprec.testing import digits_data, train

COUNTS = 200_000.0  # the detector's count for the brightest pixel
ATTENTION_OFFSET = 4096.0  # the attention logits' common offset; float16 spacing there is 4
PATCHES = 16  # 4x4 patches after the pooling, each scored by the attention head


def detector_data(*, seed: int = 0):
    """:func:`digits_data` as raw detector counts: each pixel in [0, ``COUNTS``]."""
    (x_train, y_train), (x_val, y_val) = digits_data(seed=seed)
    return (x_train * COUNTS, y_train), (x_val * COUNTS, y_val)


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


def detector_model(*, seed: int = 0):
    """The demo's CNN on raw detector counts, with an attention head over 16 patches (see the module docstring).

    >>> [layer.name for layer in detector_model().layers][6:10]
    ['tokens', 'attn_logits', 'attn', 'gate']
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="counts")
    x = layers.Conv2D(32, 3, padding="same", name="conv1")(inputs)  # on raw counts: outputs past 65504
    x = layers.ReLU(name="conv1_relu")(layers.BatchNormalization(name="conv1_bn")(x))
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    tokens = layers.Reshape((PATCHES, 64), name="tokens")(layers.MaxPooling2D(name="pool")(x))
    logits = layers.Dense(1, bias_initializer=keras.initializers.Constant(ATTENTION_OFFSET), name="attn_logits")(tokens)
    weights = layers.Softmax(axis=1, name="attn")(logits)
    # The weights average 1/16: scaling by 16 keeps the gated features at the scale fc1 would see without the gate.
    x = layers.Rescaling(float(PATCHES), name="gate_scale")(layers.Multiply(name="gate")([tokens, weights]))
    x = layers.Dense(128, activation="relu", name="fc1")(layers.Flatten(name="flatten")(x))
    x = layers.Dense(10, name="logits")(layers.Dropout(0.2, name="dropout")(x))
    outputs = layers.Softmax(name="probs")(x)
    model = keras.Model(inputs, outputs, name="detector_digits")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run_demo(
    output: str | os.PathLike = "reports/demo", *, n_trials: int = 40, epochs: int = 8, verbose: int = 1
) -> Any:
    """Train :func:`detector_model` briefly, tune it for float16 with a training check, save everything.

    Takes about 20 s on a laptop CPU. Returns the :class:`autoprec.TuneResult`.
    """
    from autoprec.tuner import tune

    train_data, val = detector_data()
    model = train(detector_model(), *train_data, epochs=epochs)
    say = print if verbose else (lambda *_: None)
    say(
        f"autoprec demo: a digits CNN on raw detector counts (up to {COUNTS:,.0f} per pixel) with an attention head, "
        f"trained {epochs} epochs on {len(train_data[0])} images; tuning for mixed_float16 on {len(val[0])}.\n"
        "  Fragile in float16 by construction: conv1 (raw counts in, outputs past 65504) and the attention logits, "
        f"which ride on an offset of {ATTENTION_OFFSET:g} where float16 resolves only steps of 4."
    )
    result = tune(
        model,
        val,
        budget="0.5%",
        target="mixed_float16",
        n_trials=n_trials,
        seed=0,
        verify="train",
        train_data=train_data,
        steps=60,
        verbose=verbose,
    )
    written = result.save(output)
    say(
        f"autoprec demo: the speed-up {result.speedup_estimate:.2f}x is the cost model's estimate for a "
        f"{result.device.upper()} with fast float16, not a measurement on this machine (on a CPU float16 is slower: "
        "see examples/precision_table.py)."
    )
    say(f"autoprec demo: wrote {len(written)} files under {output}/ (open report.html)")
    return result
