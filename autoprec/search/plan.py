"""The search: one Optuna study over the decisions' precision, under the budget constraint.

Plain Python over two callbacks: ``evaluate(assignment)`` (one pass of the
engine, which may stop early once the trial is certainly over budget) and
``estimate(assignment)`` (the cost model, free). The objective is the
estimated speed-up. Feasibility is the budget's (:class:`autoprec.Budget`);
each trial records ``drop - allowed`` under the trial system attribute
``constraints`` (the key Optuna's samplers and optuna-dashboard both read),
which TPE uses to model feasibility. A trial within the budget is COMPLETE
with the estimated speed-up as its value; one over the budget (or stopped
early, or with non-finite outputs) is PRUNED with the speed-up as its
intermediate value, so that every reader of the study, Optuna's
``study.best_trial`` and the dashboard's best trial alike, sees only
feasible trials as best. A non-finite drop is stored as no number at all
(``drop`` absent, ``nonfinite_outputs`` > 0), never as a sentinel.

Phases, each skipping any candidate whose *estimate* cannot beat the best
feasible one found so far (so most candidates cost nothing):

1. ``all_16bit``: every decision in the target format, except the choices
   ``Space.ruled_out`` holds: a layer that alone broke the budget in the
   profile's ablation never takes that format in any candidate (float32,
   or another 16-bit format where it has one). If feasible and nothing
   was ruled out, no assignment can be faster; stop.
2. ``fallback``: return the most sensitive decisions (profile order) to
   float32, bisecting on how many.
3. ``segment``: bridge short float32 gaps into contiguous float32 segments,
   which saves casts at precision boundaries.
4. ``local``: single flips and swaps around the best feasible assignment,
   :data:`ROUND` at a time, most promising first.
5. ``tpe``: Optuna's constrained TPE, :data:`ROUND` proposals at a time,
   until the study holds ``n_trials`` trials. A proposal that cannot beat
   the best, or was evaluated before, is recorded PRUNED without an evaluation.

**A plan that any number of workers share.** The search is a sequence of
rounds; a round's candidates depend only on the seed and the results of
earlier rounds, never on the order its own candidates finish in (pruning
compares with the best *as the round began*; TPE proposes from the
trials of earlier rounds, in a throwaway in-memory study, seeded by the
seed and the trial's place in the plan). So one worker and many evaluate
the same assignments and choose the same best. Each worker replays the plan
from the study: a finished candidate is a cache hit, free. Within a round a
worker claims, under the study's lock (:func:`autoprec.search.study.study_lock`),
the first candidate that no trial has finished or is running, as long as
the study holds fewer than ``n_trials`` trials (running ones count); it
waits while its round's last candidates run elsewhere. A worker killed
mid-trial leaves a RUNNING trial that :func:`autoprec.search.study.reap` fails;
its candidate is claimed again. No assignment is evaluated twice.

Stored trials keep their measured drop; whether it is feasible is judged
again under this run's budget, so a study resumed under another budget
never inherits a verdict. A trial stopped early keeps its certain lower
bound: under a looser budget it is evaluated again.

>>> space = Space(("a", "b"), ("float32", "mixed_float16"), "mixed_float16", ("b", "a"))
>>> space.key_of({"a": "mixed_float16"})
('mixed_float16', 'float32')
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoprec.formats import FLOAT32

logger = logging.getLogger("autoprec")

ROUND = 4  # candidates per round: a constant, so that the result never depends on how many workers share it
# Studies written before 0.2 stored a non-finite drop as this number; it is still read as infinite.
_LEGACY_INFEASIBLE = 1e9
CONSTRAINTS_KEY = "constraints"  # optuna.study._constrained_optimization's key: the list form every reader knows
_BUSY, _OUT, _MARKED = "busy", "out", "marked"  # what a claim gets instead of a trial to run


@dataclass(frozen=True)
class Space:
    """Decision keys (layers or blocks), their choices, and the profile's sensitivity order."""

    keys: tuple[str, ...]
    choices: tuple[str, ...]
    target: str
    order: tuple[str, ...]
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per-key choices, where they differ
    top: Mapping[str, str] = field(default_factory=dict)  # per key, its choice in the all-out assignment
    # Per key, the choices that broke the budget with that key alone in them (the profile's ablation): the drop
    # only grows as more layers compute in 16-bit, so no assignment with one of them can be feasible.
    ruled_out: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def choices_of(self, key: str) -> tuple[str, ...]:
        return tuple(self.options.get(key, self.choices))

    def allows(self, key: str, choice: str) -> bool:
        """Whether ``choice`` may still be feasible for ``key`` (float32 always is)."""
        return choice == FLOAT32 or choice not in self.ruled_out.get(key, ())

    def repair(self, assignment: Mapping[str, str]) -> dict[str, str]:
        """``assignment`` with every ruled-out choice replaced by the key's last choice still allowed (float32
        where no other is: with ``("float32", "mixed_bfloat16", "mixed_float16")`` and float16 ruled out, bfloat16).

        >>> Space(("a", "b"), ("float32", "bf16", "f16"), "f16", ("a", "b"), ruled_out={"a": ("f16",)}).repair(
        ...     {"a": "f16", "b": "f16"})
        {'a': 'bf16', 'b': 'f16'}
        """
        return {k: (c if self.allows(k, c) else self._instead(k)) for k, c in assignment.items()}

    def _instead(self, key: str) -> str:
        allowed = [c for c in self.choices_of(key) if c != FLOAT32 and self.allows(key, c)]
        return allowed[-1] if allowed else FLOAT32

    def all_target(self) -> dict[str, str]:
        """Every decision as far as it may go: the target, or a key's ``top`` choice (int4 for size); where that
        choice is ruled out, the key's last choice still allowed (:meth:`repair`)."""
        return self.repair({k: self.top.get(k, self.target) for k in self.keys})

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


