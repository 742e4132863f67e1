"""A KerasHub decoder of realistic width: tune's wall time in float32 predict passes, per stage, and its peak RSS.

A GPT2 causal LM built from a config (no download), hidden 512, 8 layers, sequences of
128 tokens, trained briefly in float32 on a learnable next-token task, then
``tune(model, (x, y), budget="0.5%", target="mixed_bfloat16", device="gpu")`` on 128
evaluation sequences. Printed side by side: one float32 ``model.predict`` pass over the
same data, tune's total and per-stage cost in those passes (autoprec's own accounting,
``TuneResult.cost_in_passes``, counts in warm engine passes; the table converts to
``model.predict`` passes), and the process's peak RSS after ``predict`` and after tune.

Run: ``python benchmarks/bench_kerashub.py [--small]`` (``--small``: hidden 128, 2 layers, for a smoke run).
"""

from __future__ import annotations

import argparse
import sys
import time

import common
import numpy as np


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    import keras
    import keras_hub

    import autoprec

    hidden, layers, seq, vocab, n_eval = (128, 2, 64, 512, 64) if args.small else (512, 8, 128, 2048, 128)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def data(n):
        s = (rng.integers(0, vocab, size=(n, 1)) + np.arange(seq + 1)) % vocab
        return {"token_ids": s[:, :-1].astype("int32"), "padding_mask": np.ones((n, seq), "int32")}, s[:, 1:].astype(
            "int32"
        )

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_heads=8,
        hidden_dim=hidden,
        intermediate_dim=4 * hidden,
        max_sequence_length=seq,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x_train, y_train = data(512)
    model.fit(x_train, y_train, epochs=2, batch_size=16, verbose=0)
    x, y = data(n_eval)
    model.predict(x, verbose=0)  # traced once, as a user's second call would be
    started = time.monotonic()
    model.predict(x, verbose=0)
    predict_s = time.monotonic() - started
    rss_predict = common.peak_rss_gb()
    started = time.monotonic()
    result = autoprec.tune(model, (x, y), budget="0.5%", target="mixed_bfloat16", device="gpu", seed=0, verbose=0)
    tune_s = time.monotonic() - started
    rss_tune = common.peak_rss_gb()
    engine_pass = result.stats["pass_seconds"]
    per_stage = {k: v * engine_pass / predict_s for k, v in result.cost_in_passes.items()}
    lines = [
        f"Machine: {common.machine()}",
        f"GPT2 causal LM: hidden {hidden}, {layers} layers, {seq} tokens, vocabulary {vocab}, "
        f"{n_eval} evaluation sequences, {model.count_params():,} parameters",
        f"result: {result!r}",
        "",
        common.table(
            ["measure", "value"],
            [
                ["one float32 model.predict pass", f"{predict_s:.2f} s"],
                ["tune wall time", f"{tune_s:.1f} s"],
                ["tune in model.predict passes", f"{tune_s / predict_s:.1f}"],
                *[[f"  stage {k} (passes)", f"{v:.1f}"] for k, v in per_stage.items() if k != "total"],
                ["peak RSS after predict", f"{rss_predict:.2f} GB"],
                ["peak RSS after tune", f"{rss_tune:.2f} GB"],
            ],
        ),
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
