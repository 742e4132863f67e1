import math

import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS, small_data, trained

import autoprec
from autoprec import testing
from autoprec.errors import ArgumentError, DataError, MetricError, ModelError
from autoprec.profiling.sensitivity import STATS_SAMPLES


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_planted_fragile_layers_rank_first(planted, target):
    model, _, val, fragile = planted
    frame = autoprec.profile(model, val, target=target, verbose=0)
    units = frame[frame["decision_unit"] & (frame["pinned"] == "")]
    top = list(units["path"][: len(fragile[target])])
    assert sorted(top) == sorted(fragile[target])
    assert (units.set_index("path").loc[fragile[target], "ablation"] == "alone").all()
    benign = units[~units["path"].isin(fragile[target])]
    # benign units were cleared alone or with their group: no drop either way
    assert (benign["metric_drop"].fillna(benign["group_drop"]) <= 0.0).all()
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
    assert frame.loc["d3", "sqnr_db"] <= 0 < frame.loc["d1", "sqnr_db"]  # no signal left at d3
    assert "metric_drop" not in frame  # fast: no ablation
    assert frame.attrs["passes"] == 1
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
    model = testing.mlp(depth=52, width=8, inputs=6, classes=3)
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
    fn = autoprec.profile(
        model,
        data,
        metric=lambda yt, yp: float(np.mean(np.argmax(yp, -1) == yt)),
        higher_is_better=True,
        method="ablation",
        verbose=0,
    )
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
    with pytest.raises(ArgumentError, match="method"):
        autoprec.profile(model, (x, y), method="slow", verbose=0)
    with pytest.raises(ArgumentError, match="target"):
        autoprec.profile(model, (x, y), target="float16", verbose=0)
    broken = MODEL_BUILDERS["functional"]()
    broken.get_layer("out").bias.assign(np.full((3,), np.nan, "float32"))
    with pytest.raises(ModelError, match="finite weights.*'out'"):
        autoprec.profile(broken, (x, y), verbose=0)


def test_progress_bar_and_silence(capsys):
    model = trained(MODEL_BUILDERS["sequential"]())
    autoprec.profile(model, small_data(), verbose=1)
    out = capsys.readouterr().out
    assert "autoprec: statistics" in out and "autoprec: ablation" in out and "ETA" in out or "pass" in out
    autoprec.profile(model, small_data(), method="ablation", verbose=0)
    assert capsys.readouterr().out == ""


def _slightly_sensitive_mlp():
    """16 Dense layers; seven linear ones carry a small planted offset, so their region loses a little in bfloat16."""
    (x_train, y_train), val = testing.digits_data(flat=True)
    keras.utils.set_random_seed(0)
    x_in = keras.Input((64,))
    h = x_in
    for k in range(1, 17):
        h = keras.layers.Dense(32, activation=None if k % 2 == 0 else "relu", name=f"d{k}")(h)
    model = keras.Model(x_in, keras.layers.Dense(10, activation="softmax", name="out")(h))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    testing.train(model, x_train, y_train, epochs=12)
    for k in range(2, 16, 2):
        testing.plant_offset(model, f"d{k}", f"d{k + 1}", offset=24.0)
    model.predict_function = None
    return model, val


@pytest.mark.slow
def test_group_testing_catches_many_slightly_sensitive_units():
    """Layers that each lose a little alone are never hidden in a cleared group.

    The ground truth is one pass per layer. Every layer whose drop alone
    exceeds one point must come out of the group testing alone, with the
    same drop, and the tuned policy must still meet the budget. (Below a
    point, a few samples, rounding in neighbouring layers interacts: two
    layers together may lose fewer samples than one alone.)
    """
    from autoprec.session import open_session

    model, val = _slightly_sensitive_mlp()
    session = open_session(model, val, target="mixed_bfloat16")
    eligible = [i.path for i in session.graph.eligible]
    truth = {p: session.evaluate({**{q: "float32" for q in eligible}, p: "mixed_bfloat16"}).drop for p in eligible}
    slight = [p for p, d in truth.items() if 0.01 < d < 0.05]
    assert len(slight) >= 4, truth  # many layers, each only slightly sensitive (1 to 5 points)
    tolerance = 0.005 / 4
    frame = autoprec.profile(model, val, target="mixed_bfloat16", tolerance=tolerance, verbose=0).set_index("path")
    for path, drop in truth.items():
        if drop > 0.01:
            assert frame.loc[path, "ablation"] == "alone", (path, drop)
            assert frame.loc[path, "metric_drop"] == pytest.approx(drop)
    result = autoprec.tune(model, val, budget="0.5%", target="mixed_bfloat16", n_trials=30, verbose=0)
    assert result.feasible and result.drop <= 0.005
    assert result.n_16bit >= len(eligible) // 3  # the rest still runs in 16-bit


