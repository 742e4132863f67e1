"""Search quality against the exhaustive optimum, with two baselines, on small models.

For each model every assignment of *every eligible layer* (weighted and
weightless layers that compute) is enumerated on the simulated engine to
find the true best feasible objective (the cost model's estimated
speed-up). ``tune`` (which decides weightless layers only where they show a
hazard of their own) and two baselines then search the same space:

- greedy segment halving, in the style of onnxconverter-common's
  ``auto_convert_mixed_precision``: try a segment in 16-bit; if it misses the
  budget, halve it and recurse;
- prefix bisection, in the style of Polygraphy's ``debug precision``: bisect
  on how many leading layers must stay float32.

Each reports its objective as a fraction of the optimum and its evaluations.

    python benchmarks/bench_search_quality.py
"""

from __future__ import annotations

import itertools
import sys

from common import table


def _weightless(width: int = 48):
    """A small digits MLP with weightless hazards: a large Rescaling and back, exp of an offset, an offset Add."""
    import keras
    import numpy as np
    from keras import layers

    from autoprec import testing

    (xt, yt), val = testing.digits_data(flat=True)
    keras.utils.set_random_seed(0)
    i = keras.Input((64,))
    h = layers.Dense(width, activation="relu", name="d1")(i)
    h = layers.Rescaling(1.0, name="down")(layers.Rescaling(1.0, name="up")(layers.Dense(width, name="d2")(h)))
    h = layers.Rescaling(1.0, offset=0.0, name="exp_in")(layers.Dense(width, activation="tanh", name="d3")(h))
    h = layers.Rescaling(1.0, offset=-1.0, name="exp_out")(layers.Activation("exponential", name="exp")(h))
    h = layers.Dense(width, name="d4")(h)
    h = layers.Rescaling(1.0, offset=0.0, name="unshift")(layers.Rescaling(1.0, offset=0.0, name="shift")(h))
    out = layers.Dense(10, activation="softmax", name="out")(layers.Dense(width, activation="relu", name="d5")(h))
    model = keras.Model(i, out, name="weightless12")
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    testing.train(model, xt, yt, epochs=15)
    model.get_layer("up").scale, model.get_layer("down").scale = 1e5, 1e-5
    model.get_layer("exp_in").offset, model.get_layer("exp_out").scale = 11.0, float(np.exp(-11.0))
    model.get_layer("shift").offset, model.get_layer("unshift").offset = 16384.0, -16384.0
    model.predict_function = None
    return model, val


def models():
    """(name, model, val, target, budget) for the benchmark."""
    import keras
    from keras import layers

    from autoprec import testing

    out = []
    planted, _, val, _ = testing.planted_mlp()
    out.append(("planted MLP, float16", planted, val, "mixed_float16", "0.5%"))
    out.append(("planted MLP, bfloat16", planted, val, "mixed_bfloat16", "0.5%"))
    weightless, wval = _weightless()
    out.append(("weightless hazards, float16", weightless, wval, "mixed_float16", "0.5%"))
    out.append(("weightless hazards, bfloat16", weightless, wval, "mixed_bfloat16", "0.5%"))

    # Mild weightless hazards (issue 24): offset blocks between Dense layers, each losing a little accuracy in
    # 16-bit with no overflow and no flush, on a borderline task; two seeds.
    for seed in (0, 1):
        mild, _, mval, _ = testing.mild_weightless_mlp(seed=seed, blocks=2, n=3000)
        out.append((f"mild weightless blocks (seed {seed}), bfloat16", mild, mval, "mixed_bfloat16", "0.5%"))
        out.append((f"mild weightless blocks (seed {seed}), float16", mild, mval, "mixed_float16", "0.5%"))

    (xt, yt), (xv, yv) = testing.digits_data()
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    x = i
    for k, f in enumerate((16, 32, 32)):
        x = layers.Conv2D(f, 3, padding="same", name=f"conv{k}")(x)
        x = layers.BatchNormalization(name=f"bn{k}")(x)
        x = layers.ReLU(name=f"relu{k}")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    x = layers.Dense(32, activation="relu", name="fc2")(x)
    o = layers.Dense(10, activation="softmax", name="out")(x)
    cnn = keras.Model(i, o, name="cnn8")
    cnn.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    testing.train(cnn, xt, yt, epochs=6)
    out.append(("CNN with ReLU layers, float16", cnn, (xv, yv), "mixed_float16", "0.2%"))
    return out