@dataclass(frozen=True)
class WorkerResult:
    """What a search-only worker added to a shared study: nothing verified, nothing emitted.

    Example:
        >>> autoprec.tune(model, data, storage=url, study_name="s", search_only=True)  # doctest: +SKIP
        WorkerResult(study='s', trials=60, evaluated_here=21, best_estimate=1.812)
    """

    study_name: str
    trials: int
    evaluations: int
    best_speedup: float
    seconds: float

    @classmethod
    def of(cls, study: Any, *, evaluations: int, best_speedup: float, seconds: float) -> WorkerResult:
        from autoprec.search.study import evaluated_trials

        return cls(study.study_name, len(evaluated_trials(study)), evaluations, float(best_speedup), float(seconds))

    def __repr__(self) -> str:
        return (
            f"WorkerResult(study={self.study_name!r}, trials={self.trials}, evaluated_here={self.evaluations}, "
            f"best_estimate={self.best_speedup:.3f})"
        )

    def summary(self) -> str:
        return (
            f"autoprec: searched study {self.study_name!r} for {self.seconds:.1f}s: it holds {self.trials} finished "
            f"trials, {self.evaluations} evaluated here; best estimated speed-up so far {self.best_speedup:.3f}x "
            "(unverified). The run without search_only verifies and emits the policy."
        )


def stored_drop(attrs: Mapping[str, Any]) -> float:
    """A trial's stored drop: ``inf`` where none is stored (non-finite outputs) or a legacy sentinel is."""
    drop = attrs.get("drop")
    if drop is None or drop != drop:
        return math.inf
    return math.inf if float(drop) >= _LEGACY_INFEASIBLE else float(drop)


def stored_judged(attrs: Mapping[str, Any]) -> float:
    """The drop a stored trial is judged by: its upper confidence bound where one was stored, else its drop."""
    bound = attrs.get("drop_bound")
    if bound is None or bound != bound:
        return stored_drop(attrs)
    return math.inf if float(bound) >= _LEGACY_INFEASIBLE else float(bound)


def objective_value(trial: Any) -> float:
    """The estimated objective of an evaluated trial: its value, or a PRUNED one's intermediate value."""
    if trial.value is not None:
        return float(trial.value)
    values = trial.intermediate_values
    return float(values[max(values)]) if values else math.nan


def _as_complete(trial: Any, allowed: float) -> Any:
    import optuna

    if trial.state == optuna.trial.TrialState.COMPLETE:
        return trial
    drop = stored_judged(trial.user_attrs)
    violation = drop - allowed if math.isfinite(drop) else _LEGACY_INFEASIBLE
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE,
        value=objective_value(trial),
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=trial.user_attrs,
        system_attrs={**trial.system_attrs, CONSTRAINTS_KEY: [violation]},
    )


