import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS, THREE_WAY, small_data, trained

import autoprec
from autoprec.decisions import Reason as reasons
from autoprec.errors import ArgumentError, BudgetError, DataError, PolicyError, StudyError, UntrainedModelError
from autoprec.graph import keyed_layers

HERE = os.path.dirname(__file__)


def other_flops_share(result, fragile):
    units = result.units
    others = units[~units["path"].isin(fragile)]
    low = others[others["decision"].isin(["mixed_float16", "mixed_bfloat16"])]
    return low["flops"].sum() / others["flops"].sum()


@pytest.mark.parametrize("target", ["mixed_float16", "mixed_bfloat16"])
def test_planted_regions_end_float32_and_the_rest_16bit(planted, target, tmp_path):
    """The planted hazards, on every backend (make test-jax runs it without TensorFlow)."""
    model, _, val, fragile = planted
    result = autoprec.tune(model, val, budget="0.5%", target=target, device="gpu", n_trials=30, verbose=0)
    decisions = result.sensitivity.set_index("path")["decision"]
    assert all(decisions[p] == "float32" for p in fragile[target])
    assert other_flops_share(result, fragile[target]) >= 0.9
    # verified for real with Keras policies on this device
    assert result.verification["feasible"] and result.drop <= 0.005
    tuned = keyed_layers(result.model)
    assert all(tuned[p].compute_dtype == "float32" for p in fragile[target])
    assert isinstance(result.model.optimizer, keras.optimizers.LossScaleOptimizer) == (target == "mixed_float16")
    why = result.sensitivity.set_index("path")["reason"]
    assert why["out"] == reasons.PINNED_OUTPUT
    if target == "mixed_float16":
        assert why["d3"] == reasons.OVERFLOW
    assert repr(result).startswith("TuneResult(metric=") and "trials=" in repr(result)
    assert "verified with Keras policies" in result.summary()
    x, y = val
    # Fine-tuning at a small rate: Adam's first steps of 2e-3 move every weight by about 2e-3, which
    # undoes the planted region's scaling (its layer after the overflow has weights near 1e-6) in any precision.
    optimizer = result.model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (target == "mixed_float16")
    getattr(optimizer, "inner_optimizer", optimizer).learning_rate.assign(1e-6)
    history = result.model.fit(x, y, epochs=1, batch_size=64, verbose=0)  # trains, loss-scaled in float16
    assert np.isfinite(history.history["loss"]).all()
    result.model.save(tmp_path / "tuned.keras")
    reloaded = keras.saving.load_model(tmp_path / "tuned.keras")
    assert [layer.compute_dtype for layer in reloaded.layers] == [layer.compute_dtype for layer in result.model.layers]
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), result.model.predict(x, verbose=0))


def test_cost_in_passes_is_reported_per_stage(planted, tmp_path, capsys):
    """Issue 27: every stage's cost in warm float32 passes, in the result, the progress line and the report."""
    model, _, val, _ = planted
    result = autoprec.tune(model, val, budget="0.5%", target="mixed_bfloat16", device="gpu", n_trials=10, verbose=1)
    cost = result.cost_in_passes
    assert {"open", "profile", "search", "split", "verify", "total"} <= set(cost)
    assert all(v >= 0 for v in cost.values()) and cost["total"] >= cost["search"] > 0
    assert cost["total"] == pytest.approx(sum(v for k, v in cost.items() if k != "total"), abs=0.1)
    assert result.stats["pass_seconds"] > 0
    assert "cost in float32 passes over the data: open " in capsys.readouterr().out
    result.save(tmp_path)
    assert "Cost in float32 passes" in (tmp_path / "report.md").read_text()


