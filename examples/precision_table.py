"""The classic mixed-precision comparison, done correctly and measured: float64, float32, 16-bit, autoprec.

The same digits MLP (two wide Dense layers of 2048 units, in the style of
the well-known MNIST example) is trained five ways in one run, from the same
initial weights, on the same batches, with the epochs of the five variants
interleaved so that a busy machine slows them all alike:

- ``float64``: ``keras.config.set_floatx("float64")`` and a float64 policy;
- ``float32``: the default;
- ``mixed_bfloat16`` and ``mixed_float16``: one global policy;
- ``autoprec``: the per-layer policy ``autoprec.tune(..., target="auto")``
  chose for a float32 copy trained beforehand (bfloat16 on a CPU with fast
  bfloat16, float16 on a CUDA GPU), put on the model with ``apply_policy``.

It prints one table, train seconds per epoch (the fastest epoch after the
first, which traces) and validation accuracy, and writes it to
``reports/precision_table.md``.

The naive version of this example carries three well-known bugs; this one
checks each (the output starts with the checks):

1. The policy is set after the model is built, so it has no effect: a
   layer takes the global policy when it is *constructed*. Here
   ``keras.config.set_dtype_policy`` comes first, and every variant asserts
   its layers' compute dtype.
2. The softmax runs in float16. Here the output layer gets
   ``dtype="float32"``, so the probabilities and the loss are float32.
3. ``tf.keras.mixed_precision.experimental`` no longer exists. Keras 3
   spells it ``keras.config.set_dtype_policy("mixed_float16")``, and the
   float16 variant wraps its optimizer in
   ``keras.optimizers.LossScaleOptimizer`` explicitly.

On a CPU, 16-bit is not automatically faster: with oneDNN and AVX512_BF16,
bfloat16 matmuls are fast, but there are no fast float16 kernels, so
``mixed_float16`` trains *slower* than float32 (1.4x to 7x slower on the
Dense and Conv models we measured). On a GPU with tensor cores both are
fast. The table says which holds on this machine.

Run it with ``python examples/precision_table.py``. About 40 s on a laptop
CPU; ``AUTOPREC_EXAMPLES_FAST=1`` uses a narrower model and fewer epochs
(about 12 s) and writes to ``$AUTOPREC_EXAMPLES_OUT`` or a temporary
directory, never to reports/.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time

import keras
from _common import FAST, output_path  # examples/_common.py; imported first, it quiets TensorFlow

import autoprec
from autoprec import backends
from autoprec.testing import digits_data

WIDTH = 256 if FAST else 2048
EPOCHS = 2 if FAST else 8
BATCH = 64
GLOBAL_POLICIES = ("float64", "float32", "mixed_bfloat16", "mixed_float16")


@contextlib.contextmanager
def global_policy(policy: str):
    """Set the global dtype policy (and floatx for float64) for building a model; restore both after."""
    old_policy, old_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_floatx("float64" if policy == "float64" else "float32")
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_floatx(old_floatx)
        keras.config.set_dtype_policy(old_policy)


def build_model() -> keras.Model:
    """The MLP, built under whatever global policy is set; the softmax always computes in float32."""
    inputs = keras.Input((64,), name="pixels")
    x = keras.layers.Dense(WIDTH, activation="relu", name="dense1")(inputs)
    x = keras.layers.Dense(WIDTH, activation="relu", name="dense2")(x)
    x = keras.layers.Dense(10, name="logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probs")(x)  # bug 2: never a float16 softmax
    return keras.Model(inputs, outputs, name="digits_mlp")


def compile_model(model: keras.Model, *, loss_scale: bool) -> keras.Model:
    optimizer = keras.optimizers.Adam(1e-3)
    if loss_scale:  # bug 3: float16 gradients underflow without a loss scale
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def check_pitfalls() -> list[str]:
    """The three bugs of the naive version, shown on this Keras."""
    late = build_model()
    with global_policy("mixed_float16"):
        late_dtype = late.get_layer("dense1").compute_dtype  # the policy came after the build
        naive = keras.layers.Softmax()
    return [
        f"policy set after building: dense1 computes in {late_dtype} (no effect); set it before building",
        f"a softmax built under mixed_float16 without dtype='float32' computes in {naive.compute_dtype}",
        (
            f"keras.mixed_precision.experimental exists: {hasattr(keras.mixed_precision, 'experimental')}; "
            "use keras.config.set_dtype_policy"
        ),
    ]


def variant(policy: str, weights: list) -> keras.Model:
    """A fresh model built under ``policy``, from the shared initial weights, checked to compute in its dtype."""
    with global_policy(policy):
        model = compile_model(build_model(), loss_scale=policy == "mixed_float16")
    model.set_weights([w.astype(policy if policy == "float64" else "float32") for w in weights])
    compute = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(policy, policy)
    for name in ("dense1", "dense2", "logits"):
        got = model.get_layer(name).compute_dtype
        assert got == compute, f"{policy}: {name} computes in {got}"  # bug 1: the policy must take effect
    assert model.get_layer("probs").compute_dtype == "float32"
    return model


def tuned_variant(weights: list, train: tuple, val: tuple) -> tuple[keras.Model, str]:
    """Tune a float32 copy trained for a few epochs; put the tuned policy on a fresh model from ``weights``."""
    reference = variant("float32", weights)
    reference.fit(*train, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    result = autoprec.tune(reference, val, budget="0.5%", target="auto", n_trials=10 if FAST else 30, verbose=0)
    fresh = variant("float32", weights)
    tuned = autoprec.apply_policy(fresh, result.policy)
    return tuned, f"autoprec ({result.target} for {result.n_16bit} of {len(result.units)} decided layers)"


def train_interleaved(models: dict[str, keras.Model], train: tuple) -> dict[str, list[float]]:
    """Train every model ``EPOCHS`` epochs, one epoch each in turn, on the same batches; seconds per epoch."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for epoch in range(EPOCHS):
        for name, model in models.items():
            keras.utils.set_random_seed(epoch)  # the same shuffle for every variant
            start = time.perf_counter()
            model.fit(*train, epochs=1, batch_size=BATCH, verbose=0)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def table_rows(models: dict, seconds: dict, val: tuple) -> list[dict]:
    base = min(seconds["float32"][1:])
    rows = []
    for name, model in models.items():
        per_epoch = min(seconds[name][1:])  # other processes only ever add time: the fastest epoch is the cleanest
        rows.append(
            {
                "variant": name,
                "s/epoch": per_epoch,
                "speed": base / per_epoch,
                "accuracy": float(model.evaluate(*val, verbose=0)[1]),
            }
        )
    return rows