def test_statistics_stream_in_micro_batches_and_aggregate_exactly(planted, monkeypatch):
    """The statistics pass holds one micro-batch at a time; any micro-batch gives the same totals."""
    from autoprec import backends

    model, _, val, _ = planted
    seen = []
    original = backends.compile_function

    def recording(fn, **options):
        compiled = original(fn, **options)

        def call(*args):
            seen.append(len(args[-1]))  # the labels of the micro-batch, outside the trace
            return compiled(*args)

        return call

    monkeypatch.setattr(backends, "compile_function", recording)
    sampled = autoprec.profile(model, val, method="fast", profile_batch_size=7, verbose=0)
    assert sum(n for n in seen if n <= 7) == sampled.attrs["statistics_samples"] == STATS_SAMPLES < len(val[1])
    seen.clear()
    small = autoprec.profile(model, val, method="fast", profile_batch_size=7, stats_samples=None, verbose=0)
    small = small.set_index("path")
    stats_calls = [n for n in seen if n <= 7]
    assert max(stats_calls) == 7 and sum(stats_calls) == len(val[1])
    large = autoprec.profile(
        model, val, method="fast", profile_batch_size=512, stats_samples=None, verbose=0
    ).set_index("path")
    small = small.loc[large.index]
    # Another micro-batch is another summation order in the kernels: each value may move by float32 rounding
    # relative to the largest value it is computed beside (a loss gradient p - 1 of a confident sample is resolved to
    # 2^-24 of the gradients that matter, not to 2^-24 of itself), so the floor is eps32 times the column's largest.
    eps32 = float(np.finfo(np.float32).eps)

    def close(column, rtol):
        a, b = small[column].astype(float), large[column].astype(float)
        finite = np.isfinite(b)
        assert (np.isfinite(a) == finite).all(), column
        floor = eps32 * float(np.abs(b[finite]).max())
        np.testing.assert_allclose(a[finite], b[finite], rtol=rtol, atol=max(floor, 1e-30), err_msg=column)

    for column in ("act_absmax", "act_overflow", "grad_flush", "grad_absmax", "grad_scaled_flush"):
        close(column, 1e-4)
    close("score", 1e-3)
    # weight gradients sum over a batch: a micro-batch's part is scaled up, so they agree in order of magnitude, not exactly
    ratio = small["wgrad_absmax"].dropna().astype(float) / large["wgrad_absmax"].dropna().astype(float)
    assert ratio.between(0.1, 10).all()  # the same order of magnitude


def test_weightless_layers_rank_among_units(planted_weightless):
    """One ranking: the weightless hazards sit at the top by the same measures, each row says what kind it is."""
    model, _, val, fragile = planted_weightless
    frame = autoprec.profile(model, val, target="mixed_float16", verbose=0)
    eligible = frame[frame["eligible"]]
    top = set(eligible["path"][:4])
    assert top <= set(fragile["mixed_float16"]), top
    kinds = frame.set_index("path")["kind"]
    assert kinds["exp"] == "decision" and kinds["up"] == "decision"  # risk of their own
    assert kinds["relu2"] in ("joined", "decision") and kinds["d1"] == "decision" and kinds["out"] == "pinned"
    assert (frame.set_index("path").loc[["exp", "up"], "act_overflow"] > 0).all()


