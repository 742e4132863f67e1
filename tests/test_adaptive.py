"""AdaptivePrecision: the rules on hand-made statistics, then real fits on tiny models.

The growth model comes from ``examples/adaptive_training.py`` (one definition
for the example and the test): a frozen float32 head on targets of order 10^6,
so a trainable gain grows the activations of ``d2`` past float16's 65504
after about 100 steps.
"""

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import autoprec
from autoprec.adaptive import (
    CHECKS_FILE,
    HISTORY_FILE,
    POLICY_FILE,
    AdaptiveOptions,
    AdaptivePrecision,
    Change,
    Judge,
    float32_policies,
)
from autoprec.errors import ArgumentError, PolicyError, UnsupportedModelError
from autoprec.formats import get as get_format
from autoprec.report import pages as report
from autoprec.report import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
F16 = get_format("mixed_float16")


def _example():
    spec = importlib.util.spec_from_file_location("adaptive_example", ROOT / "examples" / "adaptive_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _example()


def _lso(lr=0.05):
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(lr))


def _scaled_mse(scale):
    return lambda t, p: keras.ops.mean(keras.ops.square((t - p) / scale))


# ---------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    "options",
    [
        {"check_every": 0},
        {"check_every": 2.5},
        {"check_every": True},
        {"batch_size": 0},
        {"patience": 0},
        {"cooldown": -1},
        {"skip_limit": 0},
        {"promote_at": 0},
        {"promote_at": 1.5},
        {"promote_at": "half"},
        {"demote_at": 0.5},
        {"demote_at": 0.0},
        {"demote_at": 0.6, "promote_at": 0.5},
        {"flush_share": 1.0},
        {"flush_share": -0.1},
        {"checkevery": 10},
    ],
)
def test_options_are_validated(options):
    with pytest.raises(ArgumentError, match="Expected"):
        AdaptivePrecision(data=(np.zeros((4, 2)), np.zeros(4)), **options)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"data": None, "demote": True}, ArgumentError),
        ({"target": "float16"}, ArgumentError),
        ({"demote": 1}, ArgumentError),
        ({"verbose": 2}, ArgumentError),
        ({"policy": 3}, PolicyError),
        ({"policy": {"d": "half"}}, PolicyError),
    ],
)
def test_arguments_are_validated(kwargs, error):
    kwargs = {"data": (np.zeros((4, 2)), np.zeros(4)), **kwargs}
    with pytest.raises(error, match="Expected"):
        AdaptivePrecision(**kwargs)


def test_defaults_and_accepted_forms():
    options = AdaptiveOptions()
    assert (options.check_every, options.promote_at, options.demote_at, options.flush_share) == (100, 0.5, 1 / 16, 0.01)
    policy = autoprec.PrecisionPolicy({"d": "mixed_float16"})

    class FakeResult:  # a TuneResult is accepted through its .policy
        pass

    result = FakeResult()
    result.policy = policy
    data = (np.zeros((4, 2)), np.zeros(4))
    assert AdaptivePrecision(result, data=data).policy == policy
    assert AdaptivePrecision({"d": "mixed_float16"}, data=data).policy == policy
    assert AdaptivePrecision(data=data).policy is None  # read from the model when training starts


# ---------------------------------------------------------------------------
# The rules, on hand-made statistics


def _judge(assignment, producers=None, **options):
    producers = producers or {p: () for p in assignment}
    return Judge(producers, assignment, F16, AdaptiveOptions(**options), demote=True)


SAFE = {"act_absmax": 10.0, "act_flush": 0.0, "grad_absmax": 1.0, "grad_flush": 0.0}


def test_promotes_on_own_overflow_before_it_happens():
    judge = _judge({"a": "mixed_float16", "b": "mixed_float16"})
    events = judge.decide({"a": {**SAFE, "act_absmax": 40000.0}, "b": SAFE}, step=7, epoch=1)
    assert [(e.layer, e.reason, e.statistic, e.node, e.step, e.epoch) for e in events] == [
        ("a", Change.OVERFLOW, "act_absmax", "a", 7, 1)
    ]
    assert events[0].value == 40000.0 and events[0].threshold == 0.5 * 65504
    assert judge.assignment == {"a": "float32", "b": "mixed_float16"}
    assert "act_absmax reached 4e+04 >= 3.28e+04" in events[0].why