def make_sampler(seed: int):
    """The study's sampler: a :class:`ReplayableTPESampler` for ``seed``."""
    return _sampler_class()(seed)


@functools.cache
def _sampler_class() -> type:
    # Defined on first use: the class subclasses Optuna's, which `import autoprec.search.plan` must not import.
    import optuna

    class ReplayableTPESampler(optuna.samplers.BaseSampler):
        """TPE whose proposals for trial ``N`` depend only on ``(seed, N)`` and the trials before it.

        Each trial gets a fresh ``TPESampler`` seeded from the seed and the
        trial number, so a study resumed from its storage proposes what an
        uninterrupted one would have; the study keeps this one sampler. Its
        constant liar counts running trials as bad, so that a round's
        proposals spread out.
        """

        def __init__(self, seed: int = 0) -> None:
            self.seed = seed
            self._inner = self._tpe(0)

        def _tpe(self, number: int):
            import warnings

            with warnings.catch_warnings():  # "multivariate is experimental", once per trial otherwise
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(
                    seed=(self.seed * 100_003 + number) % (2**31),
                    n_startup_trials=5,
                    multivariate=True,
                    constant_liar=True,
                )

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


def _trial_attrs(result: Any, assignment: dict[str, str], *, phase: str, feasible: bool, cached: bool) -> dict:
    """The user attributes a trial stores: what it measured, and how it was judged."""
    rejected = bool(getattr(result, "rejected", False))
    return {
        "phase": phase,
        "metric": _finite_or_nan(result.metric) if not rejected else math.nan,
        "drop": _finite_or_nan(float(result.drop)),
        "drop_bound": _finite_or_nan(getattr(result, "bound", math.nan)) if not rejected else math.nan,
        "output_error": _finite_or_nan(result.output_error),
        "nonfinite_outputs": int(result.nonfinite_outputs),
        "feasible": feasible,
        "rejected": rejected,
        "samples": int(getattr(result, "samples", 0) or 0),
        "cached": cached,
        "n_16bit": sum(v != FLOAT32 for v in assignment.values()),
    }


