"""A small transformer whose residual stream starts out too fine for float16, and the layers that can go.

A two-block, pre-norm transformer (``Embedding``, ``MultiHeadAttention``,
``LayerNormalization``, feed-forward ``Dense`` layers) classifies token
sequences: each sequence of 24 tokens holds one of four marker tokens twice
among random ones, and the marker is the class.

Its residual stream rides on a large offset, the way the residual streams of
large transformers carry "massive activations" of thousands: every channel
of every embedding starts near 4096. Each block reads the stream through a
``LayerNormalization``, which subtracts the mean over the channels, so in
float32 the offset changes nothing and training never removes it. In float16
numbers near 4096 are spaced 4 apart. The embedding tells the tokens apart
by far less than that, and the first residual ``Add`` adds the first
attention's output, of order 1, on top: rounded to steps of 4, both lose the
tokens, so they must stay float32. Attention and the feed-forward layers,
which read the normalised stream, may compute in float16, and so may the
later residual additions, whose signal has grown large enough to survive.
autoprec finds which are which from the model and the data.

Run it with ``python examples/transformer.py``. About 17 s on a laptop CPU;
``AUTOPREC_EXAMPLES_FAST=1`` trains and searches less (about 13 s). It
writes ``reports/examples/transformer/``, or
``$AUTOPREC_EXAMPLES_OUT/transformer/`` (fast mode without it: a temporary
directory).
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np
from _common import FAST, output_path  # examples/_common.py; imported first, it quiets TensorFlow
from keras import layers

import autoprec
from autoprec.decisions import sentence

LENGTH, VOCAB, WIDTH, CLASSES = 24, 64, 32, 4
OFFSET = 4096.0  # the residual stream's offset; float16 spacing there is 4


def sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens ``CLASSES..VOCAB-1`` with the class's marker token (``0..CLASSES-1``) at two places."""
    rng = np.random.default_rng(seed)
    x = rng.integers(CLASSES, VOCAB, size=(n, LENGTH))
    y = rng.integers(0, CLASSES, n)
    for row, label in zip(x, y, strict=True):
        row[rng.choice(LENGTH, 2, replace=False)] = label
    return x.astype("int32"), y.astype("int32")


def transformer() -> keras.Model:
    """Two pre-norm blocks over an embedding whose every channel starts near ``OFFSET``."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    start = keras.initializers.RandomUniform(OFFSET - 0.05, OFFSET + 0.05)
    x = layers.Embedding(VOCAB, WIDTH, embeddings_initializer=start, name="embed")(tokens)
    for i in (1, 2):
        h = layers.LayerNormalization(name=f"block{i}_norm1")(x)
        x = layers.Add(name=f"block{i}_res1")([x, layers.MultiHeadAttention(2, 16, name=f"block{i}_attention")(h, h)])
        h = layers.LayerNormalization(name=f"block{i}_norm2")(x)
        h = layers.Dense(2 * WIDTH, activation="relu", name=f"block{i}_ff1")(h)
        x = layers.Add(name=f"block{i}_res2")([x, layers.Dense(WIDTH, name=f"block{i}_ff2")(h)])
    x = layers.GlobalAveragePooling1D(name="pool")(layers.LayerNormalization(name="final_norm")(x))
    outputs = layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    model = keras.Model(tokens, outputs, name="tiny_transformer")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def print_decisions(result: autoprec.TuneResult) -> None:
    """Each layer the search decided, or that joins a decision, with the reason in words."""
    print(f"\n{'layer':<18} {'decision':<15} why")
    for row in result.sensitivity.sort_values("order").to_dict("records"):
        if row["kind"] in ("decision", "joined", "pinned"):
            why = sentence(row, target=result.target, metric=result.metric_name, allowed=result.allowed_drop)
            print(f"{row['path']:<18} {row['decision']:<15} {why.split(': ', 1)[-1]}")


def main() -> int:
    train, val = sequences(800 if FAST else 2000, seed=0), sequences(512, seed=1)
    model = transformer()
    model.fit(*train, epochs=2 if FAST else 5, batch_size=64, verbose=0)
    print(
        f"float32 accuracy {model.evaluate(*val, verbose=0)[1]:.4f}; residual stream near "
        f"{float(np.abs(model.get_layer('embed').embeddings.numpy()).mean()):.0f}"
    )
    result = autoprec.tune(model, val, budget="0.5%", target="mixed_float16", n_trials=8 if FAST else 40, verbose=0)
    print(result.summary())
    print_decisions(result)
    out = output_path("transformer")
    result.save(out)
    print(f"\nReport: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