def test_promotes_a_consumer_that_reads_an_overflowing_input():
    # b is float32 already but overflows; c reads it in float16 (Keras casts c's inputs to its compute dtype)
    judge = _judge({"b": "float32", "c": "mixed_float16"}, producers={"b": (), "c": ("b",)})
    events = judge.decide({"b": {**SAFE, "act_absmax": 1e5}, "c": SAFE}, step=1)
    assert [(e.layer, e.node, e.reason) for e in events] == [("c", "b", Change.OVERFLOW)]
    assert "input from `b`" in events[0].why


def test_promotes_on_flush_and_gradient_flush():
    judge = _judge({"a": "mixed_float16", "b": "mixed_float16", "c": "mixed_float16"})
    rows = {"a": {**SAFE, "act_flush": 0.02}, "b": {**SAFE, "grad_flush": 0.5}, "c": {**SAFE, "act_flush": 0.005}}
    assert {(e.layer, e.reason) for e in judge.decide(rows, step=1)} == {
        ("a", Change.UNDERFLOW),
        ("b", Change.GRAD_UNDERFLOW),
    }


def test_gradient_overflow_counts_only_with_skipped_steps():
    rows = {"a": {**SAFE, "grad_absmax": 1e5}}
    assert _judge({"a": "mixed_float16"}).decide(rows, step=1, skipped=1) == []  # the loss scale's business
    events = _judge({"a": "mixed_float16"}).decide(rows, step=1, skipped=3, scale_ratio=1.0)
    assert [e.reason for e in events] == [Change.GRAD_OVERFLOW]


def test_unexplained_trouble_blames_the_layer_closest_to_the_limits():
    rows = {"a": {**SAFE, "act_absmax": 100.0}, "b": {**SAFE, "act_absmax": 9000.0}}
    events = _judge({"a": "mixed_float16", "b": "mixed_float16"}).decide(rows, step=1, skipped=5)
    assert [(e.layer, e.reason, e.value) for e in events] == [("b", Change.SKIPPED_STEPS, 5.0)]
    events = _judge({"a": "mixed_float16", "b": "mixed_float16"}).decide(rows, step=1, nonfinite_loss=True)
    assert [(e.layer, e.reason) for e in events] == [("b", Change.NONFINITE_LOSS)]


def test_without_statistics_trouble_returns_every_16bit_layer():
    judge = _judge({"a": "mixed_float16", "b": "mixed_float16", "c": "float32"})
    events = judge.decide({}, step=3, nonfinite_loss=True)
    assert sorted(e.layer for e in events) == ["a", "b"] and judge.assignment["c"] == "float32"


def test_demotes_after_patience_safe_checks_and_resets_on_an_unsafe_one():
    judge = _judge({"a": "float32"}, patience=3)
    assert judge.decide({"a": SAFE}, step=1) == [] and judge.decide({"a": SAFE}, step=2) == []
    assert judge.decide({"a": {**SAFE, "act_absmax": 5000.0}}, step=3) == []  # over 65504/16: the count restarts
    assert judge.decide({"a": SAFE}, step=4) == [] and judge.decide({"a": SAFE}, step=5) == []
    events = judge.decide({"a": SAFE}, step=6)
    assert [(e.layer, e.direction, e.reason, e.after) for e in events] == [
        ("a", "demote", Change.SAFE_RANGE, "mixed_float16")
    ]
    assert events[0].value <= events[0].threshold == 65504 / 16


def test_unobserved_or_overflowing_gradient_layers_are_not_demoted():
    judge = _judge({"a": "float32", "b": "float32"}, patience=1)
    assert judge.decide({"b": {**SAFE, "grad_absmax": 70000.0}}, step=1) == []


def test_a_failed_retry_goes_back_and_cools_down():
    judge = _judge({"a": "float32"}, patience=1, cooldown=4)
    assert [e.after for e in judge.decide({"a": SAFE}, step=1)] == ["mixed_float16"]
    events = judge.decide({"a": SAFE}, step=2, skipped=3)  # trouble while on probation, no statistic to blame
    assert [(e.layer, e.reason, e.after) for e in events] == [("a", Change.RETRY_FAILED, "float32")]
    for step in range(3, 7):  # cooling down: safe, but not retried
        assert judge.decide({"a": SAFE}, step=step) == []
    assert [e.after for e in judge.decide({"a": SAFE}, step=7)] == ["mixed_float16"]


# ---------------------------------------------------------------------------
# Real fits


def _growth_run(weights, data, policy, callback=None, epochs=20):
    model, history = example.train(weights, policy, data, epochs=epochs, callback=callback)
    return model, history["loss"], history


