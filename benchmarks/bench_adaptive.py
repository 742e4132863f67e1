"""The cost of AdaptivePrecision: ``fit`` with the callback at its default ``check_every`` vs plain ``fit``.

Two copies of each model, with the same weights and the same bfloat16 policy
(fast on this CPU), train side by side: each round runs a short ``fit`` (50
steps) of each, alternating, after warm-up rounds that trace everything (the
callback's statistics pass included). The callback counts steps across
``fit`` calls, so it checks every ``check_every`` steps as in one long run.
The overhead is the median over rounds of the paired time ratio (pairs taken
moments apart, so a noisy machine hits both alike); the share of the
callback's time spent in its checks says where it goes (a check is one
float32 forward/backward pass on one batch; between checks the callback only
reads the loss Keras already logged).

    python benchmarks/bench_adaptive.py
"""

from __future__ import annotations

import functools
import sys

import numpy as np
from common import interleaved, median, table


def mlp(width: int = 512, depth: int = 4):
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((256,))
    x = inputs
    for k in range(depth):
        x = layers.Dense(width, activation="relu", name=f"fc{k}", dtype="mixed_bfloat16")(x)
    outputs = layers.Dense(10, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="mlp")


def cnn():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((24, 24, 3))
    x = inputs
    for k, filters in enumerate((16, 32)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{k}", dtype="mixed_bfloat16")(x)
        x = layers.MaxPooling2D(name=f"pool{k}", dtype="mixed_bfloat16")(x)
    x = layers.Flatten(dtype="mixed_bfloat16")(x)
    x = layers.Dense(128, activation="relu", name="fc", dtype="mixed_bfloat16")(x)
    outputs = layers.Dense(10, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="cnn")


def _pair(build):
    """Two compiled copies of one model, with the same weights."""
    a, b = build(), build()
    b.set_weights(a.get_weights())
    for m in (a, b):
        m.compile("adam", "sparse_categorical_crossentropy")
    return a, b


def _fit(model, callbacks, *, x, y, batch):
    return model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks, shuffle=False)


def run(steps: int = 50, batch: int = 64, repeats: int = 24) -> tuple[str, list[dict]]:
    import keras

    import autoprec
    from autoprec.adaptive import AdaptiveOptions

    check_every = AdaptiveOptions().check_every
    rng = np.random.default_rng(0)
    rows, records = [], []
    for name, build, shape in (("MLP 4x512 (bfloat16)", mlp, (256,)), ("small CNN (bfloat16)", cnn, (24, 24, 3))):
        x = rng.normal(size=(steps * batch, *shape)).astype("float32")
        y = rng.integers(0, 10, size=steps * batch)
        plain, watched = _pair(build)
        callback = autoprec.AdaptivePrecision(data=(x[: 4 * batch], y[: 4 * batch]), batch_size=batch, verbose=0)
        # partial binds this case's model and data now: the callables never see a later case's.
        fit = functools.partial(_fit, x=x, y=y, batch=batch)
        times = interleaved(
            {"plain": functools.partial(fit, plain, []), "callback": functools.partial(fit, watched, [callback])},
            repeats=repeats,
            warmup=2,
        )
        ratio = median([c / p for c, p in zip(times["callback"], times["plain"], strict=True)])
        checks = callback.checks
        scheduled = checks[checks["trigger"] == "scheduled"]
        timed = scheduled[scheduled["step"] > 2 * steps]  # the checks made while the rounds were timed
        share = float(timed["seconds"].sum()) / sum(times["callback"])
        step_ms = median(times["plain"]) / steps * 1e3
        rows.append(
            [
                name,
                f"{step_ms:.2f}",
                f"{median(times['callback']) / steps * 1e3:.2f}",
                f"{ratio:.3f}x",
                f"{float(timed['seconds'].median()) * 1e3:.1f}",
                len(timed),
                f"{share:.1%}",
                len(callback.history),
            ]
        )
        records.append(
            {
                "model": name,
                "plain_ms_per_step": step_ms,
                "ratio": ratio,
                "check_share": share,
                "check_ms": float(timed["seconds"].median()) * 1e3,
                "checks": len(timed),
                "check_every": check_every,
                "changes": len(callback.history),
            }
        )
        keras.backend.clear_session()
    text = table(
        [
            f"model ({repeats} rounds of {steps} steps of {batch})",
            "plain fit ms/step (median)",
            "with callback ms/step (median)",
            "callback / plain (median of pairs)",
            "ms per check",
            "checks timed",
            "checks' share of the callback run",
            "changes",
        ],
        rows,
    )
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
