"""The search: one Optuna study over per-unit precision, under the budget constraint.

Plain Python over two callbacks: ``evaluate(assignment)`` (one pass of the
engine) and ``estimate(assignment)`` (the cost model, free). The objective is
the estimated speed-up; the constraint ``drop - allowed <= 0`` is set on each
trial with ``Trial.set_constraint`` as Optuna 5 intends it, so the TPE
sampler models feasibility and ``study.best_trial`` is the best feasible one.

Phases, each skipping any candidate whose *estimate* cannot beat the best
feasible one found so far (so most candidates cost nothing):

1. ``all_16bit``: every unit in the target format (enqueued). If feasible, no
   assignment can be faster; stop.
2. ``fallback``: return the most sensitive units (profile order) to float32,
   bisecting on how many: the accumulated fallback of the profile.
3. ``segment``: bridge short float32 gaps into contiguous float32 segments,
   which saves casts at precision boundaries.
4. ``local``: single flips and swaps around the best feasible assignment.
5. ``tpe``: Optuna's constrained TPE for the remaining trials.

Evaluated assignments are cached, and the cache is rebuilt from the study's
finished trials, so a resumed search (same storage) repeats no finished trial
and, with the same seed, replays the same decisions: the TPE sampler is
reseeded from ``(seed, trial number)`` before each of its trials. Several
workers may share one storage; each adds trials to the same study.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FLOAT32 = "float32"
_INFEASIBLE = 1e9  # Optuna's constraint value for a trial whose outputs went non-finite


@dataclass(frozen=True)
class Space:
    """Decision keys (units or blocks), their choices, and the profile's sensitivity order."""

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
    """One evaluated assignment."""

    assignment: dict[str, str]
    speedup: float
    metric: float
    drop: float
    feasible: bool
    output_error: float = math.nan
    nonfinite_outputs: int = 0
    trial: int | None = None
    phase: str = ""