def test_bfloat16_on_a_cpu_without_fast_bf16_is_tuned_for_the_accelerator(planted, monkeypatch, capsys):
    """Issue 22: the tuning CPU's kind never decides the policy unless asked (device='this'), and the message is true."""
    from autoprec.backends import FAST_BF16_ENV

    model, _, val, fragile = planted
    monkeypatch.setenv(FAST_BF16_ENV, "0")  # as on a CPU without AVX512_BF16/AMX, whatever this one has
    result = autoprec.tune(model, val, budget="0.5%", target="mixed_bfloat16", n_trials=30, verbose=1)
    assert result.device == "gpu" and result.feasible
    assert other_flops_share(result, fragile["mixed_bfloat16"]) >= 0.9
    local = autoprec.tune(model, val, budget="0.5%", target="mixed_bfloat16", device="this", n_trials=30, verbose=1)
    assert local.device == "cpu_no_bf16" and local.n_16bit == 0
    said = capsys.readouterr().out
    assert "cost model for a cpu_no_bf16 (device='this'" in said
    assert "rates mixed_bfloat16 at 0.8x" in said and "pass device='gpu'" in said
    assert "no assignment with a decision in 16-bit met the budget" not in said  # it would be false


def test_three_way_candidates_put_overflow_layers_in_bfloat16(planted):
    model, _, val, _ = planted
    result = autoprec.tune(
        model,
        val,
        budget="0.5%",
        target="mixed_float16",
        candidates=("float32", "mixed_bfloat16", "mixed_float16"),
        n_trials=40,
        verbose=0,
    )
    policy = result.policy
    assert policy["d3"] == policy["d4"] == "mixed_bfloat16"  # bf16 has float32's range: no overflow
    assert policy["d1"] in ("mixed_float16", "mixed_bfloat16")  # as fast either way; fewer casts decide
    assert result.verification["feasible"]
    ruled = result.sensitivity.set_index("path")
    assert (ruled.loc[["d3", "d4"], "metric_drop"] > 0.005).all()  # ruled out of float16 by the ablation


def test_layers_that_alone_break_the_budget_are_ruled_out_of_the_search(planted, tmp_path):
    """Issue 27: a layer whose ablation alone (every other layer float32) loses more than the budget is ruled out
    of float16 for the whole search: the first trial already meets the budget, and the study records the ruling."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    model, _, val, fragile = planted
    journal = str(tmp_path / "j.log")
    result = autoprec.tune(
        model, val, budget="0.5%", target="mixed_float16", storage=journal, study_name="r", verbose=0
    )
    study = optuna.load_study(study_name="r", storage=optuna.storages.JournalStorage(JournalFileBackend(journal)))
    ruled = set(study.user_attrs["ruled_out"]["keys"])
    assert study.user_attrs["ruled_out"]["budget"].startswith("0.005")  # ruled under this budget, and for it only
    frame = result.sensitivity.set_index("path")
    assert set(fragile["mixed_float16"]) <= ruled
    assert all(frame.loc[p, "metric_drop"] > 0.005 and frame.loc[p, "ablation"].startswith("alone") for p in ruled)
    first = result.trials.sort_values("trial").iloc[0]
    assert first["phase"] == "all_16bit" and first["feasible"] and result.stats["evaluations"] <= 3
    assert all(result.policy[p] == "float32" for p in ruled)
    assert result.verification["feasible"] and other_flops_share(result, sorted(ruled)) >= 0.9


def test_a_study_resumed_under_a_looser_budget_rules_again(planted, tmp_path):
    """A ruling holds for the budget it was made under: resumed under 5%, layers that lose 1-2 points alone are
    searched again, and only those that lose more than 5% stay ruled out."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    model, _, val, _ = planted
    journal = str(tmp_path / "j.log")
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    rulings = []
    for budget in ("0.5%", "5%"):
        result = autoprec.tune(
            model, val, budget=budget, target="mixed_float16", storage=journal, study_name="b", n_trials=8, verbose=0
        )
        rulings.append(optuna.load_study(study_name="b", storage=storage).user_attrs["ruled_out"])
    frame = result.sensitivity.set_index("path")
    tight, loose = (set(r["keys"]) for r in rulings)
    assert loose < tight and all(frame.loc[p, "metric_drop"] > 0.05 for p in loose)
    assert rulings[1]["budget"].startswith("0.05") and result.feasible


def test_same_seed_same_policy(planted):
    model, _, val, _ = planted
    a = autoprec.tune(model, val, budget="1%", target="mixed_float16", n_trials=20, seed=3, verbose=0)
    b = autoprec.tune(model, val, budget="1%", target="mixed_float16", n_trials=20, seed=3, verbose=0)
    assert a.policy == b.policy
    assert list(a.trials["float32_units"]) == list(b.trials["float32_units"])


