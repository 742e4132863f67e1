"""Issue 26: the budget judged by a paired upper confidence bound, and a held-out check."""

import math

import keras
import numpy as np
import pytest
from conftest import kernel_share_16bit, small_data, trained

import autoprec
from autoprec.errors import ArgumentError, DataError
from autoprec.verify.bounds import bootstrap_upper_bound, no_change_bound, paired_upper_bound, samples_to_resolve


@pytest.mark.parametrize("rate", [0.002, 0.01, 0.05])
def test_the_accuracy_bound_covers_the_true_drop_at_its_confidence(rate):
    """Seeded simulation: candidates flipping `rate` of samples wrong (and rate/4 right) on 1,000 samples."""
    rng = np.random.default_rng(0)
    n, runs, covered = 1000, 1000, 0
    true_drop = rate - rate / 4
    for _ in range(runs):
        base = np.ones(n)
        cand = base.copy()
        u = rng.random(n)
        cand[u < rate] = 0.0
        base[(u >= rate) & (u < rate + rate / 4)] = 0.0
        covered += paired_upper_bound(base, cand, higher_is_better=True, binary=True, confidence=0.95) >= true_drop
    assert covered / runs >= 0.925  # nominal 0.95; 1,000 runs resolve about 0.007


def test_the_loss_bound_covers_the_true_drop():
    rng = np.random.default_rng(1)
    covered = sum(
        paired_upper_bound(
            np.zeros(500), rng.normal(0.01, 0.2, 500), higher_is_better=False, binary=False, confidence=0.95
        )
        >= 0.01
        for _ in range(300)
    )
    assert covered / 300 >= 0.93


def test_bounds_for_nothing_changed_and_for_nonfinite_values():
    assert 0 < no_change_bound(1000, 0.95) < 0.0025
    bad = np.array([1.0, np.nan])
    assert math.isinf(paired_upper_bound(np.ones(2), bad, higher_is_better=True, binary=False, confidence=0.95))
    assert samples_to_resolve(0.005, binary=True, confidence=0.95) == 200
    assert samples_to_resolve(0.01, binary=False, spread=0.2, confidence=0.95) > 1000


def test_the_bootstrap_bound_is_never_below_the_point():
    d = np.random.default_rng(0).normal(0.0, 0.05, 400)
    ub = bootstrap_upper_bound(lambda i: float(d[i].mean()), 400, confidence=0.95, point=float(d.mean()))
    assert ub >= d.mean() and ub - d.mean() < 0.02


@pytest.fixture(scope="module")
def model_and_data():
    keras.utils.set_random_seed(0)
    i = keras.Input((12,))
    h = keras.layers.Dense(32, activation="relu", name="h1")(i)
    h = keras.layers.Dense(32, activation="relu", name="h2")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(h)
    model = keras.Model(i, out)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return trained(model), small_data(n=1500)


def test_tune_reports_the_bound_and_checks_held_out_data(model_and_data, tmp_path):
    model, (x, y) = model_and_data
    result = autoprec.tune(
        model,
        (x, y),
        budget="2%",
        target="mixed_bfloat16",
        device="gpu",
        n_trials=6,
        holdout=0.3,
        confidence=0.95,
        verbose=0,
    )
    assert result.confidence == 0.95 and result.drop_bound >= result.drop
    assert "(95% bound" in repr(result)
    held = result.verification["holdout"]
    assert held["samples"] == 450 and held["drop_bound"] >= held["drop"]
    assert "held-out check on 450 samples" in result.summary()
    assert "drop_bound" in result.trials.columns
    result.save(tmp_path)
    assert "drop_bound" in (tmp_path / "trials.csv").read_text().splitlines()[0]
    provenance = autoprec.PrecisionPolicy.load(tmp_path / "policy.json").provenance
    assert provenance["confidence"] == 0.95 and provenance["drop_bound"] >= provenance["drop"]
    assert provenance["holdout"]["samples"] == 450 and provenance["samples"] == 1500 - 450
    report = (tmp_path / "report.md").read_text()
    assert "## Trials" in report and "| 95% bound |" in report
    assert "95% bound" in (tmp_path / "report.html").read_text()


def test_confidence_none_judges_the_drop_and_bad_values_are_refused(model_and_data):
    model, (x, y) = model_and_data
    result = autoprec.tune(
        model, (x, y), budget="2%", target="mixed_bfloat16", device="gpu", n_trials=4, confidence=None, verbose=0
    )
    assert result.confidence is None and math.isnan(result.drop_bound) and "bound" not in repr(result)
    with pytest.raises(ArgumentError, match="confidence"):
        autoprec.tune(model, (x, y), confidence=1.5)
    with pytest.raises(ArgumentError, match="holdout"):
        autoprec.tune(model, (x, y), holdout=0.9)


