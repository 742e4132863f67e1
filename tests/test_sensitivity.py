import math

import keras
import numpy as np
import pytest

import autoprec
from autoprec import examples
from autoprec.errors import DataError, MetricError, PolicyError

from conftest import MODEL_BUILDERS, small_data, trained


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_planted_fragile_layers_rank_first(planted, target):
    model, _, val, fragile = planted
    frame = autoprec.profile(model, val, target=target, verbose=0)
    units = frame[frame["decision_unit"] & (frame["pinned"] == "")]
    top = list(units["path"][: len(fragile[target])])
    assert sorted(top) == sorted(fragile[target])
    benign = units[~units["path"].isin(fragile[target])]
    assert (benign["metric_drop"] <= 0.0).all()
    assert (units.loc[units["path"].isin(fragile[target]), "metric_drop"] > 0.005).all()
    assert frame.attrs["baseline_metric"] > 0.9
    assert frame.attrs["passes"] <= len(units) + 2


def test_overflow_statistics_point_at_the_overflow(planted):
    model, _, val, _ = planted
    frame = autoprec.profile(model, val, target="mixed_float16", method="fast", verbose=0).set_index("path")
    assert frame.loc["d3", "act_absmax"] > 65504
    assert frame.loc["d3", "act_overflow"] > 0.01
    assert math.isinf(frame.loc["d3", "score"])
    assert frame.loc["d1", "act_overflow"] == 0
    assert frame.loc["d3", "sqnr_db"] < 0 < frame.loc["d1", "sqnr_db"]
    assert "metric_drop" not in frame  # fast: no ablation
    assert frame.attrs["passes"] == 2
    # the first-order score ranks the planted units above the benign ones
    units = frame[frame["decision_unit"] & (frame["pinned"] == "")]
    benign_max = units.drop(["d3", "d4", "d6", "d7"])["score"].max()
    assert units.loc["d3", "score"] > benign_max and units.loc["d6", "score"] > benign_max


def test_gradient_statistics_with_and_without_loss_scale():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="h")(inputs)
    out = keras.layers.Dense(1, name="out")(h)
    model = keras.Model(inputs, out)
    # tiny outputs and targets: gradients at h (batch-mean loss) sit around 1e-8, below
    # float16's 2^-24, and the default loss scale 2^15 lifts them back into range
    model.get_layer("out").set_weights([model.get_layer("out").get_weights()[0] * 1e-3, np.zeros(1)])
    model.compile(loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = np.zeros((64, 1), "float32")
    frame = autoprec.profile(model, (x, y), method="fast", verbose=0).set_index("path")
    assert frame.loc["h", "grad_flush"] > 0.5
    assert frame.loc["h", "grad_scaled_flush"] < frame.loc["h", "grad_flush"]
    for column in ("wgrad_absmax", "wgrad_flush", "wgrad_subnormal", "wgrad_scaled_overflow", "grad_nonfinite"):
        assert column in frame


def test_traces_and_passes_on_50_units():
    model = examples.mlp(depth=52, width=8, inputs=6, classes=3)
    x, y = small_data(300, features=6)
    frame = autoprec.profile(model, (x, y), metric="accuracy", batch_size=128, verbose=0)
    n_units = int((frame["decision_unit"] & (frame["pinned"] == "")).sum())
    assert n_units >= 50
    assert frame.attrs["traces"] <= 2
    assert frame.attrs["passes"] <= n_units + 2


def test_data_forms_agree():
    import tensorflow as tf

    model = trained(MODEL_BUILDERS["functional"]())
    x, y = small_data(70)

    class Seq(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[i * 25 : (i + 1) * 25], y[i * 25 : (i + 1) * 25]

    forms = [(x, y), tf.data.Dataset.from_tensor_slices((x, y)).batch(16), Seq()]
    baselines = [autoprec.profile(model, d, method="ablation", verbose=0).attrs["baseline_metric"] for d in forms]
    assert max(baselines) - min(baselines) < 1e-6


def test_subclassed_profile_uses_real_fallback():
    model = trained(MODEL_BUILDERS["subclassed"]())
    frame = autoprec.profile(model, small_data(), target="mixed_bfloat16", verbose=0)
    assert frame.attrs["engine"] == "real"
    assert set(frame["path"]) == {"sub_d1", "sub_d2", "sub_out"}
    assert model.d1.compute_dtype == "float32"


def test_metric_forms():
    model = trained(MODEL_BUILDERS["functional"]())
    data = small_data()
    by_name = autoprec.profile(model, data, metric="accuracy", method="ablation", verbose=0)
    by_loss = autoprec.profile(model, data, metric="sparse_categorical_crossentropy", method="ablation", verbose=0)
    assert by_name.attrs["higher_is_better"] and not by_loss.attrs["higher_is_better"]
    fn = autoprec.profile(model, data, metric=lambda yt, yp: float(np.mean(np.argmax(yp, -1) == yt)),
                          higher_is_better=True, method="ablation", verbose=0)
    assert fn.attrs["baseline_metric"] == pytest.approx(by_name.attrs["baseline_metric"])
    inst = autoprec.profile(model, data, metric=keras.metrics.SparseCategoricalAccuracy(), method="ablation", verbose=0)
    assert inst.attrs["baseline_metric"] == pytest.approx(by_name.attrs["baseline_metric"])


def test_bad_inputs():
    model = trained(MODEL_BUILDERS["functional"]())
    x, y = small_data()
    with pytest.raises(DataError, match="shape"):
        autoprec.profile(model, (x[:, :5], y), verbose=0)
    with pytest.raises(DataError, match="at least one sample"):
        autoprec.profile(model, (x[:0], y[:0]), verbose=0)
    with pytest.raises(DataError, match="class ids in \\[0, 2\\]"):
        autoprec.profile(model, (x, y + 5), verbose=0)
    with pytest.raises(DataError, match="same number of samples"):
        autoprec.profile(model, (x, y[:10]), verbose=0)
    with pytest.raises(DataError, match="tuple of arrays"):
        autoprec.profile(model, "data.npz", verbose=0)
    with pytest.raises(MetricError, match="higher_is_better"):
        autoprec.profile(model, (x, y), metric=lambda a, b: 0.0, verbose=0)
    with pytest.raises(MetricError, match="does not know"):
        autoprec.profile(model, (x, y), metric="no_such_metric", verbose=0)
    with pytest.raises(PolicyError, match="method"):
        autoprec.profile(model, (x, y), method="slow", verbose=0)
    with pytest.raises(PolicyError, match="target"):
        autoprec.profile(model, (x, y), target="float16", verbose=0)
    broken = MODEL_BUILDERS["functional"]()
    broken.get_layer("out").bias.assign(np.full((3,), np.nan, "float32"))
    with pytest.raises(DataError, match="finite float32"):
        autoprec.profile(broken, (x, y), verbose=0)


def test_progress_bar_and_silence(capsys):
    model = trained(MODEL_BUILDERS["sequential"]())
    autoprec.profile(model, small_data(), method="ablation", verbose=1)
    assert "unit" in capsys.readouterr().out
    autoprec.profile(model, small_data(), method="ablation", verbose=0)
    assert capsys.readouterr().out == ""
