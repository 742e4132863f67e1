"""What a user would pick instead, side by side: float32, Keras's global policy, TF's grappler AMP, autoprec.

oneDNN runs bfloat16 fast on CPUs with AVX512_BF16/AMX, so ``mixed_bfloat16``
speed can be measured here. For each model: Keras's global
``mixed_bfloat16`` (every layer, the softmax/outputs in float32 as the
guides say), TF's grappler rewrite (``auto_mixed_precision_onednn_bfloat16``),
and the autoprec-tuned policy under a 0.5-point budget. Training steps are
timed interleaved after warm-up; medians, as ratios to float32; accuracy
on the same evaluation data.

    python benchmarks/bench_speed.py
"""

from __future__ import annotations

import functools
import sys

import numpy as np
from common import interleaved, median, table


def dense_model():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    i = keras.Input((512,))
    x = i
    for k in range(4):
        x = layers.Dense(1024, activation="relu", name=f"fc{k}")(x)
    o = layers.Dense(10, activation="softmax", name="out")(x)
    m = keras.Model(i, o, name="dense_heavy")
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def cnn_model():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    i = keras.Input((32, 32, 3))
    x = i
    for k, f in enumerate((64, 128, 128)):
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{k}")(x)
        x = layers.MaxPooling2D(name=f"pool{k}")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu", name="fc")(x)
    o = layers.Dense(10, activation="softmax", name="out")(x)
    m = keras.Model(i, o, name="small_cnn")
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def _task(model, shape, n, rng):
    """A learnable synthetic task (labels from a fixed random projection); trains the model briefly.

    Returns (train, val). Step time does not depend on the weights, but the
    budget is only meaningful for a model that has learned something.
    """
    x = rng.normal(size=(2 * n, *shape)).astype("float32")
    # labels from a few features the model can learn in a few epochs: the
    # first 8 inputs of a vector, the per-channel means of an image
    features = x[:, :8] if x.ndim == 2 else x.mean(axis=tuple(range(1, x.ndim - 1)))
    y = (features @ rng.normal(size=(features.shape[1], 10))).argmax(-1)
    model.fit(x[:n], y[:n], epochs=6, batch_size=64, verbose=0)
    return (x[:n], y[:n]), (x[n:], y[n:])


def _grappler(model, x, y, x_eval, batch):
    """A copy of ``model`` whose train and predict functions went through TF's grappler auto mixed precision.

    The option is global and read when a traced function is first optimised,
    so it is on while this copy's functions are traced and run once, then off.
    """
    import tensorflow as tf

    import autoprec

    copy = autoprec.apply_policy(model, {})
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    try:
        copy.train_on_batch(x[:batch], y[:batch])
        predictions = copy.predict(x_eval, batch_size=batch, verbose=0)
    finally:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})
    return copy, predictions


def _with_amp(fn):
    """Run ``fn`` with grappler's oneDNN bfloat16 rewrite on, so a retrace in the loop is rewritten too."""
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    try:
        return fn()
    finally:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})


def _accuracy(predictions, y):
    return float(np.mean(np.argmax(predictions, -1) == y))


def run(steps: int = 30, batch: int = 256) -> tuple[str, list[dict]]:
    import keras

    import autoprec
    from autoprec import testing
    from autoprec.graph import build_graph

    rng = np.random.default_rng(0)
    weightless, (wxt, wyt), wval, _ = testing.planted_weightless_mlp(width=1024)
    planted, (pxt, pyt), pval, _ = testing.planted_mlp(width=1024, epochs=4)
    cases = [
        ("Dense-heavy MLP", dense_model(), (512,)),
        ("small CNN", cnn_model(), (32, 32, 3)),
        ("planted MLP (width 1024)", planted, ((pxt, pyt), pval)),
        ("weightless hazards (width 1024)", weightless, ((wxt, wyt), wval)),
    ]
    rows, records = [], []
    for name, model, shape in cases:
        (xtr, ytr), (xv, yv) = shape if isinstance(shape[0], tuple) else _task(model, shape, 1024, rng)
        xb, yb = xtr[:batch], ytr[:batch]
        result = autoprec.tune(model, (xv, yv), budget="0.5%", target="mixed_bfloat16", n_trials=30, verbose=0)
        graph = build_graph(model)
        everything = autoprec.apply_policy(model, {p: "mixed_bfloat16" for p in graph.all_paths()})
        variants = {"float32": autoprec.apply_policy(model, {}), "Keras global bf16": everything, "tuned": result.model}
        grappler, grappler_pred = _grappler(model, xtr, ytr, xv, batch)
        variants["grappler AMP"] = grappler
        accuracy = {
            k: _accuracy(m.predict(xv, batch_size=batch, verbose=0), yv)
            for k, m in variants.items()
            if k != "grappler AMP"
        }
        accuracy["grappler AMP"] = _accuracy(grappler_pred, yv)
        fns = {k: functools.partial(m.train_on_batch, xb, yb) for k, m in variants.items()}
        fns["grappler AMP"] = functools.partial(_with_amp, functools.partial(grappler.train_on_batch, xb, yb))
        times = interleaved(fns, repeats=steps, warmup=3)
        base = median(times["float32"])
        record = {
            "model": name,
            "float32_ms": base * 1e3,
            "allowed": result.allowed_drop,
            "n_16bit": f"{result.n_16bit}/{len(result.units)}",
        }
        for k in variants:
            drop = accuracy["float32"] - accuracy[k]
            record[k] = {
                "ratio": median(times[k]) / base,
                "accuracy": accuracy[k],
                "drop": drop,
                "meets": drop <= result.allowed_drop + 1e-9,
            }
        records.append(record)
        cells = [
            f"{record[k]['ratio']:.2f}x / {record[k]['accuracy']:.3f}{'' if record[k]['meets'] else ' (over)'}"
            for k in ("Keras global bf16", "grappler AMP", "tuned")
        ]
        rows.append([name, f"{base * 1e3:.1f}", f"{accuracy['float32']:.3f}", *cells, record["n_16bit"]])
        keras.backend.clear_session()
    text = table(
        [
            "model",
            "float32 ms/step",
            "float32 accuracy",
            "Keras global mixed_bfloat16: step/float32 / accuracy",
            "TF grappler AMP (onednn bf16)",
            "autoprec tuned (budget 0.5%)",
            "tuned 16-bit decisions",
        ],
        rows,
    )
    text += (
        "\n\nEach cell: training-step time as a ratio to float32, measured interleaved in this run, then accuracy "
        "on the evaluation data; '(over)' marks a drop beyond the 0.5-point budget."
    )
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