@dataclass
class Search:
    """Drive one study. See the module docstring.

    Args:
        space: the decision space.
        evaluate: ``assignment -> {"metric", "drop", "output_error", "nonfinite_outputs"}``.
        estimate: ``assignment -> estimated speed-up``.
        allowed: the largest drop the budget allows.
        study: an ``optuna.Study`` (in memory, or on a storage to resume/share).
        n_trials: the total number of trials the study may hold.
        timeout: seconds for this call, or None.
        seed: seed of the TPE sampler.
        on_trial: called after each evaluated trial with the search.
    """

    space: Space
    evaluate: Callable[[dict[str, str]], dict[str, float]]
    estimate: Callable[[dict[str, str]], float]
    allowed: float
    study: Any
    n_trials: int = 60
    timeout: float | None = None
    seed: int = 0
    on_trial: Callable[["Search"], None] | None = None
    cache: dict[tuple[str, ...], Outcome] = field(default_factory=dict)
    evaluations: int = 0
    cache_hits: int = 0
    _started: float = field(default=0.0, repr=False)

    # Study bookkeeping -----------------------------------------------------------
    def sampler(self, trial_number: int):
        """A TPE sampler seeded from (seed, trial number): a resumed run proposes what the first would have."""
        import optuna

        return optuna.samplers.TPESampler(
            seed=(self.seed * 100_003 + trial_number) % (2**31), n_startup_trials=5, multivariate=True,
        )

    def refresh(self) -> None:
        """Rebuild the cache from the study's finished trials (ours, resumed, or other workers')."""
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "drop" not in t.user_attrs:
                continue
            assignment = {k: t.params.get(k, FLOAT32) for k in self.space.keys}
            key = self.space.key_of(assignment)
            if key not in self.cache:
                self.cache[key] = Outcome(
                    assignment, float(t.value), t.user_attrs["metric"], t.user_attrs["drop"], t.user_attrs["feasible"],
                    t.user_attrs.get("output_error", math.nan), t.user_attrs.get("nonfinite_outputs", 0), t.number,
                    t.user_attrs.get("phase", ""),
                )

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

    def _run_trial(self, trial: Any, phase: str) -> Outcome:
        import optuna

        assignment = {k: trial.params.get(k, FLOAT32) for k in self.space.keys}
        key = self.space.key_of(assignment)
        speedup = float(self.estimate(assignment))
        cached = self.cache.get(key)
        try:
            if cached is not None:
                self.cache_hits += 1
                result = {"metric": cached.metric, "drop": cached.drop, "output_error": cached.output_error,
                          "nonfinite_outputs": cached.nonfinite_outputs}
            else:
                result = self.evaluate(assignment)
                self.evaluations += 1
        except BaseException:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        drop = float(result["drop"])
        feasible = math.isfinite(drop) and drop <= self.allowed + 1e-9
        attrs = {
            "phase": phase, "metric": float(result["metric"]), "drop": drop if math.isfinite(drop) else _INFEASIBLE,
            "output_error": float(result["output_error"]) if math.isfinite(result["output_error"]) else _INFEASIBLE,
            "nonfinite_outputs": int(result["nonfinite_outputs"]), "feasible": feasible,
            "constraint": (drop - self.allowed) if math.isfinite(drop) else _INFEASIBLE,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "cached": cached is not None,
            "n_16bit": sum(v != FLOAT32 for v in assignment.values()),
        }
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        trial.set_constraint("budget", attrs["constraint"])
        self.study.tell(trial, speedup)
        outcome = Outcome(assignment, speedup, attrs["metric"], drop, feasible, result["output_error"],
                          attrs["nonfinite_outputs"], trial.number, phase)
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

    # Phases ------------------------------------------------------------------
    def run(self) -> Outcome | None:
        """Run all phases until done or out of trials/time; return the best feasible outcome."""
        self._started = time.monotonic()
        self.refresh()
        upper = self.estimate(self.space.all_target())
        steps = (self._phase_all, self._phase_fallback, self._phase_segments, self._phase_local, self._phase_tpe)
        for step in steps:
            if step() is False or self.best_speedup() >= upper - 1e-12:
                break
        return self.best()

    def _phase_all(self) -> bool:
        outcome = self.consider(self.space.all_target(), "all_16bit", prune=False)
        return outcome is not None and not outcome.feasible

    def fallback(self, k: int) -> dict[str, str]:
        """Everything in the target format except the ``k`` most sensitive keys."""
        f32 = set(self.space.order[:k])
        return {key: (FLOAT32 if key in f32 else self.space.target) for key in self.space.keys}

    def _phase_fallback(self) -> bool:
        lo, hi = 0, len(self.space.order)
        while lo < hi:
            mid = (lo + hi) // 2
            outcome = self.consider(self.fallback(mid), "fallback", prune=False)
            if outcome is None:
                return False
            if outcome.feasible:
                hi = mid
            else:
                lo = mid + 1
        return True

    def _phase_segments(self) -> bool:
        best = self.best()
        if best is None:
            return True
        keys = list(self.space.keys)
        f32 = [i for i, k in enumerate(keys) if best.assignment[k] == FLOAT32]
        for a, b in zip(f32, f32[1:]):
            if 1 < b - a <= 3:  # bridge a short 16-bit gap between float32 units
                candidate = dict(best.assignment)
                for i in range(a + 1, b):
                    candidate[keys[i]] = FLOAT32
                if self.consider(candidate, "segment") is None:
                    return False
        return True

    def _phase_local(self) -> bool:
        improved = True
        while improved:
            improved = False
            best = self.best()
            if best is None:
                return True
            moves = []
            for k in self.space.keys:
                for choice in self.space.choices:
                    if choice != best.assignment[k]:
                        moves.append({**best.assignment, k: choice})
            low = [k for k in self.space.keys if best.assignment[k] == FLOAT32]
            high = [k for k in self.space.keys if best.assignment[k] != FLOAT32]
            for a in low:
                for b in high:
                    moves.append({**best.assignment, a: self.space.target, b: FLOAT32})
            moves.sort(key=lambda m: -self.estimate(m))
            for move in moves:
                if self.estimate(move) <= self.best_speedup() + 1e-12:
                    break
                outcome = self.consider(move, "local")
                if outcome is None:
                    return False
                if outcome.feasible and outcome.speedup > best.speedup:
                    improved = True
                    break
        return True

    def _phase_tpe(self) -> bool:
        import optuna

        distributions = self._distributions()
        while not self.out_of_budget():
            self.refresh()
            self.study.sampler = self.sampler(len(self.study.trials))
            trial = self.study.ask(distributions)
            assignment = {k: trial.params.get(k, FLOAT32) for k in self.space.keys}
            if self.space.key_of(assignment) not in self.cache and self.estimate(assignment) <= self.best_speedup() + 1e-12:
                trial.set_user_attr("phase", "tpe_pruned")
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            self._run_trial(trial, "tpe")
        return True
