"""The search on hand-made problems: no Keras, an additive drop per key, exhaustive optimum known."""

import itertools
import math
from types import SimpleNamespace

import optuna
import pytest

from autoprec import Budget
from autoprec.search.plan import Search, Space, make_sampler, objective_value
from autoprec.search.study import evaluated_trials

KEYS = tuple(f"u{i}" for i in range(10))
COST = {k: 1.0 + (i % 3) for i, k in enumerate(KEYS)}
DROP = {"u2": 0.03, "u5": 0.004, "u7": 0.002, "u8": 0.0005}


def estimate(assignment):
    low = sum(COST[k] for k, v in assignment.items() if v != "float32")
    return 1.0 + low / sum(COST.values())


def outcome(drop):
    return SimpleNamespace(
        metric=1 - drop, drop=drop, output_error=drop, nonfinite_outputs=0, rejected=False, samples=100
    )


def make(allowed=0.005, n_trials=40, storage=None, name="s", seed=0, calls=None, ruled_out=None):
    def evaluate(assignment):
        if calls is not None:
            calls.append(dict(assignment))
        return outcome(sum(DROP.get(k, 0.0) for k, v in assignment.items() if v != "float32"))

    study = optuna.create_study(
        direction="maximize", storage=storage, study_name=name, load_if_exists=True, sampler=make_sampler(seed)
    )
    order = tuple(sorted(KEYS, key=lambda k: -DROP.get(k, 0.0)))
    space = Space(KEYS, ("float32", "mixed_float16"), "mixed_float16", order, ruled_out=ruled_out or {})
    budget = Budget(allowed)
    return Search(
        space, evaluate, estimate, lambda d: budget.feasible(baseline=1.0, drop=d), allowed, study, n_trials=n_trials
    )


def optimum(allowed):
    best = 1.0
    for bits in itertools.product([0, 1], repeat=len(KEYS)):
        a = {k: ("mixed_float16" if b else "float32") for k, b in zip(KEYS, bits, strict=True)}
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


@pytest.mark.parametrize("allowed", [0.001, 0.005, 0.01])
def test_a_ruled_out_choice_is_never_evaluated_and_the_optimum_is_still_reached(allowed):
    """Issue 27: a key that alone breaks the budget (u2 loses 0.03) is ruled out of 16-bit by the profile. No
    trial spends an evaluation on it, the first trial has it in float32, and the optimum is reached in fewer
    evaluations than without the ruling."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    calls, plain_calls = [], []
    search = make(allowed, calls=calls, ruled_out={"u2": ("mixed_float16",)})
    best = search.run()
    assert best.speedup >= 0.99 * optimum(allowed) and best.drop <= allowed + 1e-9
    assert calls and all(a["u2"] == "float32" for a in calls)
    assert calls[0] == {k: ("float32" if k == "u2" else "mixed_float16") for k in KEYS}
    make(allowed, calls=plain_calls).run()
    assert len(calls) < len(plain_calls)


def test_a_ruled_out_choice_gives_way_to_the_other_16bit_format():
    """With a three-way choice, a key ruled out of float16 takes bfloat16 in the first trial and in TPE's
    proposals, never float16."""
    space = Space(
        ("a", "b"), ("float32", "mixed_bfloat16", "mixed_float16"), "mixed_float16", ("a", "b"),
        ruled_out={"a": ("mixed_float16",)},
    )  # fmt: skip
    assert space.all_target() == {"a": "mixed_bfloat16", "b": "mixed_float16"}
    assert space.repair({"a": "mixed_float16", "b": "float32"}) == {"a": "mixed_bfloat16", "b": "float32"}
    assert space.allows("a", "float32") and not space.allows("a", "mixed_float16")


def test_stops_when_all_16bit_is_feasible():
    search = make(allowed=1.0)
    best = search.run()
    assert len(search.study.trials) == 1 and best.phase == "all_16bit"


def test_constraints_are_optuna_constraints():
    search = make(0.005, n_trials=15)
    search.run()
    trials = evaluated_trials(search.study)
    assert len(trials) > 3 and all(
        len(t.system_attrs["constraints"]) == 1 for t in trials
    )  # the list every reader knows
    assert all((t.constraints["0"] <= 0) == t.user_attrs["feasible"] for t in trials)
    # over budget is PRUNED with its estimate kept: no reader can take it for the best
    state = optuna.trial.TrialState
    assert {t.state for t in trials if not t.user_attrs["feasible"]} == {state.PRUNED}
    assert all(objective_value(t) > 0 for t in trials)
    best = search.study.best_trial
    assert best.user_attrs["feasible"] and best.value == pytest.approx(search.best().speedup)
    assert search.study._storage.get_best_trial(search.study._study_id).number == best.number  # the dashboard's pick


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
        return outcome(sum(DROP.get(k, 0.0) for k, v in assignment.items() if v != "float32"))

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


def test_a_resumed_study_is_judged_again_under_a_tighter_budget(tmp_path):
    """Stored trials keep their drops; feasibility is the new budget's, never the stored flag."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    loose = make(1.0, n_trials=5, storage=storage, name="b")
    assert loose.run().feasible  # all 16-bit, drop 0.0365, feasible under budget 1.0
    tight = make(0.001, n_trials=25, storage=storage, name="b")
    best = tight.run()
    assert best.drop <= 0.001 + 1e-12
    all16 = tight.cache[tight.space.key_of(tight.space.all_target())]
    assert not all16.feasible


def test_a_trial_stopped_early_is_evaluated_again_under_a_looser_budget(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = make(0.001, n_trials=3, storage=storage, name="r")
    full = first.evaluate

    def rejecting(assignment):
        result = full(assignment)
        return SimpleNamespace(**{**vars(result), "rejected": result.drop > 0.001, "metric": math.nan})

    first.evaluate = rejecting
    first.run()
    assert any(o.rejected for o in first.cache.values())
    calls = []
    second = make(1.0, n_trials=5, storage=storage, name="r", calls=calls)
    best = second.run()
    assert calls and best.feasible and not best.rejected  # the bound fits the looser budget: measured again


def test_one_sampler_per_study_and_replayable_proposals():
    a, b = make(0.005, n_trials=30, name="x", seed=7), make(0.005, n_trials=30, name="y", seed=7)
    sampler = a.study.sampler
    a.run()
    b.run()
    assert a.study.sampler is sampler  # never replaced
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]
