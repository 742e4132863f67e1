"""Search quality against the exhaustive optimum, with two baselines, on small models.

For each model (8-12 decision units) every assignment is enumerated on the
simulated engine to find the true best feasible objective (the cost model's
estimated speed-up). ``tune`` and two baselines then search the same space:

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


def models():
    """(name, model, val, target, budget) for the benchmark."""
    import keras
    from keras import layers

    from autoprec import examples

    out = []
    planted, _, val, _ = examples.planted_mlp()
    out.append(("planted MLP, float16", planted, val, "mixed_float16", "0.5%"))
    out.append(("planted MLP, bfloat16", planted, val, "mixed_bfloat16", "0.5%"))

    (xt, yt), (xv, yv) = examples.digits_data()
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
    examples.train(cnn, xt, yt, epochs=6)
    out.append(("CNN, 8 units, float16", cnn, (xv, yv), "mixed_float16", "0.2%"))

    (xt, yt), (xv, yv) = examples.digits_data(flat=True)
    deep = examples.mlp(depth=12, width=48, name="mlp12")
    examples.train(deep, xt, yt, epochs=15)
    examples.plant_overflow(deep, "d2", "d3", xt, peak=2e5)
    out.append(("MLP 12 units, planted overflow, float16", deep, (xv, yv), "mixed_float16", "0.3%"))
    out.append(("MLP 12 units, bfloat16, zero budget", deep, (xv, yv), "mixed_bfloat16", 0.0))
    return out


def exhaustive(ctx, cost, units, target, allowed):
    best, evals = 1.0, 0
    for bits in itertools.product([0, 1], repeat=len(units)):
        a = {u: target for u, b in zip(units, bits) if b}
        s = cost.speedup(ctx.graph.resolve(a))
        if s <= best:
            continue  # cannot beat the best; its metric does not matter
        r = ctx.evaluate(a)
        evals += 1
        if r["drop"] <= allowed + 1e-9:
            best = s
    return best, evals


def halving(ctx, cost, units, target, allowed):
    low, evals = set(), 0

    def ok(extra):
        nonlocal evals
        evals += 1
        return ctx.evaluate({u: target for u in low | set(extra)})["drop"] <= allowed + 1e-9

    def recurse(segment):
        if ok(segment):
            low.update(segment)
        elif len(segment) > 1:
            mid = len(segment) // 2
            recurse(segment[:mid])
            recurse(segment[mid:])

    recurse(list(units))
    return cost.speedup(ctx.graph.resolve({u: target for u in low})), evals


def prefix_bisect(ctx, cost, units, target, allowed):
    lo, hi, evals = 0, len(units), 0  # k = number of leading units kept float32
    while lo < hi:
        mid = (lo + hi) // 2
        evals += 1
        if ctx.evaluate({u: target for u in units[mid:]})["drop"] <= allowed + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return cost.speedup(ctx.graph.resolve({u: target for u in units[lo:]})), evals


def run(n_trials: int = 60) -> tuple[str, list[dict]]:
    import autoprec
    from autoprec.budget import Budget
    from autoprec.cost import CostModel
    from autoprec.sensitivity import prepare

    rows, records = [], []
    for name, model, val, target, budget in models():
        ctx = prepare(model, val, target=target)
        units = [u.path for u in ctx.graph.units]
        device = "gpu" if target == "mixed_float16" else "cpu"
        cost = CostModel(ctx.graph, device=device)
        allowed = Budget.parse(budget).allowed(ctx.baseline)
        opt, opt_evals = exhaustive(ctx, cost, units, target, allowed)
        result = autoprec.tune(model, val, budget=budget, target=target, n_trials=n_trials, verbose=0, device=device)
        half, half_evals = halving(ctx, cost, units, target, allowed)
        pre, pre_evals = prefix_bisect(ctx, cost, units, target, allowed)
        tuned = result.speedup_estimate
        rows.append([name, len(units), opt, f"{tuned / opt:.1%}", result.stats["evaluations"], f"{half / opt:.1%}", half_evals,
                     f"{pre / opt:.1%}", pre_evals, 2 ** len(units)])
        records.append({"model": name, "tune": tuned / opt, "halving": half / opt, "prefix": pre / opt})
    text = table(["model", "units", "optimum (est. speed-up)", "tune / optimum", "tune evals", "halving / optimum",
                  "halving evals", "prefix bisection / optimum", "prefix evals", "assignments"], rows)
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    print(machine())
    print(run()[0])
