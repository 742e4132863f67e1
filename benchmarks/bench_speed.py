"""Training-step time on this CPU: float32 vs all-bfloat16 vs the tuned policy.

oneDNN runs bfloat16 fast on CPUs with AVX512_BF16/AMX, so ``mixed_bfloat16``
speed can be measured here. The three variants of each model are timed
interleaved, step by step, after warm-up; medians and ratios to float32.

    python benchmarks/bench_speed.py
"""

from __future__ import annotations

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


def run(steps: int = 30, batch: int = 256) -> tuple[str, list[dict]]:
    import keras

    import autoprec
    from autoprec import examples
    from autoprec.graph import build_graph

    rng = np.random.default_rng(0)
    planted, (xt, yt), val, _ = examples.planted_mlp(width=1024, epochs=4)
    cases = [("Dense-heavy MLP", dense_model(), (512,)), ("small CNN", cnn_model(), (32, 32, 3)),
             ("planted MLP (width 1024)", planted, None)]
    rows, records = [], []
    for name, model, shape in cases:
        if shape is None:
            data = val
            xb, yb = xt[:batch], yt[:batch]
        else:
            (xtr, ytr), data = _task(model, shape, 1024, rng)
            xb, yb = xtr[:batch], ytr[:batch]
        result = autoprec.tune(model, data, budget="0.5%", target="mixed_bfloat16", n_trials=30, verbose=0)
        graph = build_graph(model)
        all16 = graph.resolve({u.path: "mixed_bfloat16" for u in graph.units})
        all16_drop = autoprec.tune.__globals__["verify_eval"](model, graph, all16, _ctx(model, data))[1]["drop"]
        variants = {"float32": autoprec.apply_policy(model, {}), "all bfloat16": autoprec.apply_policy(model, all16),
                    "tuned": autoprec.apply_policy(model, result.policy)}
        fns = {k: (lambda m=m: m.train_on_batch(xb, yb)) for k, m in variants.items()}
        times = interleaved(fns, repeats=steps, warmup=3)
        f32, b16, tuned = (median(times[k]) for k in ("float32", "all bfloat16", "tuned"))
        meets = all16_drop <= result.allowed_drop + 1e-9
        rows.append([name, f"{f32 * 1e3:.1f}", f"{b16 / f32:.2f}x", f"{tuned / f32:.2f}x", f"{tuned / b16:.2f}x",
                     "yes" if meets else f"no (drop {all16_drop:.3f})",
                     f"{result.n_16bit}/{len(result.units)}" + (" (= all-bf16)" if dict(result.policy) == all16 else "")])
        same = dict(result.policy) == all16  # then "tuned / all-bf16" times one policy twice: timing noise
        records.append({"model": name, "all16_ratio": b16 / f32, "tuned_ratio": tuned / f32, "tuned_vs_all16": tuned / b16,
                        "all16_meets": meets, "same_policy": same})
        keras.backend.clear_session()
    text = table(["model", "float32 ms/step (median)", "all-bf16 / float32", "tuned / float32", "tuned / all-bf16",
                  "all-bf16 meets budget", "tuned 16-bit units"], rows)
    return text, records


def _ctx(model, data):
    from autoprec.sensitivity import prepare

    return prepare(model, data, target="mixed_bfloat16")


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