def _finite_or_nan(value: float) -> float:
    """``value``, or NaN when it is not finite: a NaN attribute is not stored."""
    return float(value) if math.isfinite(float(value)) else math.nan


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _SharedStudy:
    """The search's view of its study, shared with other workers: what is finished, what runs, taking the next trial.

    A mixin of :class:`Search`, which holds the fields it reads.
    """

    # Search's fields and methods this mixin uses, declared for the type checker only (no values, so no fields).
    space: Space
    study: Any
    feasible: Callable[[float], bool]
    n_trials: int
    timeout: float | None
    poll: float
    cache: dict[tuple[str, ...], Outcome]
    _started: float
    _frozen: dict[tuple[str, ...], Any]
    _running: set[tuple[str, ...]]
    _taken: int
    _proposed: set[int]
    _proposing: set[int]

    if TYPE_CHECKING:

        def _run_trial(self, trial: Any, phase: str) -> Outcome | None: ...

        def distributions(self) -> dict[str, Any]: ...

    def refresh(self) -> None:
        """Read the study: the cache from finished trials (ours, resumed, other workers'), what runs, what counts."""
        import optuna

        state = optuna.trial.TrialState
        running: set[tuple[str, ...]] = set()
        proposed: set[int] = set()
        proposing: set[int] = set()
        taken = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state == state.RUNNING:
                running.add(self.space.key_of(t.params))
            taken += t.state in (state.RUNNING, state.COMPLETE, state.PRUNED)  # not FAIL, nor a stale WAITING one
            if "proposal" in t.user_attrs and t.state in (state.RUNNING, state.COMPLETE, state.PRUNED):
                (proposing if t.state == state.RUNNING else proposed).add(int(t.user_attrs["proposal"]))
            if t.state in (state.COMPLETE, state.PRUNED) and "feasible" in t.user_attrs:  # an evaluated trial
                self._cache_trial(t)
        self._running, self._taken, self._proposed, self._proposing = running, taken, proposed, proposing

    def _cache_trial(self, t: Any) -> None:
        attrs = t.user_attrs
        assignment = {k: t.params.get(k, FLOAT32) for k in self.space.keys}
        key = self.space.key_of(assignment)
        if key in self._frozen:
            return
        drop = stored_drop(attrs)
        rejected = bool(attrs.get("rejected", False))
        feasible = self.feasible(stored_judged(attrs))
        if rejected and feasible:
            return  # its lower bound fits this budget: only a full pass can tell
        self._frozen[key] = t  # also for a trial this worker ran: TPE's history must not depend on who ran what
        self.cache.setdefault(
            key,
            Outcome(
                assignment,
                objective_value(t),
                attrs.get("metric", math.nan),
                drop,
                feasible and not rejected,
                attrs.get("output_error", math.nan),
                attrs.get("nonfinite_outputs", 0),
                t.number,
                attrs.get("phase", ""),
                rejected,
            ),
        )

    def finished(self) -> int:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def _timed_out(self) -> bool:
        return self.timeout is not None and time.monotonic() - self._started > self.timeout

    def _share_out(self, todo: dict[Any, tuple[dict[str, str], str, str]]) -> None:
        """Claim and run ``todo``'s entries until each has finished somewhere, or none may start."""
        wait = self.poll / 16
        while True:
            claimed = self._claim(todo)
            if claimed is None or claimed is _OUT:
                return
            if claimed is _BUSY:  # the round's last candidates run in other workers: look again soon
                time.sleep(wait)
                wait = min(2 * wait, self.poll)
                continue
            if claimed is not _MARKED:
                self._run_trial(*claimed)
            wait = self.poll / 16

    def _done(self, ident: Any) -> bool:
        return ident[1] in self._proposed if ident[0] == "proposal" else ident in self.cache

    def _busy(self, ident: Any) -> bool:
        return ident[1] in self._proposing if ident[0] == "proposal" else ident in self._running

    def _claim(self, todo: dict[Any, tuple[dict[str, str], str, str]]) -> Any:
        """Under the study's lock, take the first entry no trial holds: ``(trial, phase)`` to run.

        Else _MARKED (a marker, told PRUNED here), _BUSY (wait: the rest run
        elsewhere), _OUT (no trial may start), or None (all done).
        """
        import optuna

        from autoprec.search.study import reap, study_lock

        if self._timed_out():
            return _OUT
        with study_lock(self.study):
            reap(self.study)
            self.refresh()
            left = [(i, entry) for i, entry in todo.items() if not self._done(i)]
            if not left:
                return None
            free = [(i, entry) for i, entry in left if not self._busy(i)]
            if not free:
                return _BUSY
            if self._taken >= self.n_trials:
                # A running trial whose worker dies frees its place: wait for the running ones to end.
                return _BUSY if self._running else _OUT
            ident, (assignment, phase, skip) = free[0]
            if ident[0] != "proposal":
                return self._ask(assignment, {"phase": phase}), phase
            # Decided here, under the lock: a proposal cached by now was evaluated in an earlier round (or
            # for an earlier proposal of this one), the same for every worker.
            skip = "seen" if not skip and self.space.key_of(assignment) in self.cache else skip
            trial = self._ask(assignment, {"phase": f"{phase}_{skip}" if skip else phase, "proposal": ident[1]})
            if not skip:
                return trial, phase
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return _MARKED

    def _ask(self, assignment: dict[str, str], attrs: dict[str, Any]) -> Any:
        import optuna

        key = self.space.key_of(assignment)
        self.study.enqueue_trial(dict(assignment), user_attrs={**attrs, "worker": _worker()})
        while True:
            with warnings.catch_warnings():  # autoprec records the heartbeats itself (autoprec.search.study.heartbeat)
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = self.study.ask(self.distributions())
            if self.space.key_of(trial.params) == key and all(trial.user_attrs.get(k) == v for k, v in attrs.items()):
                if trial.user_attrs.get("worker") != _worker():  # a popped trial may carry a dead worker's name
                    trial.set_user_attr("worker", _worker())
                return trial
            # A trial enqueued by a worker killed before it asked for it: no plan waits for it any more.
            trial.set_user_attr("phase", "stale")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)


