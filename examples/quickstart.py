"""Quickstart: train a model, tune its precision, save the result, reload the policy, apply it, train on.

The whole Python API in the order you would use it, on the 8x8 digits that
ship with scikit-learn:

1. train a small Keras CNN in float32 (your model);
2. ``autoprec.tune`` it under a budget of half a point of accuracy, with
   ``target="auto"``: float16 on a CUDA GPU, bfloat16 on a CPU with fast
   bfloat16, as here;
3. ``result.save(DIR)``: policy.json, the tables and report.md/report.html;
4. reload the policy with ``autoprec.PrecisionPolicy.load`` (as a training
   job elsewhere would), put it on the model with ``autoprec.apply_policy``
   (a new model, same weights, per-layer policies, a LossScaleOptimizer
   when any layer computes in float16), and train on.

Run it with ``python examples/quickstart.py``. About 12 s on a laptop CPU;
``AUTOPREC_EXAMPLES_FAST=1`` trains less (about 10 s). It writes
``reports/examples/quickstart/``, or ``$AUTOPREC_EXAMPLES_OUT/quickstart/``
when that is set (fast mode without it writes to a temporary directory).
"""

from __future__ import annotations

import os
import sys

import keras
from _common import FAST, output_path  # examples/_common.py; imported first, it quiets TensorFlow

import autoprec
from autoprec.testing import digits_data


def build_model() -> keras.Model:
    """Your model: any Functional or Sequential Keras model, built and compiled in float32."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="fc"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ],
        name="quickstart_cnn",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> int:
    out = output_path("quickstart")
    (x_train, y_train), (x_val, y_val) = digits_data()
    model = build_model()
    model.fit(x_train, y_train, epochs=3 if FAST else 8, batch_size=32, verbose=0)

    result = autoprec.tune(model, (x_val, y_val), budget="0.5%", target="auto", n_trials=10 if FAST else 30, verbose=0)
    print(result.summary())  # repr (metric, baseline, drop, layers in 16-bit, trials), budget, the estimate's device
    result.save(out)

    policy = autoprec.PrecisionPolicy.load(os.path.join(out, "policy.json"))
    tuned = autoprec.apply_policy(model, policy)  # a new model; `model` keeps its float32 policies
    print("\nlayer      compute dtype")
    for layer in tuned.layers:
        print(f"{layer.name:<10} {layer.compute_dtype}")
    print(f"optimizer: {type(tuned.optimizer).__name__}")
    history = tuned.fit(x_train, y_train, epochs=1 if FAST else 3, batch_size=32, verbose=0).history
    accuracy = tuned.evaluate(x_val, y_val, verbose=0)[1]
    print(
        f"\nThe tuned model trained on: training loss per epoch {[round(v, 4) for v in history['loss']]}, "
        f"validation accuracy {accuracy:.4f} (float32 before: {result.baseline_metric:.4f})."
    )
    print(f"Report: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