def test_resume_after_exception(planted, tmp_path, monkeypatch):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from autoprec.search import plan as search

    model, _, val, _ = planted
    reference = autoprec.tune(
        model, val, budget="0.5%", target="mixed_float16", candidates=THREE_WAY, n_trials=25, verbose=0
    )
    storage = str(tmp_path / "journal.log")
    original = search.Search._measure
    seen = []

    class Interrupt(Exception):
        pass

    def flaky(self, key, assignment):
        if key not in self.cache:  # a search trial about to be evaluated
            if len(seen) == 5:
                raise Interrupt()
            seen.append(key)
        return original(self, key, assignment)

    options = dict(budget="0.5%", target="mixed_float16", candidates=THREE_WAY, n_trials=25, verbose=0)
    monkeypatch.setattr(search.Search, "_measure", flaky)
    with pytest.raises(Interrupt):
        autoprec.tune(model, val, storage=storage, study_name="s", **options)
    monkeypatch.setattr(search.Search, "_measure", original)
    resumed = autoprec.tune(model, val, storage=storage, study_name="s", **options)
    complete = resumed.trials[resumed.trials["evaluated"]]
    evaluated = complete[~complete["cached"].astype(bool)]
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(storage)))
    params = {t.number: tuple(sorted(t.params.items())) for t in study.trials}
    assert len({params[n] for n in evaluated["trial"]}) == len(evaluated)  # no finished trial was run twice
    assert resumed.stats["evaluations"] == len(evaluated) - 5
    assert resumed.policy == reference.policy


