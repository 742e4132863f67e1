"""Quantized candidates: weight size, accuracy and inference time, side by side in one run.

On the digits data, a wide MLP and a small transformer (rows of the image as
tokens) are trained in float32, then compared as four variants: float32,
Keras's own ``model.quantize("int8")`` (every layer Keras can quantize), and
the autoprec-tuned policies for size with ``int8`` and with ``int8`` + ``int4``
(budget 1%). Inference time is the median ``predict_on_batch`` time of a
batch of 256, interleaved across the variants.

    python benchmarks/bench_quantize.py
"""

from __future__ import annotations

import functools
import sys

import numpy as np
from common import interleaved, median, table


def _models():
    import keras

    from autoprec import testing

    (xt, yt), (xv, yv) = testing.digits_data(flat=True)
    keras.utils.set_random_seed(0)
    mlp = testing.train(testing.mlp(depth=3, width=512), xt, yt, epochs=12)
    L = keras.layers
    i = keras.Input((8, 8))
    h = L.Dense(64, name="embed")(i)
    h = L.LayerNormalization(name="ln1")(L.Add(name="res1")([h, L.MultiHeadAttention(4, 16, name="mha")(h, h)]))
    f = L.Dense(256, activation="relu", name="ffn1")(h)
    h = L.LayerNormalization(name="ln2")(L.Add(name="res2")([h, L.Dense(64, name="ffn2")(f)]))
    out = L.Dense(10, activation="softmax", name="out")(L.Dense(128, activation="relu", name="head")(L.Flatten()(h)))
    transformer = keras.Model(i, out, name="transformer")
    transformer.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    transformer.fit(xt.reshape(-1, 8, 8), yt, epochs=10, batch_size=64, verbose=0)
    return [("digits MLP 3x512", mlp, (xv, yv)), ("digits transformer", transformer, (xv.reshape(-1, 8, 8), yv))]


def _weight_bytes(model) -> float:
    return float(sum(np.asarray(v.value).nbytes for v in model.weights))


def run() -> tuple[str, list[dict]]:
    import keras

    import autoprec

    rows, records = [], []
    for name, model, (x, y) in _models():
        variants = {"float32": model}
        everything = keras.models.clone_model(model)
        everything.set_weights(model.get_weights())
        everything.quantize("int8")
        variants["all int8 (model.quantize)"] = everything
        for label, candidates in (
            ("tuned int8", ("float32", "mixed_bfloat16", "int8")),
            ("tuned int8+int4", ("float32", "mixed_bfloat16", "int8", "int4")),
        ):
            result = autoprec.tune(
                model, (x, y), budget="1%", target="mixed_bfloat16", candidates=candidates, n_trials=30, verbose=0
            )
            variants[label] = result.model
        batch = x[:256]
        times = interleaved({k: functools.partial(m.predict_on_batch, batch) for k, m in variants.items()}, repeats=20)
        base_t, base_bytes = median(times["float32"]), _weight_bytes(model)
        for label, m in variants.items():
            accuracy = float(np.mean(np.argmax(m.predict(x, verbose=0), -1) == y))
            rows.append(
                [
                    name,
                    label,
                    _weight_bytes(m) / 1e6,
                    base_bytes / _weight_bytes(m),
                    accuracy,
                    median(times[label]) * 1e3,
                    median(times[label]) / base_t,
                ]
            )
            records.append(
                {
                    "model": name,
                    "variant": label,
                    "size_ratio": base_bytes / _weight_bytes(m),
                    "accuracy": accuracy,
                    "time_ratio": median(times[label]) / base_t,
                }
            )
    text = table(
        [
            "model",
            "variant",
            "weights MB",
            "smaller than float32 (x)",
            "accuracy",
            "predict ms (batch 256)",
            "time / float32",
        ],
        rows,
    )
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