@dataclass
class Search(_SharedStudy):
    """Drive one study, alone or with other workers. See the module docstring.

    Args:
        space: the decision space.
        evaluate: ``assignment -> Evaluation`` (``metric``, ``drop``, ``output_error``,
            ``nonfinite_outputs``, ``rejected``).
        estimate: ``assignment -> estimated speed-up``.
        feasible: ``drop -> bool``, the budget's rule.
        allowed: the largest drop the budget allows (for the stored constraint).
        study: an ``optuna.Study`` (in memory, or on a storage to resume/share).
        n_trials: the total number of trials the study may hold, all workers together.
        timeout: seconds for this call, or None.
        on_trial: called after each evaluated trial with the search.
        seed: seeds TPE's proposals; default the study sampler's ``seed``.
        poll: the longest wait, in seconds, between looks at a study whose
            round is running elsewhere.

    Example:
        >>> best = Search(space, evaluate, estimate, feasible, 0.005, study, n_trials=40).run()  # doctest: +SKIP
    """

    space: Space
    evaluate: Callable[[dict[str, str]], Any]
    estimate: Callable[[dict[str, str]], float]
    feasible: Callable[[float], bool]
    allowed: float
    study: Any
    n_trials: int = 60
    timeout: float | None = None
    on_trial: Callable[[Search], None] | None = None
    seed: int | None = None
    poll: float = 0.25
    cache: dict[tuple[str, ...], Outcome] = field(default_factory=dict)
    evaluations: int = 0
    cache_hits: int = 0
    _started: float = field(default=0.0, repr=False)
    _position: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)  # the plan, in order
    _frozen: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)  # key -> its finished trial
    _running: set[tuple[str, ...]] = field(default_factory=set, repr=False)
    _taken: int = 0  # trials that count against n_trials: running or finished
    _proposed: set[int] = field(default_factory=set, repr=False)  # TPE proposals whose trial has finished
    _proposing: set[int] = field(default_factory=set, repr=False)  # TPE proposals whose trial runs

    def best(self) -> Outcome | None:
        """The best feasible outcome of the plan so far (ties: lower drop, then the earlier in the plan).

        Only the plan's candidates count, never a trial another worker has
        already finished for a later round, so every worker decides alike.
        """
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def ranked(self) -> list[Outcome]:
        """The plan's feasible outcomes, best first: highest speed-up, then lower drop, then earlier in the plan."""
        feasible = [(o, self._position[k]) for k, o in self.cache.items() if o.feasible and k in self._position]
        feasible.sort(key=lambda op: (round(op[0].speedup, 9), -op[0].drop, -op[1]), reverse=True)
        return [o for o, _ in feasible]

    def best_speedup(self) -> float:
        best = self.best()
        return best.speedup if best else 1.0

    def history(self) -> list[Any]:
        """The plan's finished trials in plan order, as TPE proposes from them.

        An infeasible trial is stored PRUNED; TPE sees it as a COMPLETE trial
        with its speed-up and its violation (unbounded where the drop is not
        finite), which is what its constrained model of feasibility needs.
        """
        ordered = sorted(self._position, key=self._position.__getitem__)
        return [_as_complete(self._frozen[k], self.allowed) for k in ordered if k in self._frozen]

    def distributions(self) -> dict[str, Any]:
        import optuna

        return {k: optuna.distributions.CategoricalDistribution(self.space.choices_of(k)) for k in self.space.keys}

    # Rounds ----------------------------------------------------------------
    def consider(self, assignment: Mapping[str, str], phase: str, *, prune: bool = True) -> Outcome | None:
        """Evaluate ``assignment`` unless cached, or unable to beat the best; None when out of trials or time."""
        return self.consider_round([assignment], phase, prune=prune)[0]

    def consider_round(
        self, assignments: Sequence[Mapping[str, str]], phase: str, *, prune: bool = True, proposals: int | None = None
    ) -> list[Outcome | None]:
        """Evaluate candidates that do not depend on one another; the study's workers share them out.

        A candidate is skipped when cached, or (``prune``) when its estimate
        cannot beat the best feasible outcome as the round began. TPE's
        proposals (numbered from ``proposals``) take a trial each, so that TPE
        stops once the study holds ``n_trials``: one skipped, or cached by the
        time it is claimed, is recorded PRUNED without an evaluation. Returns one
        outcome per candidate (``phase="pruned"`` for a pruned one), and None
        for those left when the study ran out of trials or this call of time.
        """
        items = [{k: a.get(k, FLOAT32) for k in self.space.keys} for a in assignments]
        keys = [self.space.key_of(a) for a in items]
        self.refresh()
        floor = self.best_speedup()  # before the round's keys join the plan: its own results must not move it
        for key in keys:
            self._position.setdefault(key, len(self._position))
        todo: dict[Any, tuple[dict[str, str], str, str]] = {}
        skip: dict[int, str] = {}
        for j, (key, a) in enumerate(zip(keys, items, strict=True)):
            if key in keys[:j]:
                skip[j] = "seen"
            elif prune and key not in self.cache and self.estimate(a) <= floor + 1e-12:
                skip[j] = "pruned"
            if proposals is not None:  # a TPE proposal: its place in the plan, not its assignment, is its identity
                todo[("proposal", proposals + j)] = (a, phase, skip.get(j, ""))
            elif j not in skip and key not in self.cache:
                todo[key] = (a, phase, "")
        self._share_out(todo)
        return [
            None
            if proposals is not None and proposals + j not in self._proposed
            else self.cache[k]
            if k in self.cache
            else Outcome(a, self.estimate(a), math.nan, math.nan, False, phase="pruned")
            if skip.get(j) == "pruned"
            else None
            for j, (k, a) in enumerate(zip(keys, items, strict=True))
        ]

    # Evaluation ------------------------------------------------------------
    def _measure(self, key: tuple[str, ...], assignment: dict[str, str]) -> tuple[Any, bool]:
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached, True
        self.evaluations += 1
        return self.evaluate(assignment), False

    def _run_trial(self, trial: Any, phase: str) -> Outcome | None:
        import optuna

        from autoprec.search.study import heartbeat

        assignment = {k: trial.params.get(k, FLOAT32) for k in self.space.keys}
        key = self.space.key_of(assignment)
        speedup = float(self.estimate(assignment))
        try:
            with heartbeat(self.study, trial):
                result, cached = self._measure(key, assignment)
        except BaseException:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise
        drop = float(result.drop)
        judged = float(getattr(result, "judged", drop))
        rejected = bool(getattr(result, "rejected", False))
        feasible = self.feasible(judged) and not rejected
        attrs = _trial_attrs(result, assignment, phase=phase, feasible=feasible, cached=cached)
        if not self._store(trial, attrs, judged=judged, speedup=speedup):
            return None
        outcome = Outcome(
            assignment,
            speedup,
            attrs["metric"],
            drop,
            feasible,
            result.output_error,
            attrs["nonfinite_outputs"],
            trial.number,
            phase,
            rejected,
        )
        self.cache.setdefault(key, outcome)
        if self.on_trial is not None:
            self.on_trial(self)
        return outcome

    def _store(self, trial: Any, attrs: dict[str, Any], *, judged: float, speedup: float) -> bool:
        """Tell the study the trial's outcome; False when another worker failed it meanwhile."""
        import optuna

        try:
            for name, value in attrs.items():
                if not (isinstance(value, float) and math.isnan(value)):
                    trial.set_user_attr(name, value)
            if math.isfinite(judged):  # a non-finite drop has no violation to store; PRUNED says it is infeasible
                trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_KEY, [judged - self.allowed])
            if attrs["feasible"]:
                self.study.tell(trial, speedup)
            else:
                trial.report(speedup, 0)
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker took this one for dead (its heartbeat went stale) and failed it: the
            # assignment will be claimed again; this result is not part of the study.
            logger.warning(
                "autoprec: trial %d was failed by another worker while it ran; its result is dropped.", trial.number
            )
            return False
        return True

    def run(self) -> Outcome | None:
        """Run all phases until done or out of trials/time; return the best feasible outcome."""
        self._started = time.monotonic()
        if not self.space.keys:  # every layer pinned: there is nothing to decide, and no trial to run
            return None
        self.refresh()
        # Everything in the target is the fastest assignment there is; with choices ruled out, a float32 layer
        # that bridges two ruled-out ones may save the casts between them, so the phases go on.
        upper = math.inf if self.space.ruled_out else self.estimate(self.space.all_target())
        for phase in PHASES:
            if phase(self) is False or self.best_speedup() >= upper - 1e-12:
                break
        return self.best()

    def fallback(self, k: int) -> dict[str, str]:
        """Everything in the target format except the ``k`` most sensitive keys."""
        f32 = set(self.space.order[:k])
        top = self.space.all_target()
        return {key: (FLOAT32 if key in f32 else top[key]) for key in self.space.keys}