def exhaustive(session, cost, eligible, target, budget):
    """The best feasible estimated speed-up over every assignment of the eligible layers.

    Assignments are visited fastest first; the first feasible one is the
    optimum, and only the ones before it are evaluated.
    """
    # Every eligible layer is named in each assignment: a weightless layer left out would follow its producer.
    assignments = [
        {u: target if b else "float32" for u, b in zip(eligible, bits, strict=True)}
        for bits in itertools.product([0, 1], repeat=len(eligible))
    ]
    ranked = sorted(assignments, key=lambda a: -cost.speedup(a))
    for evals, a in enumerate(ranked, start=1):
        if budget.feasible(baseline=session.baseline, drop=session.evaluate(a, budget=budget).drop):
            return cost.speedup(a), evals
    return 1.0, len(ranked)


def _named(eligible, chosen, target):
    """An assignment naming every eligible layer: ``chosen`` in ``target``, the rest float32."""
    return {u: target if u in chosen else "float32" for u in eligible}


def _ok(session, eligible, chosen, target, budget):
    return budget.feasible(
        baseline=session.baseline, drop=session.evaluate(_named(eligible, chosen, target), budget=budget).drop
    )


def halving(session, cost, eligible, target, budget):
    low, evals = set(), 0

    def recurse(segment):
        nonlocal evals
        evals += 1
        if _ok(session, eligible, low | set(segment), target, budget):
            low.update(segment)
        elif len(segment) > 1:
            mid = len(segment) // 2
            recurse(segment[:mid])
            recurse(segment[mid:])

    recurse(list(eligible))
    return cost.speedup(_named(eligible, low, target)), evals


def prefix_bisect(session, cost, eligible, target, budget):
    lo, hi, evals = 0, len(eligible), 0  # k = number of leading layers kept float32
    while lo < hi:
        mid = (lo + hi) // 2
        evals += 1
        if _ok(session, eligible, eligible[mid:], target, budget):
            hi = mid
        else:
            lo = mid + 1
    return cost.speedup(_named(eligible, set(eligible[lo:]), target)), evals


def run(n_trials: int = 60) -> tuple[str, list[dict]]:
    import autoprec
    from autoprec.budget import Budget
    from autoprec.search.cost import CostModel
    from autoprec.session import open_session

    rows, records = [], []
    for name, model, val, target, budget in models():
        session = open_session(model, val, target=target)
        eligible = [i.path for i in session.graph.eligible]  # every layer that may carry a policy: the optimum's space
        device = "gpu" if target == "mixed_float16" else "cpu"
        cost = CostModel(session.graph, device=device)
        budget = Budget.get(budget)
        opt, opt_evals = exhaustive(session, cost, eligible, target, budget)
        # Judged by the measured drop, as the optimum and the baselines are: this compares searches, not the bound
        # (tune's default judges the 95% upper bound where the data allows it, a stricter rule than theirs).
        result = autoprec.tune(
            model, val, budget=budget, target=target, n_trials=n_trials, verbose=0, device=device, confidence=None
        )
        half, half_evals = halving(session, cost, eligible, target, budget)
        pre, pre_evals = prefix_bisect(session, cost, eligible, target, budget)
        tuned = result.speedup_estimate
        rows.append(
            [
                name,
                len(eligible),
                result.stats["decision_keys"],
                opt,
                f"{tuned / opt:.1%}",
                result.stats["evaluations"],
                f"{half / opt:.1%}",
                half_evals,
                f"{pre / opt:.1%}",
                pre_evals,
                2 ** len(eligible),
            ]
        )
        records.append({"model": name, "tune": tuned / opt, "halving": half / opt, "prefix": pre / opt})
    text = table(
        [
            "model",
            "eligible layers",
            "tune's decisions",
            "optimum (est. speed-up)",
            "tune / optimum",
            "tune evals",
            "halving / optimum",
            "halving evals",
            "prefix bisection / optimum",
            "prefix evals",
            "assignments",
        ],
        rows,
    )
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