@pytest.fixture(scope="module")
def growth():
    """The example's model trained three ways from the same weights: float32, float16, float16 with the callback."""
    keras.utils.set_random_seed(0)
    data = example.growing_data()
    weights = example.growing_model().get_weights()
    callback = AdaptivePrecision(data=data, verbose=0)
    runs = {
        "float32": _growth_run(weights, data, "float32"),
        "float16": _growth_run(weights, data, "mixed_float16"),
        "adaptive": _growth_run(weights, data, "mixed_float16", callback),
    }
    return runs, callback


@pytest.mark.slow
def test_growth_breaks_float16_and_the_callback_fixes_it(growth):
    runs, callback = growth
    f16_model, f16_loss, _ = runs["float16"]
    assert not math.isfinite(f16_loss[-1])  # every step after the first overflow overflows again...
    assert float(f16_model.optimizer.dynamic_scale.numpy()) < 2.0**-20  # ...and each one halved the scale
    f32_loss, adaptive_loss = runs["float32"][1][-1], runs["adaptive"][1][-1]  # 0.0102 and 0.0107 when written
    assert math.isfinite(adaptive_loss) and abs(adaptive_loss - f32_loss) <= 0.10 * f32_loss
    history = callback.history
    assert list(history["layer"]) == ["d2"] and set(history["direction"]) == {"promote"}
    assert history["reason"].iloc[0] == Change.OVERFLOW and history["value"].iloc[0] >= 0.5 * 65504
    assert callback.policy["d2"] == "float32" and callback.policy["d1"] == "mixed_float16"


@pytest.mark.slow
def test_growth_run_keeps_optimizer_scale_and_one_trace(growth):
    runs, callback = growth
    model = runs["adaptive"][0]
    assert model.get_layer("d2").compute_dtype == "float32" and model.get_layer("gain").compute_dtype == "float16"
    assert callback._run.sampler.traces == 1  # the statistics pass never retraced, across checks and a change
    checks = callback.checks
    event_step = int(callback.history["step"].iloc[0])
    at_change = checks[(checks["step"] == event_step) & (checks["trigger"] != "epoch_end")].iloc[0]
    assert at_change["skipped_steps"] >= 1 and at_change["loss_scale"] == 2.0**15  # restored after the halving
    sampled = checks[checks["trigger"].isin(["scheduled", "nonfinite_loss"])]
    assert len(sampled) <= 320 // 100 + 1 and (np.diff(sampled["step"]) == 100).all()  # never every step
    assert int(model.optimizer.iterations.numpy()) >= 320 - 3  # the same optimizer went on stepping
    logs = runs["adaptive"][2]  # the events reach the Keras logs (and so History, CSVLogger, TensorBoard)
    event_epoch = int(callback.history["epoch"].iloc[0])
    assert logs["autoprec_changes"][event_epoch] == 1.0 and sum(logs["autoprec_changes"]) == 1.0
    assert logs["autoprec_16bit_layers"][-1] == 2.0 and logs["autoprec_loss_scale"][-1] >= 2.0**15


@pytest.mark.slow
def test_a_callback_without_data_watches_the_training_it_is_given(growth):
    """Issue 20: callbacks=[AdaptivePrecision(check_every=10)] as a user writes it: no data=, and float16 still trains."""
    runs, _ = growth
    keras.utils.set_random_seed(0)
    data = example.growing_data()
    weights = example.growing_model().get_weights()
    callback = AdaptivePrecision(check_every=10, verbose=0)
    _, loss, _ = _growth_run(weights, data, "mixed_float16", callback)
    f32_loss = runs["float32"][1][-1]
    assert math.isfinite(loss[-1]) and abs(loss[-1] - f32_loss) <= 0.10 * f32_loss
    history = callback.history
    assert "d2" in set(history["layer"]) and set(history["direction"]) == {"promote"}  # the overflowing layer went back
    assert callback._run.sampler is None  # no statistics without data: the loss scale and skipped steps decided