def test_a_rare_overflow_is_found_when_the_gradients_read_fewer_samples():
    """Issue 27: where a sample's tape is large the gradients read few samples; the activation peaks still read
    all 256 in a forward scan, so an overflow that 4% of the inputs cause is found, with the share a full
    statistics pass over the same samples counts."""
    from autoprec import testing

    (x_train, y_train), (x_val, y_val) = testing.digits_data(flat=True)
    model = testing.train(testing.mlp(depth=5), x_train, y_train, epochs=10)
    testing.plant_overflow(model, "d3", "d4", x_val, peak=7.2e4, quantile=0.96)
    few = autoprec.profile(model, (x_val, y_val), target="mixed_float16", method="fast", gradient_samples=8, verbose=0)
    assert few.attrs["statistics_samples"] == STATS_SAMPLES and few.attrs["gradient_samples"] == 8
    full = autoprec.profile(
        model, (x_val, y_val), target="mixed_float16", method="fast", gradient_samples=None, verbose=0
    )
    assert full.attrs["gradient_samples"] == STATS_SAMPLES
    few, full = few.set_index("path"), full.set_index("path")
    assert few.loc["d3", "act_overflow"] > 0 and few.loc["d3", "act_absmax"] > 65504
    assert few.loc["d3", "act_overflow"] == pytest.approx(full.loc["d3", "act_overflow"])
    assert few.loc["d3", "act_absmax"] == pytest.approx(full.loc["d3", "act_absmax"], rel=1e-6)
    assert few.loc["d3", ["grad_flush", "score"]].notna().all()  # the gradients are still measured


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_tensors_of_one_shape_reduced_as_one_matrix_give_each_tensor_its_own_statistics(monkeypatch, target):
    """The statistics step and the forward peak scan reduce same-shaped tensors as the rows of one matrix, in
    chunks: every tensor must still get exactly the statistics it gets alone (overflow, flush, NaN and inf
    counted per tensor, the peak its own), in the tensors' order."""
    from autoprec.formats import get
    from autoprec.profiling import stats

    monkeypatch.setattr(stats, "EACH_ELEMENTS", 4)  # every tensor here counts as large
    monkeypatch.setattr(stats, "STACK_ELEMENTS", 24)  # chunks of at most two (4, 3)-shaped samples
    rng = np.random.default_rng(0)
    fmt = get(target)
    shapes = [(3, 4, 3), (3, 5), (3, 4, 3), (3, 4, 3), (3, 5), (3, 4, 3), (3, 2, 3)]
    tensors = []
    for i, shape in enumerate(shapes):
        t = rng.normal(size=shape) * 10.0 ** rng.integers(-44, 6, size=shape)
        if i == 2:
            t.flat[[1, 5]] = [np.nan, -np.inf]
        if i == 3:
            t.flat[0] = 3.4e38 if target == "mixed_bfloat16" else 7e4  # past the format's largest finite value
        tensors.append(t.astype("float32"))
    scales = (1.0, 1024.0)
    together = [np.asarray(r) for r in stats.table(tensors, fmt, scales)]
    for s, scale in enumerate(scales):
        alone = np.stack([np.asarray(stats.tensor_stats(t, fmt, scale)) for t in tensors])
        np.testing.assert_allclose(together[s], alone, rtol=1e-6)
    peaks = np.asarray(stats.peak_table(tensors, fmt))
    np.testing.assert_allclose(peaks, np.stack([np.asarray(stats.peak_row(t, fmt)) for t in tensors]), rtol=1e-6)
    assert peaks[3, 3] >= 1 and peaks[2, 6] == 2  # the overflow and the non-finite values, in their own rows


def test_padding_weighed_zero_moves_no_gradient_statistic():
    """The gradients are those of the loss training weighs: under a padding mask, a padded position's huge
    error (its label is filler) must not make a layer's gradients look like they overflow."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 4))
    h = keras.layers.Dense(8, activation="relu", name="h")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10, 4)).astype("float32")
    mask = (np.arange(10)[None] < rng.integers(3, 8, size=64)[:, None]).astype("float32")
    y = np.where(mask[..., None] > 0, 0.0, 1e4).astype("float32")  # filler labels far off on the padding
    plain = autoprec.profile(model, (x, y), method="fast", verbose=0).set_index("path")
    masked = autoprec.profile(model, (x, y, mask), method="fast", verbose=0).set_index("path")
    assert plain.loc["h", "grad_absmax"] > 100 * masked.loc["h", "grad_absmax"] > 0
