"""GPU benchmark, ready to run on a CUDA machine in one command (about 5 minutes on one GPU):

    KERAS_BACKEND=jax python benchmarks/gpu.py --out gpu.md      # or KERAS_BACKEND=tensorflow

It measures, side by side in one run:

1. float32 vs all-``mixed_float16`` vs the ``tune``d policy training-step time,
   interleaved, for a conv model and a transformer-block model;
2. loss-scale behaviour on real float16 kernels: the LossScaleOptimizer's
   scale history and skipped steps for the all-float16 model, and for a
   model with a planted overflow region (which the tuned policy keeps in float32).

Every model is first trained briefly in float32 on a learnable synthetic
task, so that the accuracy budget means something.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conv_model(keras):
    L = keras.layers
    i = keras.Input((32, 32, 3))
    x = i
    for k, f in enumerate((64, 128, 256)):
        x = L.Conv2D(f, 3, padding="same", name=f"conv{k}")(x)
        x = L.BatchNormalization(name=f"bn{k}")(x)
        x = L.ReLU(name=f"relu{k}")(x)
        x = L.MaxPooling2D(name=f"pool{k}")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(256, activation="relu", name="fc")(x)
    o = L.Dense(10, activation="softmax", name="out")(x)
    return keras.Model(i, o, name="conv")


def transformer_model(keras, seq=128, d=256, heads=8):
    L = keras.layers
    i = keras.Input((seq, d))
    a = L.MultiHeadAttention(heads, d // heads, name="mha")(i, i)
    x = L.LayerNormalization(name="ln1")(L.Add(name="res1")([i, a]))
    f = L.Dense(4 * d, activation="gelu", name="ffn1")(x)
    f = L.Dense(d, name="ffn2")(f)
    x = L.LayerNormalization(name="ln2")(L.Add(name="res2")([x, f]))
    x = L.GlobalAveragePooling1D()(x)
    o = L.Dense(10, activation="softmax", name="out")(x)
    return keras.Model(i, o, name="transformer_block")


def task(keras, model, shape, n, rng):
    x = rng.normal(size=(2 * n, *shape)).astype("float32")
    feats = x.mean(axis=tuple(range(1, x.ndim - 1)))[:, :8]
    y = (feats @ rng.normal(size=(feats.shape[1], 10))).argmax(-1)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:n], y[:n], epochs=4, batch_size=128, verbose=0)
    return (x[:n], y[:n]), (x[n:], y[n:])


def timed(models, xb, yb, steps=30, warmup=5):
    for _ in range(warmup):
        for m in models.values():
            m.train_on_batch(xb, yb)
    times = {k: [] for k in models}
    for _ in range(steps):  # interleaved: drift hits every variant alike
        for k, m in models.items():
            t = time.perf_counter()
            out = m.train_on_batch(xb, yb)
            float(out[0] if isinstance(out, (list, tuple)) else out)  # wait for the device
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def scale_history(keras, model, x, y, steps=200, batch=128):
    scales, skipped, last = [], 0, None
    for s in range(steps):
        i = (s * batch) % (len(x) - batch)
        model.train_on_batch(x[i : i + batch], y[i : i + batch])
        scale = float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
        if last is not None and scale < last:
            skipped += 1
        scales.append(scale)
        last = scale
    return scales, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the code path on a CPU in a minute or two"
    )
    args = parser.parse_args(argv)
    import keras

    import autoprec
    from autoprec import backends, examples

    lines = [
        f"# autoprec GPU benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Command: `KERAS_BACKEND={keras.backend.backend()} python benchmarks/gpu.py`",
        "",
    ]
    device = "CUDA GPU" if backends.is_cuda_gpu_available() else "NO GPU (numbers below are CPU numbers)"
    if keras.backend.backend() == "jax":
        import jax

        device += f": {jax.devices()[0].device_kind}"
    lines += [
        f"Machine: {device}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Keras {keras.__version__} ({keras.backend.backend()}), autoprec {autoprec.__version__}",
        "",
    ]
    rng = np.random.default_rng(0)
    n, steps, scale_steps = (256, 5, 20) if args.quick else (2048, 30, 200)
    if args.quick:
        args.trials = min(args.trials, 5)
    lines += [
        "| model | float32 ms/step | all-float16 / float32 | tuned / float32 | tuned 16-bit units | verified drop |",
        "|---|---|---|---|---|---|",
    ]
    for build, shape in ((conv_model, (32, 32, 3)), (transformer_model, (128, 256))):
        keras.utils.set_random_seed(0)
        model = build(keras)
        (xt, yt), val = task(keras, model, shape, n, rng)
        result = autoprec.tune(model, val, budget="1%", target="mixed_float16", n_trials=args.trials, verbose=0)
        graph = autoprec.build_graph(model)
        all16 = graph.resolve({u.path: "mixed_float16" for u in graph.units})
        variants = {
            "float32": autoprec.apply_policy(model, {}),
            "all16": autoprec.apply_policy(model, all16),
            "tuned": autoprec.apply_policy(model, result.policy),
        }
        t = timed(variants, xt[:256], yt[:256], steps=steps, warmup=2 if args.quick else 5)
        lines.append(
            f"| {model.name} | {t['float32'] * 1e3:.2f} | {t['all16'] / t['float32']:.2f}x | "
            f"{t['tuned'] / t['float32']:.2f}x | {result.n_16bit}/{len(result.units)} | {result.drop:.4f} |"
        )
        print(lines[-1], flush=True)

    lines += [
        "",
        "## Loss scale on real float16 kernels",
        "",
        "| model | policy | final scale | min scale | scale decreases (skipped steps) | final loss |",
        "|---|---|---|---|---|---|",
    ]
    planted, (xt, yt), val, _ = examples.planted_mlp(width=64 if args.quick else 512, epochs=4)
    result = autoprec.tune(planted, val, budget="0.5%", target="mixed_float16", n_trials=args.trials, verbose=0)
    graph = autoprec.build_graph(planted)
    for label, names in (
        ("all float16", graph.resolve({u.path: "mixed_float16" for u in graph.units})),
        ("tuned", dict(result.policy)),
    ):
        m = autoprec.apply_policy(planted, names)
        scales, skipped = scale_history(keras, m, xt, yt, steps=scale_steps)
        loss = float(m.evaluate(*val, verbose=0)[0])
        lines.append(
            f"| planted MLP (overflow d3->d4) | {label} | {scales[-1]:g} | {min(scales):g} | {skipped} | {loss:.4g} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