def test_sequential_promotes_a_layer_past_the_threshold(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = example.growing_data(n=128)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="d1"),
            example.Gain(name="gain"),
            keras.layers.Dense(16, name="d2"),
            keras.layers.Dense(1, name="out", trainable=False),
        ],
        name="seq",
    )
    model.get_layer("gain").s.assign(np.log(4e4))
    model.compile(_lso(1e-3), example.relative_mse)
    callback = AdaptivePrecision(
        {"d1": "mixed_float16", "gain": "mixed_float16", "d2": "mixed_float16"}, data=(x, y), check_every=2, verbose=0
    )
    csv = tmp_path / "log.csv"  # a later callback sees the events in the logs (CSVLogger, TensorBoard, History)
    history = model.fit(
        x,
        y,
        epochs=2,
        batch_size=32,
        verbose=0,
        validation_data=(x, y),
        callbacks=[callback, keras.callbacks.CSVLogger(str(csv))],
    )
    # gain (about 4e4) and d2 (about 6e4) are past half of 65504 at the first check: promoted before they overflow
    assert set(callback.history["layer"]) == {"gain", "d2"} and set(callback.history["reason"]) == {Change.OVERFLOW}
    assert (callback.checks["skipped_steps"].fillna(0) == 0).all() and callback.history["step"].max() == 2
    assert model.get_layer("d2").compute_dtype == "float32" and model.get_layer("d1").compute_dtype == "float16"
    assert math.isfinite(history.history["loss"][-1]) and math.isfinite(history.history["val_loss"][-1])
    assert history.history["autoprec_16bit_layers"] == [1.0, 1.0] and history.history["autoprec_changes"] == [2.0, 0.0]
    assert "autoprec_changes" in csv.read_text().splitlines()[0]


@pytest.mark.slow
def test_demotion_after_a_warm_up():
    """Layers kept float32 while the gain is large go to float16 one by one as their statistics allow."""
    keras.utils.set_random_seed(0)
    x, y = example.growing_data()
    y = y / 1e4  # targets of order 100: Adam shrinks the gain, the only trainable part, by ~0.05 per step
    model = example.growing_model()
    model.get_layer("gain").s.assign(np.log(1e4))
    model.get_layer("d1").trainable = model.get_layer("d2").trainable = False
    optimizer = _lso()
    model.compile(optimizer, _scaled_mse(1000.0))
    optimizer.build(model.trainable_variables)
    optimizer.dynamic_scale.assign(2.0**20)  # as if it had grown while every layer was float32
    callback = AdaptivePrecision(data=(x, y), demote=True, target="mixed_float16", check_every=10, verbose=0)
    model.fit(x, y, epochs=10, batch_size=32, verbose=0, callbacks=[callback], shuffle=False)
    history = callback.history
    assert set(history["direction"]) == {"demote"} and set(history["reason"]) == {Change.SAFE_RANGE}
    assert {layer: callback.policy[layer] for layer in ("d1", "gain", "d2")} == dict.fromkeys(
        ("d1", "gain", "d2"), "mixed_float16"
    )
    assert (history["value"] <= history["threshold"]).all()
    steps = dict(zip(history["layer"], history["step"], strict=True))
    patience_steps = AdaptiveOptions().patience * 10
    assert steps["gain"] > patience_steps and steps["d2"] > patience_steps  # they waited for the gain to shrink
    checks = callback.checks
    first = min(steps.values())
    assert checks[checks["step"] < first]["loss_scale"].min() == 2.0**20
    assert checks[checks["step"] >= first]["loss_scale"].max() <= 2.0**15  # capped when float16 layers returned
    assert callback.policy["out"] == "float32"  # the output stays float32


def test_keep_float32_pins_a_layer_and_bfloat16_needs_no_loss_scale():
    x, y = example.growing_data(n=64)
    y = y / 1e6
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, activation="relu", name="a"),
            keras.layers.Dense(8, activation="relu", name="b"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile("adam", "mse")
    callback = AdaptivePrecision(
        data=(x, y), demote=True, target="mixed_bfloat16", keep_float32=["a"], check_every=1, patience=1, verbose=0
    )
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    assert list(callback.history["layer"]) == ["b"] and callback.policy["b"] == "mixed_bfloat16"
    assert model.get_layer("a").compute_dtype == "float32" and model.get_layer("b").compute_dtype == "bfloat16"
    with pytest.raises(ArgumentError, match="keep_float32"):
        AdaptivePrecision(data=(x, y), keep_float32=3)


def test_checks_keep_their_cadence_across_fit_calls():
    x, y = example.growing_data(n=32)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(1, name="out")])
    model.compile(_lso(1e-3), example.relative_mse)
    callback = AdaptivePrecision({"a": "mixed_float16"}, data=(x, y), check_every=3, batch_size=16, verbose=0)
    for _ in range(3):  # 2 steps each
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    checks = callback.checks
    assert list(checks[checks["trigger"] == "scheduled"]["step"]) == [3, 6]
    assert (checks["skipped_steps"].dropna() == 0).all()