# Phases: each returns False when the study is out of trials or time. -------------


def _phase_all(search: Search) -> bool:
    outcome = search.consider(search.space.all_target(), "all_16bit", prune=False)
    # Feasible, it is the fastest unless choices were ruled out (see Search.run): then bridging may still win.
    return outcome is not None and (not outcome.feasible or bool(search.space.ruled_out))


def _phase_fallback(search: Search) -> bool:
    if search.best() is not None:  # the first trial met the budget: nothing to fall back from
        return True
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
    candidates = []
    for a, b in itertools.pairwise(f32):
        if 1 < b - a <= 3:  # bridge a short 16-bit gap between float32 decisions
            candidates.append({**best.assignment, **{keys[i]: FLOAT32 for i in range(a + 1, b)}})
    return None not in search.consider_round(candidates, "segment")


def _moves(search: Search, best: Outcome) -> list[dict[str, str]]:
    """Single flips and float32/16-bit swaps around ``best`` whose estimate beats it, most promising first."""
    space = search.space
    moves = [
        {**best.assignment, k: c}
        for k in space.keys
        for c in space.choices_of(k)
        if c != best.assignment[k] and space.allows(k, c)
    ]
    low = [k for k in space.keys if best.assignment[k] == FLOAT32 and space.allows(k, space.target)]
    high = [k for k in space.keys if best.assignment[k] != FLOAT32]
    moves += [{**best.assignment, a: space.target, b: FLOAT32} for a in low for b in high]
    scored = [(search.estimate(m), m) for m in moves]  # once each: an estimate walks the whole graph
    return [m for e, m in sorted(scored, key=lambda em: -em[0]) if e > best.speedup + 1e-12]


