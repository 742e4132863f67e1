"""Seconds per evaluated assignment: the simulated engine against rebuilding with real policies.

Both evaluate the same random assignments of the same model over the same
data (512 samples), interleaved in one run, every trial a full pass (no
cache, no early stop). The engine's trials are timed in runs of eight back
to back, as a search makes them, so that the garbage and the fresh traces a
rebuild leaves behind land on the rebuild's time, not on one engine trial
timed after it; its figure is a run's time over eight. "rebuild" is what a search without the engine does
per trial: ``apply_policy`` (clone with per-layer policies, copy the
weights, compile) and a predict pass, which traces the new model.

    python benchmarks/bench_trial_cost.py
"""

from __future__ import annotations

import sys

import numpy as np
from common import interleaved, median, table

TARGET = "mixed_bfloat16"
RUN = 8  # engine trials timed back to back, as a search runs them; a rebuild is timed alone


def model_of(n_layers: int):
    """A residual MLP with about ``n_layers`` layers (Dense, LayerNorm, Add)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    x_in = keras.Input((64,))
    x = layers.Dense(128, activation="relu", name="stem")(x_in)
    blocks = max(1, (n_layers - 2) // 3)
    for i in range(blocks):
        h = layers.Dense(128, activation="relu", name=f"b{i}_dense")(x)
        h = layers.LayerNormalization(name=f"b{i}_ln")(h)
        x = layers.Add(name=f"b{i}_add")([x, h])
    out = layers.Dense(10, activation="softmax", name="head")(x)
    model = keras.Model(x_in, out)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _trials(model, session, assignments) -> dict:
    """One trial each way: the engine's pass, and a rebuilt model's prediction."""
    import autoprec
    from autoprec.verify.real import predict_batches

    it = {"engine": iter(assignments), "rebuild": iter(assignments)}

    def engine():
        for _ in range(RUN):
            session._cache.clear()  # a trial is a fresh pass, never a cache hit
            session.evaluate(next(it["engine"]))

    def rebuild():
        tuned = autoprec.apply_policy(model, session.graph.resolve(next(it["rebuild"])), graph=session.graph)
        session.score_outputs(predict_batches(tuned, session.data))

    return {"engine": engine, "rebuild": rebuild}


def run(sizes=(10, 50, 150), repeats: int = 9, n: int = 512) -> tuple[str, list[dict]]:
    from autoprec.session import open_session

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64)).astype("float32")
    rows, records = [], []
    for size in sizes:
        model = model_of(size)
        # labels the float32 model gets right, so that a trial's drop means something
        y = model.predict(x, verbose=0).argmax(-1)
        session = open_session(model, (x, y), target=TARGET, metric="accuracy")
        eligible = [i.path for i in session.graph.eligible]
        assignments = [{u: TARGET for u in eligible if rng.random() < 0.5} for _ in range((repeats + 1) * (RUN + 1))]
        times = interleaved(_trials(model, session, assignments), repeats=repeats, warmup=1)
        e, r = median(times["engine"]) / RUN, median(times["rebuild"])
        n_layers = len(session.graph.layers)
        rows.append([n_layers, len(eligible), e, r, r / e, session.engine.traces])
        records.append({"layers": n_layers, "units": len(eligible), "engine_s": e, "rebuild_s": r, "ratio": r / e})
    text = table(
        [
            "layers",
            "decisions possible",
            "engine s/trial (median)",
            "rebuild s/trial (median)",
            "rebuild / engine",
            "engine traces",
        ],
        rows,
    )
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
