"""GPU benchmark, ready for a CUDA machine: one command, under ten minutes on one GPU.

    KERAS_BACKEND=jax python benchmarks/gpu.py --out reports/gpu.md     # or torch / tensorflow
    KERAS_BACKEND=jax python benchmarks/gpu.py --dry-run                # small sizes: the code path on a CPU

For a convnet and a KerasHub GPT2 causal LM (built from a config, no download;
a plain Keras transformer block where KerasHub is not installed), each trained
briefly in float32 on a learnable synthetic task, it measures side by side in
one run, interleaved step by step so that drift hits every variant alike:

- training-step time (median ms per ``train_on_batch``) for float32, Keras's
  global ``mixed_float16`` and ``mixed_bfloat16`` (every layer that does not fix
  its own dtype), and the policies ``autoprec.tune`` finds for float16 and for
  bfloat16 (``device="gpu"``, a 1% budget);
- each variant's validation accuracy after the same timed training steps from
  the same float32 weights, and tune's own verified drop;
- the device every figure came from (backend, device kind), on every row.

It needs JAX or PyTorch with CUDA, and Keras, Optuna, pandas, matplotlib, NumPy
and autoprec; TensorFlow is not needed. To a machine without a package index they
travel as wheels: ``python -m build --wheel`` here for autoprec, and ``pip download``
for keras, optuna (with alembic, sqlalchemy, colorlog, tqdm, mako) and, for the
KerasHub model, ``keras-hub`` installed with ``--no-deps`` plus tokenizers,
sentencepiece, regex, rich and absl-py (KerasHub's tensorflow-text is not needed).
``make test-jax`` runs ``--dry-run`` on every submission
(tests/test_gpu_benchmark.py), so the script is known to work before a GPU is lent.
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

VARIANTS = ("float32", "global mixed_float16", "global mixed_bfloat16", "tuned float16", "tuned bfloat16")


def device_line(keras) -> str:
    """The backend and the device its arrays live on: the figure's provenance."""
    backend = keras.backend.backend()
    kind = "CPU"
    if backend == "jax":
        import jax

        kind = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    elif backend == "torch":
        import torch

        kind = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        kind = f"gpu: {gpus[0].name}" if gpus else "cpu"
    return f"{backend} on {kind}"