def test_the_default_confidence_is_the_bound_where_the_data_resolves_the_budget(model_and_data, caplog):
    """confidence="auto" (the default): 0.95 where a candidate may flip a few samples within the budget, else the
    measured drop, with a warning naming the samples a bound would need."""
    model, (x, y) = model_and_data
    enough = autoprec.tune(model, (x, y), budget="2%", target="mixed_bfloat16", device="gpu", n_trials=4, verbose=0)
    assert len(y) >= 250 and enough.confidence == 0.95 and enough.drop_bound >= enough.drop
    with caplog.at_level("WARNING", logger="autoprec"):
        few = autoprec.tune(
            model, (x[:200], y[:200]), budget="0.5%", target="mixed_bfloat16", device="gpu", n_trials=4, verbose=0
        )
    assert few.confidence is None and math.isnan(few.drop_bound)
    assert "200 evaluation samples are too few" in caplog.text and "at least 858 samples" in caplog.text


def test_a_per_token_accuracy_is_bounded_over_tokens_and_over_sequences():
    """A language model's accuracy averages over tokens: a sequence's value is a count of right tokens."""
    base = np.ones(256)
    few = base.copy()
    few[:2] = 15 / 16  # two of 4,096 tokens flipped: the tokens' bound, near the no-change bound over 4,096
    assert (
        no_change_bound(4096, 0.95)
        < paired_upper_bound(base, few, higher_is_better=True, binary=True, confidence=0.95, units=16)
        < 2 * no_change_bound(256, 0.95) / 8
    )
    clustered = base.copy()
    clustered[:12] = 0.0  # 192 tokens, all in 12 sequences: the sequences' spread, wider than independent tokens
    as_tokens = paired_upper_bound(base, clustered, higher_is_better=True, binary=True, confidence=0.95, units=1 * 1)
    tokens_alone = 192 / 4096 + 1.645 * math.sqrt(192) / 4096
    bound = paired_upper_bound(base, clustered, higher_is_better=True, binary=True, confidence=0.95, units=16)
    assert bound > tokens_alone and bound == pytest.approx(as_tokens, rel=0.2)


def test_the_resolution_check_names_the_samples_needed(model_and_data):
    model, (x, y) = model_and_data
    with pytest.raises(DataError, match=r"at least \d+ evaluation samples to resolve a drop of 0.002 .* at 95%"):
        autoprec.tune(model, (x[:500], y[:500]), budget="0.2%", target="mixed_bfloat16", confidence=0.95, verbose=0)


def test_what_a_loss_can_resolve_is_said_before_the_search(model_and_data, caplog, tmp_path):
    """Issue 26: for a loss the bound's margin depends on the spread, known once the all-16-bit candidate ran."""
    model, (x, y) = model_and_data
    with caplog.at_level("WARNING", logger="autoprec"):
        result = autoprec.tune(
            model, (x, y), budget=1e-6, metric="sparse_categorical_crossentropy", target="mixed_bfloat16", device="gpu", n_trials=4,
            confidence=0.95, verbose=0,
        )  # fmt: skip
    resolution = result.stats["resolution"]
    assert resolution["samples"] == 1500 and resolution["resolvable_drop"] > 1e-6
    assert resolution["samples_needed"] > 1500
    # the margin shrinks as one over the root of n: the samples named bring it down to the budget
    margin_there = resolution["resolvable_drop"] * math.sqrt(1500 / resolution["samples_needed"])
    assert margin_there == pytest.approx(1e-6, rel=0.01)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"About {resolution['samples_needed']} samples would resolve the budget" in said
    assert "confidence=None" in said
    result.save(tmp_path)
    assert f"the budget needs about {resolution['samples_needed']}" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_the_budget_holds_on_held_out_data_over_20_seeds():
    """Issue 26: tuned on 20 small splits of a borderline task, measured on 40,000 samples tune never saw.

    The point estimate over-ran the budget in 3 of 20 runs here, with 98.8% of the matmul FLOPs in 16-bit
    (benchmarks/bench_holdout.py, reports/benchmarks.md section 11); judged by the 95% bound, at most 5% of the
    runs may, and the share must stay within 5 points of the point estimate's.
    """
    from autoprec import testing

    seeds, split, held = 20, 2000, 40000
    # 256 wide: the matmuls, not the casts around a float32 island, are where the time goes (the benchmark's task)
    model, _, (xv, yv), _ = testing.mild_weightless_mlp(seed=0, width=256, offset=128.0, n_val=seeds * split + held)
    xh, yh = xv[seeds * split :], yv[seeds * split :]

    def right(m):
        return np.argmax(m.predict(xh, batch_size=8192, verbose=0), axis=-1) == yh

    base = right(model).mean()
    over, shares = 0, []
    for s in range(seeds):
        data = (xv[s * split : (s + 1) * split], yv[s * split : (s + 1) * split])
        result = autoprec.tune(
            model, data, budget=0.005, target="mixed_bfloat16", device="gpu", confidence=0.95, seed=s, verbose=0
        )
        assert result.feasible and result.drop_bound <= 0.005
        over += int(base - right(result.model).mean() > 0.005)
        shares.append(kernel_share_16bit(result.model))
    assert over <= 1, over  # <= 5% of 20 runs
    # measured 0.962 (the Dense kernels' share; the point estimate's 0.988, minus 5 points: 0.938)
    assert np.mean(shares) >= 0.938, shares