def _phase_local(search: Search) -> bool:
    """Hill-climb: evaluate the moves that could beat the best, a round at a time; restart from the best improvement."""
    while True:
        best = search.best()
        if best is None:
            return True
        moves = _moves(search, best)
        for start in range(0, len(moves), ROUND):
            outcomes = search.consider_round(moves[start : start + ROUND], "local")
            if None in outcomes:
                return False
            if any(o is not None and o.feasible and o.speedup > best.speedup for o in outcomes):
                break
        else:
            return True


def _propose(search: Search, first: int, count: int) -> list[dict[str, str]]:
    """TPE's proposals number ``first`` to ``first + count - 1`` of the plan: the same in every worker.

    They are asked of a throwaway in-memory study holding the plan's finished
    trials, so that neither trials of later rounds nor the running trials of
    other workers reach the sampler. Proposal ``N`` is seeded by ``(seed,
    N)``: a round whose proposals were all pruned leaves the history as it
    was, and the next round must still propose afresh.
    """
    import optuna

    seed = search.seed if search.seed is not None else int(getattr(search.study.sampler, "seed", 0))
    replayable = make_sampler(seed)
    scratch = optuna.create_study(direction="maximize")
    scratch.add_trials(search.history())
    distributions, proposals = search.distributions(), []
    for number in range(first, first + count):
        scratch.sampler = replayable._tpe(number)  # the earlier proposals of the round stay running: its liars
        # A proposal with a ruled-out choice is taken repaired (Space.repair): the same in every worker.
        proposals.append(search.space.repair(scratch.ask(distributions).params))
    return proposals


def _phase_tpe(search: Search) -> bool:
    number = 0
    while True:  # every proposal takes a trial, evaluated or not: the study's n_trials ends the phase
        outcomes = search.consider_round(_propose(search, number, ROUND), "tpe", proposals=number)
        if None in outcomes:
            return False
        number += ROUND


PHASES = (_phase_all, _phase_fallback, _phase_segments, _phase_local, _phase_tpe)