def conv_model(keras, size: int, widths: tuple[int, ...]):
    L = keras.layers
    i = keras.Input((size, size, 3))
    x = i
    for k, f in enumerate(widths):
        x = L.Conv2D(f, 3, padding="same", name=f"conv{k}")(x)
        x = L.BatchNormalization(name=f"bn{k}")(x)
        x = L.ReLU(name=f"relu{k}")(x)
        x = L.MaxPooling2D(name=f"pool{k}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(2 * widths[-1], activation="relu", name="fc")(x)
    return keras.Model(i, L.Dense(10, name="out")(x), name="convnet")


def image_task(rng, n: int, size: int):
    """Noise plus one of ten fixed random patterns: the label is which pattern."""
    patterns = np.random.default_rng(1).normal(size=(10, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    return (rng.normal(size=(n, size, size, 3)).astype("float32") + 0.5 * patterns[y]), y


def transformer(keras, *, vocab: int, seq: int, hidden: int, layers: int):
    """KerasHub's GPT2 causal LM from a config, or a plain Keras block where KerasHub is absent."""
    try:
        import keras_hub
    except ImportError:
        keras_hub = None
    if keras_hub is not None:
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=vocab,
            num_layers=layers,
            num_heads=max(hidden // 64, 2),
            hidden_dim=hidden,
            intermediate_dim=4 * hidden,
            max_sequence_length=seq,
        )
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), "KerasHub GPT2CausalLM"
    L = keras.layers
    tokens = keras.Input((seq,), dtype="int32", name="token_ids")
    x = L.Embedding(vocab, hidden, name="embed")(tokens)
    for k in range(layers):
        a = L.MultiHeadAttention(max(hidden // 64, 2), 64, name=f"mha{k}")(x, x, use_causal_mask=True)
        x = L.LayerNormalization(name=f"ln{k}a")(L.Add(name=f"res{k}a")([x, a]))
        f = L.Dense(hidden, name=f"ffn{k}b")(L.Dense(4 * hidden, activation="gelu", name=f"ffn{k}a")(x))
        x = L.LayerNormalization(name=f"ln{k}b")(L.Add(name=f"res{k}b")([x, f]))
    return keras.Model(tokens, L.Dense(vocab, name="lm_head")(x), name="transformer"), "Keras transformer (no KerasHub)"


def token_task(rng, n: int, seq: int, vocab: int, hub: bool):
    """Next token = previous token + 1 (mod vocab): learnable in a few hundred steps."""
    s = (rng.integers(0, vocab, size=(n, 1)) + np.arange(seq + 1)) % vocab
    x, y = s[:, :-1].astype("int32"), s[:, 1:].astype("int32")
    return ({"token_ids": x, "padding_mask": np.ones_like(x)} if hub else x), y


def rows(data, lo: int, hi: int):
    if isinstance(data, dict):
        return {k: v[lo:hi] for k, v in data.items()}
    return data[lo:hi]


def variants(autoprec, model, val, *, trials: int):
    """The five models, each compiled from the same float32 weights, and the two tune results."""
    graph = autoprec.build_graph(model, sample=rows(val[0], 0, 2))
    every = graph.all_paths()
    out, results = {"float32": autoprec.apply_policy(model, {})}, {}
    for fmt in ("mixed_float16", "mixed_bfloat16"):
        # Keras's global policy: every layer in 16-bit, except those that fix their own dtype.
        out[f"global {fmt}"] = autoprec.apply_policy(model, {p: fmt for p in every})
    for fmt, label in (("mixed_float16", "tuned float16"), ("mixed_bfloat16", "tuned bfloat16")):
        result = autoprec.tune(model, val, budget="1%", target=fmt, device="gpu", n_trials=trials, seed=0, verbose=0)
        out[label], results[label] = result.model, result
    return out, results


def timed_training(models: dict, x, y, *, steps: int, batch: int, warmup: int) -> dict[str, float]:
    """Median seconds per ``train_on_batch``, the variants interleaved step by step."""
    n = len(y)
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(warmup + steps):
        lo = (step * batch) % max(n - batch, 1)
        xb, yb = rows(x, lo, lo + batch), y[lo : lo + batch]
        for k, m in models.items():
            started = time.perf_counter()
            out = m.train_on_batch(xb, yb)
            float(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))  # waits for the device
            if step >= warmup:
                times[k].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(model, x, y, batch: int = 64) -> float:
    """Accuracy batch by batch (KerasHub's ``evaluate`` needs tf.data or grain for in-memory arrays)."""
    hits = 0
    for lo in range(0, len(y), batch):
        pred = np.asarray(model.predict_on_batch(rows(x, lo, lo + batch)))
        hits += int((pred.argmax(-1) == y[lo : lo + batch]).sum())
    return hits / y.size


def fit(model, x, y, *, epochs: int, batch: int) -> None:
    """``fit`` step by step with ``train_on_batch``, for the same reason."""
    for _ in range(epochs):
        for lo in range(0, len(y) - batch + 1, batch):
            model.train_on_batch(rows(x, lo, lo + batch), y[lo : lo + batch])


def bench_model(keras, autoprec, name, model, train, val, *, trials, steps, batch, warmup, epochs, device):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    fit(model, *train, epochs=epochs, batch=batch)
    started = time.monotonic()
    models, results = variants(autoprec, model, val, trials=trials)
    tune_s = time.monotonic() - started
    t = timed_training(models, *train, steps=steps, batch=batch, warmup=warmup)
    lines = []
    for k in VARIANTS:
        result = results.get(k)
        tuned = (
            f"{result.n_16bit}/{len(result.units)} | {result.drop:.4f} | {result.speedup_estimate:.2f}x"
            if result
            else "- | - | -"
        )
        lines.append(
            f"| {name} | {k} | {t[k] * 1e3:.2f} | {t['float32'] / t[k]:.2f}x | {accuracy(models[k], *val):.4f} | "
            f"{tuned} | {device} |"
        )
        print(lines[-1], flush=True)
    return lines, tune_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--dry-run", action="store_true", help="small sizes: the whole code path on a CPU in minutes")
    args = parser.parse_args(argv)
    import keras

    import autoprec

    device = device_line(keras)
    dry = args.dry_run
    trials = min(args.trials, 2) if dry else args.trials
    steps, warmup, batch = (2, 1, 16) if dry else (40, 5, 64)
    lines = [
        f"# autoprec GPU benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Command: `KERAS_BACKEND={keras.backend.backend()} python benchmarks/gpu.py{' --dry-run' if dry else ''}`",
        "",
        f"Device: {device}. Host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, Keras {keras.__version__}, autoprec {autoprec.__version__}.",
        "",
        "Speed-up = float32 ms/step / the variant's ms/step, measured side by side in this run (interleaved). "
        "Accuracy on held-out data after the same timed training steps from the same float32 weights.",
        "",
        "| model | variant | ms/step | speed-up vs float32 | val accuracy | tuned 16-bit units | tune's drop | "
        "estimated speed-up | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    size, widths, n_img = (16, (8, 16), 256) if dry else (64, (64, 128, 256), 4096)
    x, y = image_task(rng, 2 * n_img, size)
    model = conv_model(keras, size, widths)
    out, tune_conv = bench_model(
        keras, autoprec, "convnet", model, (x[:n_img], y[:n_img]), (x[n_img:], y[n_img:]),
        trials=trials, steps=steps, batch=batch, warmup=warmup, epochs=8 if dry else 3, device=device,
    )  # fmt: skip
    lines += out
    vocab, seq, hidden, depth, n_tok = (64, 16, 32, 2, 256) if dry else (1024, 128, 512, 6, 2048)
    keras.utils.set_random_seed(0)
    model, label = transformer(keras, vocab=vocab, seq=seq, hidden=hidden, layers=depth)
    hub = label.startswith("KerasHub")
    xt, yt = token_task(rng, n_tok, seq, vocab, hub)
    xv, yv = token_task(rng, n_tok // 4, seq, vocab, hub)
    out, tune_lm = bench_model(
        keras, autoprec, label, model, (xt, yt), (xv, yv),
        trials=trials, steps=steps, batch=batch // 2, warmup=warmup, epochs=6 if dry else 3, device=device,
    )  # fmt: skip
    lines += out
    lines += ["", f"tune wall time (both targets): convnet {tune_conv:.0f} s, {label} {tune_lm:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(lines[-1])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
