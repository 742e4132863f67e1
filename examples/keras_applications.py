"""Tune a ``keras.applications`` model at block granularity and print where the report is.

ResNet50 (``weights=None``, 32x32 inputs, so nothing is downloaded) is
trained briefly on generated images, a bright square on noise whose
quadrant is the class, then tuned with ``granularity="block"``: the search
decides whole residual units (``conv2_block1_1_conv`` and
``conv2_block1_1_bn`` are one decision, ``conv2_block1_1``) instead of 106
single layers, and the report lists every layer with its block's decision.
``target="auto"`` picks bfloat16 on a CPU with fast bfloat16 (as here) and
float16 on a CUDA GPU; the speed-up in the report is the cost model's
estimate for that device.

Run it with ``python examples/keras_applications.py [MODEL]`` (any
``keras.applications`` name; default ResNet50). About 80 s on a laptop CPU,
most of it training and tracing a 177-layer graph.
``AUTOPREC_EXAMPLES_FAST=1`` uses MobileNet (alpha 0.25, 86 layers) and
fewer images (about 40 s). It writes ``reports/examples/keras_applications/``, or
``$AUTOPREC_EXAMPLES_OUT/keras_applications/`` (fast mode without it: a
temporary directory).
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np
from _common import FAST, output_path  # examples/_common.py; imported first, it quiets TensorFlow

import autoprec

SIZE, CLASSES = 32, 4


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus a bright square in one of the four quadrants; the quadrant is the class."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.5, size=(n, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, n).astype("int32")
    half = SIZE // 2
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        x[i, r * half + 2 : (r + 1) * half - 2, c * half + 2 : (c + 1) * half - 2, :] += 2.0
    return x, y


def application(name: str) -> keras.Model:
    """``keras.applications.<name>`` with random weights, compiled for the squares."""
    options = {"alpha": 0.25 if name == "MobileNet" else 0.35} if name.startswith("MobileNet") else {}
    if name.startswith(("MobileNetV3", "ConvNeXt", "EfficientNet")):
        options["include_preprocessing"] = False  # the squares are already centred
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(input_shape=(SIZE, SIZE, 3), weights=None, classes=CLASSES, **options)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5  # moving statistics that settle within a short training (Keras's default is 0.99)
    optimizer = keras.optimizers.Adam(3e-3 if FAST else 1e-3)  # MobileNets learn the squares slower than ResNet50
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Fast mode: MobileNet v1, whose 86 layers trace in half the time of MobileNetV2's 154 (the trace is most of
    # the run); tests/test_tuner.py tunes MobileNetV3Small layer by layer.
    name = argv[0] if argv else ("MobileNet" if FAST else "ResNet50")
    train, val = squares(192 if FAST else 512, seed=0), squares(256, seed=1)  # 256: a 0.5% budget needs >= 200 samples
    model = application(name)
    model.fit(*train, epochs=10 if FAST else 3, batch_size=16, verbose=0)  # after the trace, an epoch is cheap
    print(
        f"{name}: {len(model.layers)} layers, {model.count_params():,} parameters; float32 accuracy "
        f"{model.evaluate(*val, verbose=0)[1]:.3f} on {len(val[0])} generated images."
    )
    result = autoprec.tune(
        model,
        val,
        budget="0.5%",
        target="auto",
        granularity="block",
        n_trials=20 if FAST else 40,
        train_data=train,
        verbose=0,
    )
    print(result.summary())
    print(
        f"{result.stats['decision_keys']} decisions (blocks, and weightless layers risky on their own) "
        f"for {len(result.units)} layers."
    )
    out = output_path("keras_applications")
    result.save(out)
    print(f"Report: {os.path.join(out, 'report.html')} (and report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
