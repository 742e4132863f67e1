"""A float16 run that breaks without ``autoprec.AdaptivePrecision`` and trains with it.

The model fine-tunes a small backbone under a frozen float32 head on targets
of order 10^6, with the relative squared error as its loss. A trainable gain
(``Gain``, a log-scale weight Adam raises by about its learning rate per step)
lets the backbone grow its activations until the head's outputs match: the
activations of the last hidden layer ``d2`` pass float16's largest value,
65504, after about 100 steps. The same run, from the same weights, goes three
ways:

- **float32**: the reference.
- **float16 without the callback**: at the first overflow the loss turns
  infinite; every later step overflows again, so the LossScaleOptimizer
  skips them all and halves its scale down to zero. Training is over.
- **float16 with the callback**: the first non-finite loss (or, earlier, a
  sampled activation past half of 65504) returns ``d2`` to float32; the train
  function is rebuilt and training goes on from the same weights and optimizer
  state, with the loss scale restored. The final loss lands within a few
  percent of the float32 run.

Run it with ``python examples/adaptive_training.py [OUTPUT_DIR]``; with an
output directory it also saves the callback's history and the report with
the timeline chart. About 10 s on a laptop CPU, half of it TensorFlow's
start-up and tracing; ``AUTOPREC_EXAMPLES_FAST=1`` trains half as long (about
8 s) and still shows the break and the fix.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from keras import ops

import autoprec

SCALE = 1e6  # the targets' scale: the backbone's activations must grow past 65504 to reach it
FAST = os.environ.get("AUTOPREC_EXAMPLES_FAST") == "1"


class Gain(keras.layers.Layer):
    """Multiplies its input by ``exp(s)``, with ``s`` trainable (starts at 0)."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(), initializer="zeros", name="log_gain")

    def call(self, x):
        return x * ops.cast(ops.exp(self.s), x.dtype)


def relative_mse(y_true, y_pred):
    """The squared error in units of the targets' scale."""
    return ops.mean(ops.square((y_true - y_pred) / SCALE))


def growing_model() -> keras.Model:
    """Backbone ``d1 -> gain -> d2`` under a frozen float32 head ``out`` (not compiled)."""
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="tanh", name="d1")(inputs)
    h = Gain(name="gain")(h)
    h = keras.layers.Dense(16, name="d2")(h)
    outputs = keras.layers.Dense(1, name="out", trainable=False)(h)
    return keras.Model(inputs, outputs, name="growing")


def growing_data(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of order ``SCALE``, with 10% noise (so the loss has a floor)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    signal = np.tanh(x @ rng.normal(size=(8, 1)) / 3)
    return x, (SCALE * (signal + 0.1 * rng.normal(size=(n, 1)))).astype("float32")


def train(weights: list, policy: str, data: tuple, *, epochs: int, callback=None) -> tuple[keras.Model, dict]:
    """Train a fresh copy from ``weights`` with every backbone layer in ``policy``; return the model and its history."""
    keras.utils.set_random_seed(0)
    model = growing_model()
    model.set_weights(weights)
    for name in ("d1", "gain", "d2"):
        model.get_layer(name).dtype_policy = policy
    optimizer = keras.optimizers.Adam(0.05)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=relative_mse)
    history = model.fit(
        *data, epochs=epochs, batch_size=32, shuffle=False, verbose=0, callbacks=[callback] if callback else []
    )
    return model, history.history


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    epochs = 10 if FAST else 20
    data = growing_data()
    keras.utils.set_random_seed(0)
    weights = growing_model().get_weights()
    callback = autoprec.AdaptivePrecision(data=data, verbose=1)  # starts from the model's current policies
    runs = {
        "float32": train(weights, "float32", data, epochs=epochs),
        "float16": train(weights, "mixed_float16", data, epochs=epochs),
        "float16 + AdaptivePrecision": train(weights, "mixed_float16", data, epochs=epochs, callback=callback),
    }
    print(f"\n{'run':<30} {'final loss':>12} {'loss scale':>12}")
    for name, (model, history) in runs.items():
        optimizer = model.optimizer
        scale = float(optimizer.dynamic_scale.numpy()) if hasattr(optimizer, "dynamic_scale") else None
        print(f"{name:<30} {history['loss'][-1]:>12.4g} {'-' if scale is None else f'{scale:.4g}':>12}")
    print("\nChanges made by the callback:")
    print(callback.history[["step", "layer", "direction", "reason", "why"]].to_string(index=False))
    print(f"\nFinal policy: {callback.policy}")
    if argv:
        paths = callback.save(argv[0])
        print(f"Saved {len(paths)} files to {argv[0]} (report.md, report.html, timeline.png among them).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
