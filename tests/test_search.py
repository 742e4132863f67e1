"""The search on hand-made problems: no Keras, an additive drop per key, exhaustive optimum known."""

import itertools
import math

import optuna
import pytest

from autoprec.search import Search, Space

KEYS = tuple(f"u{i}" for i in range(10))
COST = {k: 1.0 + (i % 3) for i, k in enumerate(KEYS)}
DROP = {"u2": 0.03, "u5": 0.004, "u7": 0.002, "u8": 0.0005}


def estimate(assignment):
    low = sum(COST[k] for k, v in assignment.items() if v != "float32")
    return 1.0 + low / sum(COST.values())


def make(allowed=0.005, n_trials=40, storage=None, name="s", seed=0, calls=None):
    def evaluate(assignment):
        if calls is not None:
            calls.append(dict(assignment))
        drop = sum(DROP.get(k, 0.0) for k, v in assignment.items() if v != "float32")
        return {"metric": 1 - drop, "drop": drop, "output_error": drop, "nonfinite_outputs": 0}

    study = optuna.create_study(direction="maximize", storage=storage, study_name=name, load_if_exists=True)
    order = tuple(sorted(KEYS, key=lambda k: -DROP.get(k, 0.0)))
    space = Space(KEYS, ("float32", "mixed_float16"), "mixed_float16", order)
    return Search(space, evaluate, estimate, allowed, study, n_trials=n_trials, seed=seed)


def optimum(allowed):
    best = 1.0
    for bits in itertools.product([0, 1], repeat=len(KEYS)):
        a = {k: ("mixed_float16" if b else "float32") for k, b in zip(KEYS, bits)}
        if sum(DROP.get(k, 0) for k, v in a.items() if v != "float32") <= allowed + 1e-12:
            best = max(best, estimate(a))
    return best


@pytest.mark.parametrize("allowed", [0.0, 0.001, 0.005, 0.01, 0.05])
def test_reaches_exhaustive_optimum(allowed):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = make(allowed)
    best = search.run()
    assert best.speedup >= 0.99 * optimum(allowed)
    assert best.feasible and best.drop <= allowed + 1e-9


def test_stops_when_all_16bit_is_feasible():
    search = make(allowed=1.0)
    best = search.run()
    assert len(search.study.trials) == 1 and best.phase == "all_16bit"


def test_constraints_are_optuna_constraints():
    search = make(0.005, n_trials=15)
    search.run()
    trials = search.study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert all("budget" in t.constraints for t in trials)
    best = search.study.best_trial  # Optuna 5 picks the best feasible trial from the constraints
    assert best.user_attrs["feasible"] and best.value == pytest.approx(search.best().speedup)


def test_cache_makes_repeats_free():
    calls = []
    search = make(0.005, n_trials=40, calls=calls)
    search.run()
    unique = {tuple(sorted(c.items())) for c in calls}
    assert len(unique) == len(calls) == search.evaluations


def test_resume_repeats_no_finished_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    reference = make(0.005, n_trials=25, name="ref")
    expected = reference.run()

    class Interrupt(Exception):
        pass

    calls = []

    def failing(assignment):
        if len(calls) == 6:
            raise Interrupt()
        calls.append(assignment)
        drop = sum(DROP.get(k, 0.0) for k, v in assignment.items() if v != "float32")
        return {"metric": 1 - drop, "drop": drop, "output_error": drop, "nonfinite_outputs": 0}

    first = make(0.005, n_trials=25, storage=storage, name="resume")
    first.evaluate = failing
    with pytest.raises(Interrupt):
        first.run()
    resumed_calls = []
    second = make(0.005, n_trials=25, storage=storage, name="resume", calls=resumed_calls)
    result = second.run()
    done = {tuple(sorted(c.items())) for c in calls}
    assert not done & {tuple(sorted(c.items())) for c in resumed_calls}
    assert result.assignment == expected.assignment
    assert math.isclose(result.speedup, expected.speedup)
