"""Real architectures within a laptop's memory and minutes: ``tune`` on ``keras.applications`` models.

Each model is built with ``weights=None`` at 64x64 (Xception at 72x72, the
smallest Keras allows), trained briefly in float32 (4 epochs of 512 images,
BatchNormalization momentum 0.8 so that its statistics settle in so short a fit)
on a generated 10-class task (a bright square whose position is the class,
on noise), then tuned for ``mixed_bfloat16`` on 128 evaluation images with
the default options, against a 2% relative budget on the Brier score. Every
measurement runs in a fresh process, so the peak RSS is that process's own:
``tune`` against ``model.predict`` on the same data, and the seconds each stage
took.

    python benchmarks/bench_applications.py [--models ResNet50 Xception ...] [--n 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import in_fresh_process, table

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("ResNet50", "Xception", "MobileNetV2", "DenseNet121", "ConvNeXtTiny")
SIZE, CLASSES = 64, 10
MIN_SIZE = {"Xception": 72}  # Keras refuses Xception below 71x71


def data(n: int, seed: int, size: int = SIZE):
    """Noise plus a bright 8x8 square at one of ten places: the place is the class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.5, size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, CLASSES, n)
    for i, k in enumerate(y):
        r, c = divmod(int(k), 5)
        x[i, 8 + 24 * r : 16 + 24 * r, 4 + 12 * c : 12 + 12 * c, :] += 2.0
    return x, y.astype("int32")


def _brier(y_true, y_pred):
    from keras import ops

    one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), CLASSES)
    return ops.mean(ops.square(y_pred - one_hot), axis=-1)


def _model(name: str):
    import keras

    extra = {"include_preprocessing": False} if name.startswith(("MobileNetV3", "ConvNeXt")) else {}
    size = MIN_SIZE.get(name, SIZE)
    model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=CLASSES, **extra)
    for layer in model.layers:
        # A fit of a few dozen steps: with Keras's default momentum (0.99) the moving statistics
        # are still mostly their initial values when it ends, and evaluation sits at chance.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.8
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _worker(name: str, mode: str, n: int, out: str) -> None:
    """One measurement in this fresh process: 'train' (fit and save), 'predict' or 'tune'."""
    import resource

    import keras

    path = os.path.join(os.path.dirname(out), f"{name}.keras")
    size = MIN_SIZE.get(name, SIZE)
    x, y = data(n, seed=1, size=size)
    record: dict = {"model": name, "mode": mode, "size": size}
    if mode == "train":
        model = _model(name)
        xt, yt = data(512, seed=0, size=size)
        keras.utils.set_random_seed(0)
        t = time.perf_counter()
        model.fit(xt, yt, epochs=4, batch_size=32, verbose=0)
        record.update(fit_s=time.perf_counter() - t, accuracy=float(model.evaluate(x, y, verbose=0)[1]))
        model.save(path)
    else:
        model = keras.models.load_model(path)
        t = time.perf_counter()
        if mode == "predict":
            model.predict(x, batch_size=32, verbose=0)
        else:
            import autoprec

            # The Brier score (mean squared error against one-hot labels) resolves changes far smaller than
            # one sample's worth of accuracy on 128 images; a mean of per-sample values.
            brier = keras.metrics.MeanMetricWrapper(_brier, name="brier")
            result = autoprec.tune(
                model,
                (x, y),
                budget="2% relative",
                metric=brier,
                higher_is_better=False,
                target="mixed_bfloat16",
                verbose=0,
            )
            record.update(
                stages=result.stats["stage_seconds"],
                n_16bit=result.n_16bit,
                units=len(result.units),
                layers=len(result.sensitivity),
                passes=result.stats["passes"],
                drop=result.drop,
                feasible=result.feasible,
                baseline=result.baseline_metric,
            )
        record["seconds"] = time.perf_counter() - t
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def _measure(name: str, mode: str, n: int, workdir: str) -> dict:
    out = os.path.join(workdir, f"{name}-{mode}.json")
    record = in_fresh_process(os.path.abspath(__file__), [name, mode, str(n)], out, timeout=1800)
    return {"model": name, "mode": mode, **record} if "error" in record else record


def run(models=MODELS, n: int = 128) -> tuple[str, list[dict]]:
    import tempfile

    rows, records = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            trained = _measure(name, "train", n, workdir)
            predict = _measure(name, "predict", n, workdir)
            tuned = _measure(name, "tune", n, workdir)
            rec = {"model": name, "train": trained, "predict": predict, "tune": tuned}
            records.append(rec)
            stages = tuned.get("stages", {})
            rows.append(
                [
                    name,
                    f"{trained.get('size', SIZE)}x{trained.get('size', SIZE)}",
                    tuned.get("layers", "?"),
                    f"{trained.get('accuracy', float('nan')):.2f}",
                    predict.get("peak_rss_gb", float("nan")),
                    tuned.get("peak_rss_gb", float("nan")),
                    tuned.get("seconds", float("nan")),
                    *[stages.get(s, 0.0) for s in ("statistics", "ablation", "search", "verify")],
                    tuned.get("passes", "?"),
                    f"{tuned.get('n_16bit', '?')}/{tuned.get('units', '?')}",
                    tuned.get("error", ""),
                ]
            )
    text = table(
        [
            "model",
            "input",
            "layers",
            "float32 accuracy",
            "predict peak RSS GB",
            "tune peak RSS GB",
            "tune s",
            "statistics s",
            "ablation s",
            "search s",
            "verify s",
            "passes",
            "bf16 decisions",
            "error",
        ],
        rows,
    )
    return text, records


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3])
    else:
        from common import machine

        print(machine())
        print(run(args.models, args.n)[0])
