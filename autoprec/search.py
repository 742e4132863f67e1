"""The search: one Optuna study over the decisions' precision, under the budget constraint.

Plain Python over two callbacks: ``evaluate(assignment)`` (one pass of the
engine, which may stop early once the trial is certainly over budget) and
``estimate(assignment)`` (the cost model, free). The objective is the
estimated speed-up. Feasibility is the budget's (:class:`autoprec.Budget`);
each trial records ``drop - allowed`` with ``Trial.set_constraint``, which
Optuna 5's TPE sampler reads to model feasibility (it splits infeasible
trials from the rest), and ``study.best_trial`` is the best feasible one.

Phases, each skipping any candidate whose *estimate* cannot beat the best
feasible one found so far (so most candidates cost nothing):

1. ``all_16bit``: every decision in the target format (enqueued). If
   feasible, no assignment can be faster; stop.
2. ``fallback``: return the most sensitive decisions (profile order) to
   float32, bisecting on how many.
3. ``segment``: bridge short float32 gaps into contiguous float32 segments,
   which saves casts at precision boundaries.
4. ``local``: single flips and swaps around the best feasible assignment.
5. ``tpe``: Optuna's constrained TPE for the remaining trials.

Evaluated assignments are cached, and the cache is rebuilt from the study's
finished trials, so a resumed search (same storage) repeats no finished
trial. Stored trials keep their measured drop; whether it is feasible is
judged again under this run's budget, so a study resumed under another
budget never inherits a verdict. A trial stopped early keeps its certain
lower bound: under a looser budget it is evaluated again. The study's
sampler is :class:`ReplayableTPESampler`, whose proposals for trial ``N``
depend only on ``(seed, N)``: a resumed run proposes what an uninterrupted
one would have. Several workers may share one storage.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FLOAT32 = "float32"
_INFEASIBLE = 1e9  # the stored drop/constraint of a trial whose outputs went non-finite


@dataclass(frozen=True)
class Space:
    """Decision keys (layers or blocks), their choices, and the profile's sensitivity order."""

    keys: tuple[str, ...]
    choices: tuple[str, ...]
    target: str
    order: tuple[str, ...]

    def all_target(self) -> dict[str, str]:
        return {k: self.target for k in self.keys}

    def key_of(self, assignment: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(assignment.get(k, FLOAT32) for k in self.keys)


@dataclass
class Outcome:
    """One evaluated assignment. ``drop`` is a lower bound when ``rejected``."""

    assignment: dict[str, str]
    speedup: float
    metric: float
    drop: float
    feasible: bool
    output_error: float = math.nan
    nonfinite_outputs: int = 0
    trial: int | None = None
    phase: str = ""
    rejected: bool = False


def make_sampler(seed: int):
    """The study's sampler: a :class:`ReplayableTPESampler` for ``seed``."""
    return _sampler_class()(seed)


def __getattr__(name: str) -> Any:
    # The sampler class subclasses Optuna's, which `import autoprec.search` must not import.
    if name == "ReplayableTPESampler":
        return _sampler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _sampler_class() -> type:
    import optuna

    class ReplayableTPESampler(optuna.samplers.BaseSampler):
        """TPE whose proposals for trial ``N`` depend only on ``(seed, N)``.

        Each trial gets a fresh ``TPESampler`` seeded from the seed and the
        trial number, so a study resumed from its storage proposes what an
        uninterrupted one would have; the study keeps this one sampler.
        """

        def __init__(self, seed: int = 0) -> None:
            self.seed = seed
            self._inner = self._tpe(0)

        def _tpe(self, number: int):
            import warnings

            with warnings.catch_warnings():  # "multivariate is experimental", once per trial otherwise
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(seed=(self.seed * 100_003 + number) % (2**31), n_startup_trials=5,
                                                  multivariate=True)

        def before_trial(self, study, trial) -> None:
            self._inner = self._tpe(trial.number)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self._inner.reseed_rng()

    return ReplayableTPESampler


@dataclass
class Search:
    """Drive one study. See the module docstring.

    Args:
        space: the decision space.
        evaluate: ``assignment -> Evaluation`` (``metric``, ``drop``, ``output_error``,
            ``nonfinite_outputs``, ``rejected``).
        estimate: ``assignment -> estimated speed-up``.
        feasible: ``drop -> bool``, the budget's rule.
        allowed: the largest drop the budget allows (for the stored constraint).
        study: an ``optuna.Study`` (in memory, or on a storage to resume/share).
        n_trials: the total number of trials the study may hold.
        timeout: seconds for this call, or None.
        on_trial: called after each evaluated trial with the search.
    """

    space: Space
    evaluate: Callable[[dict[str, str]], Any]
    estimate: Callable[[dict[str, str]], float]
    feasible: Callable[[float], bool]
    allowed: float
    study: Any
    n_trials: int = 60
    timeout: float | None = None
    on_trial: Callable[["Search"], None] | None = None
    cache: dict[tuple[str, ...], Outcome] = field(default_factory=dict)
    evaluations: int = 0
    cache_hits: int = 0
    _started: float = field(default=0.0, repr=False)

    # Study bookkeeping -----------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the cache from the study's finished trials (ours, resumed, or other workers')."""
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            attrs = t.user_attrs
            if "drop" not in attrs:
                continue
            assignment = {k: t.params.get(k, FLOAT32) for k in self.space.keys}
            key = self.space.key_of(assignment)
            if key in self.cache:
                continue
            drop = float(attrs["drop"])
            drop = math.inf if drop >= _INFEASIBLE else drop
            rejected = bool(attrs.get("rejected", False))
            feasible = self.feasible(drop)
            if rejected and feasible:
                continue  # its lower bound fits this budget: only a full pass can tell
            self.cache[key] = Outcome(assignment, float(t.value), attrs.get("metric", math.nan), drop, feasible and not rejected,
                                      attrs.get("output_error", math.nan), attrs.get("nonfinite_outputs", 0), t.number,
                                      attrs.get("phase", ""), rejected)

    def finished(self) -> int:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def out_of_budget(self) -> bool:
        if self.finished() >= self.n_trials:
            return True
        return self.timeout is not None and time.monotonic() - self._started > self.timeout

    def best(self) -> Outcome | None:
        """The best feasible outcome so far (ties: lower drop, then the earlier trial)."""
        feasible = [o for o in self.cache.values() if o.feasible]
        if not feasible:
            return None
        return max(feasible, key=lambda o: (round(o.speedup, 9), -o.drop, -(o.trial or 0)))

    def best_speedup(self) -> float:
        best = self.best()
        return best.speedup if best else 1.0

    # Evaluation ------------------------------------------------------------
    def _distributions(self) -> dict[str, Any]:
        import optuna

        return {k: optuna.distributions.CategoricalDistribution(self.space.choices) for k in self.space.keys}

    def _measure(self, key: tuple[str, ...], assignment: dict[str, str]) -> tuple[Any, bool]:
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached, True
        self.evaluations += 1
        return self.evaluate(assignment), False

    def _run_trial(self, trial: Any, phase: str) -> Outcome:
        import optuna

        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        assignment = {k: trial.params.get(k, FLOAT32) for k in self.space.keys}
        key = self.space.key_of(assignment)
        speedup = float(self.estimate(assignment))
        try:
            result, cached = self._measure(key, assignment)
        except BaseException:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        drop = float(result.drop)
        rejected = bool(getattr(result, "rejected", False))
        feasible = self.feasible(drop) and not rejected
        finite = lambda v: float(v) if math.isfinite(float(v)) else _INFEASIBLE  # noqa: E731
        attrs = {
            "phase": phase, "metric": finite(result.metric) if not rejected else math.nan, "drop": finite(drop),
            "output_error": finite(result.output_error), "nonfinite_outputs": int(result.nonfinite_outputs),
            "feasible": feasible, "rejected": rejected, "samples": int(getattr(result, "samples", 0) or 0),
            "cached": cached, "n_16bit": sum(v != FLOAT32 for v in assignment.values()),
        }
        for name, value in attrs.items():
            if not (isinstance(value, float) and math.isnan(value)):
                trial.set_user_attr(name, value)
        trial.set_constraint("budget", (drop - self.allowed) if math.isfinite(drop) else _INFEASIBLE)
        self.study.tell(trial, speedup)
        outcome = Outcome(assignment, speedup, attrs["metric"], drop, feasible, result.output_error,
                          attrs["nonfinite_outputs"], trial.number, phase, rejected)
        self.cache.setdefault(key, outcome)
        if self.on_trial is not None:
            self.on_trial(self)
        return outcome

    def consider(self, assignment: Mapping[str, str], phase: str, *, prune: bool = True) -> Outcome | None:
        """Evaluate ``assignment`` unless cached, or unable to beat the best; None when out of budget."""
        assignment = {k: assignment.get(k, FLOAT32) for k in self.space.keys}
        key = self.space.key_of(assignment)
        while True:
            self.refresh()
            if key in self.cache:
                return self.cache[key]
            if prune and self.estimate(assignment) <= self.best_speedup() + 1e-12:
                return Outcome(assignment, self.estimate(assignment), math.nan, math.nan, False, phase="pruned")
            if self.out_of_budget():
                return None
            self.study.enqueue_trial(dict(assignment), user_attrs={"phase": phase})
            trial = self.study.ask(self._distributions())
            outcome = self._run_trial(trial, phase)
            if self.space.key_of(outcome.assignment) == key:
                return outcome
            # Another worker took our enqueued trial and we ran one of theirs:
            # both land in the study; look again (ours is in the cache once done).

    def run(self) -> Outcome | None:
        """Run all phases until done or out of trials/time; return the best feasible outcome."""
        self._started = time.monotonic()
        self.refresh()
        upper = self.estimate(self.space.all_target())
        for phase in PHASES:
            if phase(self) is False or self.best_speedup() >= upper - 1e-12:
                break
        return self.best()

    def fallback(self, k: int) -> dict[str, str]:
        """Everything in the target format except the ``k`` most sensitive keys."""
        f32 = set(self.space.order[:k])
        return {key: (FLOAT32 if key in f32 else self.space.target) for key in self.space.keys}


# Phases: each returns False when the study is out of trials or time. -------------


def _phase_all(search: Search) -> bool:
    outcome = search.consider(search.space.all_target(), "all_16bit", prune=False)
    return outcome is not None and not outcome.feasible


def _phase_fallback(search: Search) -> bool:
    lo, hi = 0, len(search.space.order)
    while lo < hi:
        mid = (lo + hi) // 2
        outcome = search.consider(search.fallback(mid), "fallback", prune=False)
        if outcome is None:
            return False
        if outcome.feasible:
            hi = mid
        else:
            lo = mid + 1
    return True


def _phase_segments(search: Search) -> bool:
    best = search.best()
    if best is None:
        return True
    keys = list(search.space.keys)
    f32 = [i for i, k in enumerate(keys) if best.assignment[k] == FLOAT32]
    for a, b in zip(f32, f32[1:]):
        if 1 < b - a <= 3:  # bridge a short 16-bit gap between float32 decisions
            candidate = dict(best.assignment)
            for i in range(a + 1, b):
                candidate[keys[i]] = FLOAT32
            if search.consider(candidate, "segment") is None:
                return False
    return True


def _moves(search: Search, best: Outcome) -> list[dict[str, str]]:
    """Single flips and float32/16-bit swaps around ``best``, most promising first."""
    space = search.space
    moves = [{**best.assignment, k: c} for k in space.keys for c in space.choices if c != best.assignment[k]]
    low = [k for k in space.keys if best.assignment[k] == FLOAT32]
    high = [k for k in space.keys if best.assignment[k] != FLOAT32]
    moves += [{**best.assignment, a: space.target, b: FLOAT32} for a in low for b in high]
    moves.sort(key=lambda m: -search.estimate(m))
    return moves


def _phase_local(search: Search) -> bool:
    improved = True
    while improved:
        improved = False
        best = search.best()
        if best is None:
            return True
        for move in _moves(search, best):
            if search.estimate(move) <= search.best_speedup() + 1e-12:
                break
            outcome = search.consider(move, "local")
            if outcome is None:
                return False
            if outcome.feasible and outcome.speedup > best.speedup:
                improved = True
                break
    return True


def _phase_tpe(search: Search) -> bool:
    import optuna

    distributions = search._distributions()
    while not search.out_of_budget():
        search.refresh()
        trial = search.study.ask(distributions)
        assignment = {k: trial.params.get(k, FLOAT32) for k in search.space.keys}
        if search.space.key_of(assignment) not in search.cache and search.estimate(assignment) <= search.best_speedup() + 1e-12:
            trial.set_user_attr("phase", "tpe_pruned")
            search.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        search._run_trial(trial, "tpe")
    return True


PHASES = (_phase_all, _phase_fallback, _phase_segments, _phase_local, _phase_tpe)