@pytest.mark.slow
def test_resume_after_killed_process_and_two_workers(planted, tmp_path):
    model, _, val, _ = planted
    model_path, data_path = str(tmp_path / "m.keras"), str(tmp_path / "d.npz")
    model.save(model_path)
    np.savez(data_path, x=val[0], y=val[1])
    worker = [sys.executable, os.path.join(HERE, "tune_worker.py"), model_path, data_path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}

    # A worker killed (SIGKILL) after 4 search trials, then resumed: same policy as one uninterrupted run.
    killed = subprocess.run(
        worker + [str(tmp_path / "k.log"), "k", "25", "--kill-after", "4"], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode != 0
    subprocess.run(
        worker + [str(tmp_path / "k.log"), "k", "25", "--out", str(tmp_path / "resumed.json")],
        env=env,
        check=True,
        timeout=300,
    )
    reference = autoprec.tune(
        model, val, budget="0.5%", target="mixed_float16", candidates=THREE_WAY, n_trials=25, seed=0, verbose=0
    )
    assert autoprec.PrecisionPolicy.load(tmp_path / "resumed.json") == reference.policy

    # Two workers on one journal file contribute trials to one study.
    journal = str(tmp_path / "shared.log")
    procs = [
        subprocess.Popen(
            worker + [journal, "shared", "30", "--sleep", "0.15"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from autoprec.search.study import evaluated_trials

    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(JournalFileBackend(journal)))
    workers = {t.user_attrs.get("worker") for t in evaluated_trials(study)}
    assert len(workers) == 2
    assert len(study.trials) >= 20


def test_verify_train_records_loss_scale(digits_cnn):
    model, train, val = digits_cnn
    result = autoprec.tune(
        model,
        val,
        budget="1%",
        target="mixed_float16",
        n_trials=10,
        verify="train",
        train_data=train,
        steps=30,
        verbose=0,
    )
    check = result.training
    assert check is not None and check.steps == 30 and len(check.tuned_losses) == 30
    if result.policy.uses_float16:
        assert len(check.loss_scale) == 30 and check.loss_scale[0] > 1
    assert check.passed, check.reason
    assert np.isfinite(check.float32_metric) and np.isfinite(check.tuned_metric)


@pytest.mark.slow
def test_block_granularity_and_measured_cost(digits_cnn):
    model, _, val = digits_cnn
    result = autoprec.tune(
        model, val, budget="1%", target="mixed_bfloat16", granularity="block", cost="measured", n_trials=8, verbose=0
    )
    assert result.stats["decision_keys"] < len(result.units)
    assert result.measured_speedup is not None and result.measured_speedup > 0
    assert result.trials["measured_speedup"].notna().any()
    from autoprec.backends import device_description

    assert result.measured_on == device_description()  # a measured figure names the machine it came from
    assert result.measured_on in result.summary()


def test_untrained_model_needs_training_data():
    model = MODEL_BUILDERS["functional"]()
    keras.utils.set_random_seed(1)
    x, y = small_data(300)
    # an untrained head that always answers class 1: accuracy = share of class 1, chance level
    out = model.get_layer("out")
    out.kernel.assign(np.zeros(out.kernel.shape, "float32"))
    out.bias.assign(np.array([0.0, 1.0, 0.0], "float32"))
    chance = np.bincount(y).max() / len(y)
    with pytest.raises(UntrainedModelError, match="chance level"):
        autoprec.tune(model, (x, y), budget="1%", n_trials=5, verbose=0)
    result = autoprec.tune(model, (x, y), budget="1%", n_trials=5, train_data=(x, y), pretrain_steps=150, verbose=0)
    assert result.pretrain_steps == 150
    assert result.baseline_metric > chance + 0.1
    assert model.get_layer("out").bias.numpy()[1] == 1.0  # the user's model was not trained in place


def test_loss_metric_direction():
    model = trained(MODEL_BUILDERS["sequential"]())
    result = autoprec.tune(
        model,
        small_data(),
        budget="5% relative",
        metric="sparse_categorical_crossentropy",
        target="mixed_bfloat16",
        n_trials=5,
        verbose=0,
    )
    assert not result.higher_is_better
    assert result.drop == pytest.approx(result.metric - result.baseline_metric)
    assert result.drop <= result.allowed_drop + 1e-9


def test_subclassed_model_is_tuned_in_place():
    model = trained(MODEL_BUILDERS["subclassed"]())
    result = autoprec.tune(
        model, small_data(), budget="2%", target="mixed_bfloat16", n_trials=5, inplace=True, verbose=0
    )
    assert result.stats["engine"] == "real"
    assert result.model is model


def test_save_writes_everything_and_round_trips(planted, tmp_path):
    model, _, val, _ = planted
    result = autoprec.tune(model, val, budget="0.5%", target="mixed_float16", n_trials=12, verbose=0)
    written = result.save(tmp_path / "run")
    names = {os.path.basename(p) for p in written}
    assert {
        "policy.json",
        "sensitivity.csv",
        "trials.csv",
        "result.json",
        "model.keras",
        "report.md",
        "report.html",
    } <= names
    policy = autoprec.PrecisionPolicy.load(tmp_path / "run" / "policy.json")
    assert policy == result.policy
    again = autoprec.apply_policy(model, policy)
    loaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    for key, layer in keyed_layers(loaded).items():
        assert layer.compute_dtype == keyed_layers(again)[key].compute_dtype


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"budget": "-1%"}, BudgetError, ">= 0"),
        ({"budget": "150%"}, BudgetError, "100%"),
        ({"budget": float("nan")}, BudgetError, "finite"),
        ({"budget": "lots"}, BudgetError, "does not parse"),
        ({"n_trials": 0}, ArgumentError, "n_trials"),
        ({"granularity": "layerwise"}, ArgumentError, "granularity"),
        ({"candidates": ("mixed_float16",)}, ArgumentError, "candidates"),
        ({"verify": "train"}, DataError, "train_data"),
        ({"timeout": -1}, ArgumentError, "timeout"),
        ({"cost": "guess"}, ArgumentError, "cost"),
        ({"device": "npu"}, ArgumentError, "device"),
        ({"keep_float32": ["nope"]}, PolicyError, "matches none"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    model = MODEL_BUILDERS["functional"]()
    args = {"budget": "1%", "n_trials": 5, "verbose": 0, **kwargs}
    with pytest.raises(error, match=message):
        autoprec.tune(model, small_data(), **args)


def test_resumed_study_for_another_model_is_refused(planted, tmp_path):
    model, _, val, _ = planted
    storage = f"sqlite:///{tmp_path / 's.db'}"
    autoprec.tune(model, val, budget="0.5%", n_trials=3, storage=storage, study_name="x", verbose=0)
    other = trained(MODEL_BUILDERS["functional"]())
    with pytest.raises(StudyError, match="same decisions"):
        autoprec.tune(
            other, small_data(), budget="1%", n_trials=3, storage=storage, study_name="x", verbose=0, confidence=None
        )


def _application(name, size):
    rng = np.random.default_rng(0)
    extra = {"include_preprocessing": False} if "MobileNetV3" in name else {}
    model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10, **extra)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = rng.normal(size=(16, size, size, 3)).astype("float32")
    return model, (x, rng.integers(0, 10, 16))


def _brier(y_true, y_pred):
    """Mean squared error against one-hot labels: meaningful on random weights, unlike accuracy."""
    return float(np.mean((np.asarray(y_pred) - np.eye(10)[np.asarray(y_true)]) ** 2))


@pytest.mark.slow
# Block granularity on a real application runs in examples/keras_applications.py (the tests run it in fast mode);
# ResNet50 and four more architectures in benchmarks/bench_applications.py.
@pytest.mark.slow
@pytest.mark.parametrize("name, size, granularity", [("MobileNetV3Small", 32, "layer")])
def test_applications(name, size, granularity, tmp_path):
    """Applications built with weights=None on generated data: tune, emit, save/load.

    Random weights sit at chance on accuracy (tune would refuse them, as tested
    elsewhere), so the metric here is the Brier score, lower is better.
    """
    model, data = _application(name, size)
    result = autoprec.tune(
        model,
        data,
        budget="2% relative",
        metric=_brier,
        higher_is_better=False,
        target="mixed_bfloat16",
        n_trials=6,
        granularity=granularity,
        batch_size=16,
        verbose=0,
    )
    assert result.stats["traces"] <= 2
    result.policy.save(tmp_path / "p.json")
    policy = autoprec.PrecisionPolicy.load(tmp_path / "p.json")
    applied = autoprec.apply_policy(model, policy)
    applied.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    got = {k: layer.compute_dtype for k, layer in keyed_layers(loaded).items() if layer.weights}
    assert got == {k: layer.compute_dtype for k, layer in keyed_layers(applied).items() if layer.weights}
    assert "bfloat16" in got.values() or result.all_float32


def test_untrained_model_judged_by_its_loss_is_refused_too():
    model = MODEL_BUILDERS["functional"]()
    x, y = small_data(300)
    out = model.get_layer("out")
    out.kernel.assign(np.zeros(out.kernel.shape, "float32"))  # a constant predictor: uniform probabilities
    with pytest.raises(UntrainedModelError, match="chance level"):
        autoprec.tune(
            model, (x, y), budget="5% relative", metric="sparse_categorical_crossentropy", n_trials=3, verbose=0
        )


@pytest.mark.cpu_kind
def test_auto_target_says_why(capsys):
    model = trained(MODEL_BUILDERS["sequential"]())
    result = autoprec.tune(model, small_data(), budget="5%", target="auto", n_trials=3, verbose=1)
    assert result.target in ("mixed_float16", "mixed_bfloat16")
    assert f"target=auto -> {result.target} (" in capsys.readouterr().out


def test_uncompiled_list_output_model_and_tf_data():
    """A model built with outputs=[t] (a list of one) and never compiled; data as a tf.data.Dataset."""
    import tensorflow as tf

    source = trained(MODEL_BUILDERS["functional"]())
    model = keras.Model(source.inputs, [source.outputs[0]])
    x, y = small_data()
    result = autoprec.tune(model, (x, y), budget="2%", metric="accuracy", target="mixed_float16", n_trials=4, verbose=0)
    assert result.baseline_metric > 0.5 and result.verification["feasible"]
    assert result.sensitivity["score"].notna().any()  # the gradient pass handled the list output
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    again = autoprec.tune(source, dataset, budget="2%", target="mixed_bfloat16", n_trials=4, verbose=0)
    assert again.baseline_metric == pytest.approx(
        autoprec.tune(source, (x, y), budget="2%", target="mixed_bfloat16", n_trials=4, verbose=0).baseline_metric
    )


def test_model_built_under_a_mixed_global_policy():
    """Built under mixed_float16: tuned against a float32 copy; the user's model is left as it was."""
    keras.config.set_dtype_policy("mixed_float16")
    model = MODEL_BUILDERS["functional"]()
    keras.config.set_dtype_policy("float32")
    trained(model)
    assert model.get_layer("h1").compute_dtype == "float16"
    result = autoprec.tune(model, small_data(), budget="2%", target="mixed_bfloat16", n_trials=4, verbose=0)
    assert model.get_layer("h1").compute_dtype == "float16"
    assert result.model.get_layer("out").compute_dtype == "float32"
    assert result.verification["feasible"]


def test_force_16bit_units_stay_16bit_with_their_reason(planted):
    model, _, val, _ = planted
    result = autoprec.tune(
        model, val, budget="0.5%", target="mixed_bfloat16", force_16bit=["d6"], n_trials=10, verbose=0
    )
    decisions = result.sensitivity.set_index("path")
    assert result.policy["d6"] == "mixed_bfloat16"
    assert decisions.loc["d6", "reason"] == reasons.FORCED_16BIT
    assert result.policy["d7"] == "float32"  # the rest of the planted region still falls back


def test_an_overflow_on_a_few_percent_of_the_samples_is_found(tmp_path):
    """Issue 27: the statistics read a sample of the data; a hazard that only 4% of the inputs trigger still shows
    there (with the reason), and the budget, judged on all the data, keeps the layers float32."""
    from autoprec import testing

    (x_train, y_train), (x_val, y_val) = testing.digits_data(flat=True)
    model = testing.train(testing.mlp(depth=5), x_train, y_train, epochs=10)
    # 96% of the validation samples stay under 65504 / 1.1 in d3; the top 4% overflow float16 (more than 0.5%)
    testing.plant_overflow(model, "d3", "d4", x_val, peak=7.2e4, quantile=0.96)
    result = autoprec.tune(model, (x_val, y_val), budget="0.5%", target="mixed_float16", device="gpu", verbose=0)
    assert result.stats["statistics_samples"] == 256 < result.stats["samples"] == len(x_val)
    frame = result.sensitivity.set_index("path")
    assert frame.loc["d3", "act_overflow"] > 0 and frame.loc["d3", "reason"] == reasons.OVERFLOW
    assert frame.loc["d3", "decision"] == frame.loc["d4", "decision"] == "float32"
    assert other_flops_share(result, ["d3", "d4"]) >= 0.9
    assert result.verification["feasible"] and result.drop <= 0.005
    result.save(tmp_path)
    assert "on 256 of " in (tmp_path / "report.md").read_text()


def test_statistics_read_two_training_batches_when_the_all_16bit_check_settles_the_answer():
    """Issue 27: cheap decisive work first. When every layer in 16-bit meets the budget, the statistics only
    describe the ranges (the report, a fall-back's order): they read 64 samples, the metric all of them."""
    model = trained(MODEL_BUILDERS["sequential"]())
    x, y = small_data(400)
    result = autoprec.tune(model, (x, y), budget="5%", target="mixed_bfloat16", device="gpu", n_trials=3, verbose=0)
    assert result.n_16bit == len(result.units) and len(result.trials) == 1
    assert result.stats["statistics_samples"] == 64 and result.stats["samples"] == 400
    assert result.sensitivity["act_absmax"].notna().any()


def test_a_settled_tune_scores_its_answer_once_with_real_policies():
    """Issue 27: tune's first check, every layer in 16-bit, runs with real Keras policies. Where it settles the
    answer the search reads its figures and the verification takes it over: the answer is scored once, not once
    simulated and once real."""
    model = trained(MODEL_BUILDERS["sequential"]())
    x, y = small_data(400)
    result = autoprec.tune(model, (x, y), budget="5%", target="mixed_bfloat16", device="gpu", n_trials=3, verbose=0)
    assert result.n_16bit == len(result.units) and len(result.trials) == 1
    (check,) = result.verification["checks"]
    assert check["simulated_drop"] is None  # no simulated pass of the answer was run
    assert result.trials["drop"].iloc[0] == pytest.approx(result.verification["real_drop"], abs=1e-12)
    # The model returned is the one checked: its own predictions give the verified metric.
    accuracy = float(np.mean(np.argmax(result.model.predict(x, verbose=0), axis=-1) == y))
    assert accuracy == pytest.approx(result.metric, abs=1e-9)


def test_the_search_reads_the_real_policies_of_the_first_check(monkeypatch):
    """Where real arithmetic breaks the budget that simulated rounding would meet, the first candidate counts as
    infeasible in the search too, and tune answers with what passes."""
    from autoprec import session as session_module

    real = session_module.Session.score_batches

    def worse(self, assignment, model, forward, *, budget=None):  # as if the real 16-bit arithmetic lost accuracy
        def forward_worse(x, y, w=None):
            out, values = forward(x, y, w)
            return out, None if values is None else np.zeros_like(values)

        return real(self, assignment, model, forward_worse, budget=budget)

    monkeypatch.setattr(session_module.Session, "score_batches", worse)
    model = trained(MODEL_BUILDERS["sequential"]())
    x, y = small_data(400)
    result = autoprec.tune(model, (x, y), budget="5%", target="mixed_bfloat16", device="gpu", n_trials=8, verbose=0)
    assert not result.trials["feasible"].iloc[0]
    assert result.n_16bit < len(result.units)
    assert result.verification["checks"][0]["simulated_drop"] is not None  # checked anew, not taken over


def test_a_padded_sequence_model_is_tuned_on_its_real_tokens(tmp_path):
    """Issue 25: under a padding mask (sample weights), the budget's resolution counts the real tokens only, the
    verified metric is Keras's weighted one on the tuned model, and the report says what the metric counted."""
    from conftest import padded_sequences, token_model

    x, y, mask = padded_sequences(n=64, seed=2)
    model = token_model(mask_zero=False, seed=2)
    model.fit(x, y, sample_weight=mask, epochs=40, batch_size=16, verbose=0)
    real = int(mask.sum())
    # 1/real tokens is more than 0.0015 of accuracy; 1/all tokens (768) would be less.
    with pytest.raises(DataError, match=f"one token is 1/{real} "):
        autoprec.tune(model, (x, y, mask), budget=0.0015, target="mixed_bfloat16", metric="accuracy", verbose=0)
    result = autoprec.tune(
        model, (x, y, mask), budget="2%", target="mixed_bfloat16", metric="accuracy", confidence=None, verbose=0
    )
    facts = result.verification
    assert (facts["counted"], facts["unit"], facts["weighted"]) == (real, "token", True)
    result.model.compile(loss="sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
    keras_says = result.model.evaluate(x, y, sample_weight=mask, verbose=0, return_dict=True)["accuracy"]
    assert result.metric == pytest.approx(keras_says, abs=1e-5)
    assert result.drop <= 0.02 and result.n_16bit >= 1
    result.save(tmp_path / "run")
    page = (tmp_path / "run" / "report.md").read_text()
    assert f"the metric averages over the {real} tokens weighed above zero" in page


def test_training_batches_carry_the_sample_weights_row_by_row():
    """The training check and pretraining train as fit would on (x, y, sample_weight): each batch keeps its rows'
    weights, the topped-up last batch too, and a step weighs its loss by them."""
    from autoprec.verify.real import cycle_batches, train_steps

    x = np.arange(10, dtype="float32")[:, None]
    weights = np.where(np.arange(10) % 3 == 0, 0.0, 1.0)
    batches = cycle_batches((x, np.zeros(10, "float32"), weights), steps=4, batch_size=4)
    assert [len(b) for b in batches] == [3] * 4
    for bx, _, bw in batches:
        expected = weights[bx[:, 0].astype(int)]
        np.testing.assert_allclose(bw, expected / weights.mean())
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    zero_only = [(x[[0, 3]], np.zeros(2, "float32"), np.zeros(2, "float32"))]  # both rows weighed zero
    losses, _ = train_steps(model, zero_only)
    assert losses == [0.0]


def test_chance_level_of_sequence_labels_counts_every_token():
    """128 sequences over a 2,048-token vocabulary: the most common class is one token's share of 16,384, not
    one sequence's (a first-token count made a language model at 3% accuracy look untrained)."""
    from autoprec.tuner import _class_frequencies

    y = np.random.default_rng(0).integers(0, 2048, size=(128, 128))
    assert _class_frequencies(y, 2048, None).max() < 0.002
    assert _class_frequencies(np.array([0, 0, 1, 2]), 3, None).tolist() == [0.5, 0.25, 0.25]