def test_float16_without_loss_scale_optimizer_is_refused():
    x, y = example.growing_data(n=64)
    model = example.growing_model()
    model.compile("adam", example.relative_mse)
    with pytest.raises(ArgumentError, match="LossScaleOptimizer"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdaptivePrecision({"d1": "mixed_float16"}, data=(x, y))])
    with pytest.raises(ArgumentError, match="demote=True may move layers to float16"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdaptivePrecision(data=(x, y), demote=True)])
    callback = AdaptivePrecision({"d1": "mixed_bfloat16"}, data=(x, y), check_every=1, verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])  # bfloat16 needs no loss scale
    assert model.get_layer("d1").compute_dtype == "bfloat16" and len(callback.checks) >= 2


@keras.saving.register_keras_serializable(package="autoprec_adaptive_tests")
class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(16, activation="tanh", name="sub_d1")
        self.gain = example.Gain(name="sub_gain")
        self.d2 = keras.layers.Dense(16, name="sub_d2")
        self.head = keras.layers.Dense(1, name="sub_out")

    def call(self, x):
        return self.head(self.d2(self.gain(self.d1(x))))


def test_subclassed_model_acts_on_signals_and_keeps_the_optimizer():
    keras.utils.set_random_seed(0)
    x, y = example.growing_data(n=128)
    model = _Subclassed(name="subclassed")
    model(x[:1])
    model.gain.s.assign(np.log(1e6))  # d2 overflows float16 at once
    optimizer = _lso(1e-3)
    model.compile(optimizer, example.relative_mse)
    policy = {"sub_d1": "mixed_float16", "sub_gain": "mixed_float16", "sub_d2": "mixed_float16"}
    with pytest.raises(UnsupportedModelError, match="demote=True"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdaptivePrecision(policy, data=(x, y), demote=True)])
    callback = AdaptivePrecision(policy, data=(x, y), verbose=0)
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[callback])
    assert set(callback.history["layer"]) == set(policy) and set(callback.history["reason"]) == {Change.NONFINITE_LOSS}
    assert all(layer.compute_dtype == "float32" for layer in (model.d1, model.gain, model.d2))
    assert math.isfinite(history.history["loss"][-1])
    # No float16 layer is left, and the LossScaleOptimizer stays: same object, its Adam state kept.
    assert model.optimizer is optimizer and int(optimizer.iterations.numpy()) >= 7
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**15


def test_float32_policies_restores_the_policies():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3, name="a", dtype="mixed_float16"), keras.layers.Dense(1, name="b")]
    )
    with float32_policies(model):
        assert model.get_layer("a").compute_dtype == "float32"
    assert model.get_layer("a").dtype_policy.name == "mixed_float16"


# ---------------------------------------------------------------------------
# Saving and the report


def test_save_writes_history_policy_and_a_timeline_report(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = example.growing_data(n=64)
    model = example.growing_model()
    model.get_layer("gain").s.assign(np.log(1e5))
    model.compile(_lso(1e-3), example.relative_mse)
    callback = AdaptivePrecision(
        {"d1": "mixed_float16", "gain": "mixed_float16", "d2": "mixed_float16"}, data=(x, y), check_every=1, verbose=0
    )
    with pytest.raises(ArgumentError, match="before fit"):
        callback.save(tmp_path / "early")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[callback])
    paths = callback.save(tmp_path / "run")
    names = {os.path.basename(p) for p in paths}
    assert {POLICY_FILE, HISTORY_FILE, CHECKS_FILE, "report.md", "report.html", "timeline.png"} <= names
    assert autoprec.PrecisionPolicy.load(tmp_path / "run" / POLICY_FILE) == callback.policy
    assert report.ADAPTIVE_FILES == (HISTORY_FILE, CHECKS_FILE)  # the report's spelling of the file names
    saved = report.load_saved(tmp_path / "run")
    data = plots.timeline_data(saved)
    assert set(data["lanes"]) == set(callback.history["layer"])
    for spans in data["lanes"].values():
        assert spans[0][0] == 0 and spans[-1][1] == data["last_step"] and spans[-1][2] == "float32"
    text = (tmp_path / "run" / "report.md").read_text()
    assert "Adaptive precision during training" in text and "`d2`" in text and "OVERFLOW" in text
    assert (tmp_path / "run" / "timeline.png").stat().st_size > 5000
    from autoprec.cli import main

    assert main(["report", str(tmp_path / "run")]) == 0  # `autoprec report DIR` regenerates it


@pytest.mark.slow
def test_example_runs_in_fast_mode():
    env = {**os.environ, "AUTOPREC_EXAMPLES_FAST": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "adaptive_training.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split("  ")[0]: line for line in out.stdout.splitlines()}
    assert "promote 'd2'" in out.stdout
    assert "inf" in lines["float16"] and "inf" not in lines["float16 + AdaptivePrecision"]