def render(rows: list[dict], labels: dict, pitfalls: list[str], train_n: int) -> str:
    lines = ["| variant | train s/epoch | speed vs float32 | validation accuracy |", "|---|---:|---:|---:|"]
    lines += [
        f"| {labels.get(r['variant'], r['variant'])} | {r['s/epoch']:.3f} | {r['speed']:.2f}x | {r['accuracy']:.4f} |"
        for r in rows
    ]
    slower = [r["variant"] for r in rows if r["variant"] not in ("float32", "float64") and r["speed"] < 0.95]
    faster = [r["variant"] for r in rows if r["speed"] > 1.05]
    verdict = (
        f"On this machine, slower than float32: {_words(slower) or 'no 16-bit variant'}; faster: "
        f"{_words(faster) or 'none'}. " + _why(slower) + " Timings on a shared machine move between runs; "
        "compare the ratios within one table."
    )
    machine = (
        f"{_cpu_name()}, {os.cpu_count()} cores, fast bfloat16 kernels (AVX512_BF16/AMX): "
        f"{'yes' if backends.cpu_has_fast_bf16() else 'no'}; {keras.backend.backend()} backend, Keras "
        f"{keras.__version__}; " + ("no GPU used" if not backends.is_cuda_gpu_available() else "on a CUDA GPU")
    )
    how = (
        f"Measured by `python examples/precision_table.py` in one run: an MLP 64-{WIDTH}-{WIDTH}-10 on {train_n} "
        f"digits images, batch {BATCH}, {EPOCHS} epochs from the same initial weights on the same batches, the "
        "variants' epochs interleaved. Seconds per epoch are the fastest epoch after the first (which traces): "
        "other processes on the machine only ever add time."
    )
    return "\n".join(
        [
            "# Precision table: the same digits model in float64, float32, 16-bit and tuned by autoprec",
            "",
            how,
            "",
            *lines,
            "",
            verdict,
            "",
            f"Machine: {machine}.",
            "",
            "Checked on the way (the bugs of the naive version):",
            "",
            *[f"- {p}" for p in pitfalls],
            "",
        ]
    )


def _words(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _why(slower: list[str]) -> str:
    if "mixed_float16" in slower:
        return (
            "A CPU has no fast float16 kernels: float16 math is emulated and casts cost extra, so "
            "`mixed_float16` pays only on a GPU with tensor cores. bfloat16 has native kernels on CPUs with "
            "AVX512_BF16 or AMX (oneDNN)."
        )
    return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> int:
    pitfalls = check_pitfalls()
    print("What the naive version gets wrong, checked on this Keras:\n" + "\n".join(f"  - {p}" for p in pitfalls))
    (x_train, y_train), (x_val, y_val) = digits_data(flat=True)
    train, val = (x_train, y_train), (x_val, y_val)
    keras.utils.set_random_seed(0)
    weights = build_model().get_weights()
    models = {policy: variant(policy, weights) for policy in GLOBAL_POLICIES}
    models["autoprec"], label = tuned_variant(weights, train, val)
    rows = table_rows(models, train_interleaved(models, train), val)
    text = render(rows, {"autoprec": label}, pitfalls, len(x_train))
    path = output_path("precision_table.md", default="reports")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    print("\n" + text + f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
