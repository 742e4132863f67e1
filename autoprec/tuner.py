"""``autoprec.tune``: the main job, as a sequence of stages.

``tune`` reads as its stages, each a function with typed inputs and outputs:

1. :meth:`TuneOptions.create` validates every argument;
2. :func:`open_run` opens the session (model, data, metric, float32 baseline,
   graph, engine), pretraining a float32 copy first if the model is untrained;
3. :func:`profile_stage` measures each layer's sensitivity;
4. :func:`autoprec.search.space.build_space` fixes the decisions;
5. :func:`search_stage` runs the Optuna study under the budget;
6. :func:`verify_stage` checks the winner with real Keras policies (and a
   training run on request), falling back decision by decision;
7. :func:`result_stage` emits the policy, the model and the tables.

>>> result = autoprec.tune(model, (x_val, y_val), budget="0.5%")   # doctest: +SKIP
>>> result.policy.save("policy.json")                               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from autoprec import backends
from autoprec.budget import BoundBudget, Budget
from autoprec.data import TRAIN_BATCH_SIZE
from autoprec.errors import (
    DataError,
    UnsupportedModelError,
    UntrainedModelError,
    describe,
)
from autoprec.formats import (
    FLOAT32,
    QUANTIZED_MODES,
)
from autoprec.graph import BLOCK, MOVEMENT, SUBCLASSED
from autoprec.metrics import units_per_sample
from autoprec.options import TuneOptions
from autoprec.profiling.stats import hazard, hazard_share
from autoprec.progress import Progress
from autoprec.result import TuneResult
from autoprec.search.cost import CostModel, Device, resolve_device, slower_note
from autoprec.search.space import DecisionSpace, build_space
from autoprec.session import Session, open_session
from autoprec.verify.bounds import AUTO as AUTO_CONFIDENCE
from autoprec.verify.bounds import DEFAULT_CONFIDENCE, auto_confidence, no_change_bound
from autoprec.verify.holdout import held_session, split_holdout
from autoprec.verify.real import (
    TrainCheck,
    fall_back,
    nonfinite_origins,
    predict_batches,
    real_check,
    train_check,
    verify_eval,
)

if TYPE_CHECKING:
    from autoprec.search.plan import WorkerResult

logger = logging.getLogger("autoprec")

DEFAULT_PRETRAIN_STEPS = 200


# A worker (search_only=True) gets the study's summary; every other call the verified result. The overloads
# say so to a type checker; the signature below them is the one help() and the docs show.
@overload
def tune(
    model: Any,
    data: Any,
    budget: str | float | Budget = ...,
    *,
    metric: Any = ...,
    higher_is_better: bool | None = ...,
    target: str | None = ...,
    candidates: Sequence[str] | None = ...,
    granularity: str = ...,
    keep_float32: str | Sequence[str] = ...,
    force_16bit: str | Sequence[str] = ...,
    objective: str | None = ...,
    cost: str = ...,
    device: str | Device | None = ...,
    n_trials: int = ...,
    timeout: float | None = ...,
    seed: int = ...,
    storage: Any = ...,
    study_name: str | None = ...,
    verify: str = ...,
    train_data: Any = ...,
    steps: int = ...,
    pretrain_steps: int | None = ...,
    max_fallbacks: int = ...,
    confidence: float | str | None = ...,
    holdout: Any = ...,
    calibration_data: Any = ...,
    batch_size: int | str = ...,
    profile_batch_size: int | str = ...,
    nonfinite_inputs: str = ...,
    inplace: bool = ...,
    verbose: int = ...,
    search_only: Literal[True],
) -> WorkerResult: ...
@overload
def tune(
    model: Any,
    data: Any,
    budget: str | float | Budget = ...,
    *,
    metric: Any = ...,
    higher_is_better: bool | None = ...,
    target: str | None = ...,
    candidates: Sequence[str] | None = ...,
    granularity: str = ...,
    keep_float32: str | Sequence[str] = ...,
    force_16bit: str | Sequence[str] = ...,
    objective: str | None = ...,
    cost: str = ...,
    device: str | Device | None = ...,
    n_trials: int = ...,
    timeout: float | None = ...,
    seed: int = ...,
    storage: Any = ...,
    study_name: str | None = ...,
    verify: str = ...,
    train_data: Any = ...,
    steps: int = ...,
    pretrain_steps: int | None = ...,
    max_fallbacks: int = ...,
    confidence: float | str | None = ...,
    holdout: Any = ...,
    calibration_data: Any = ...,
    batch_size: int | str = ...,
    profile_batch_size: int | str = ...,
    nonfinite_inputs: str = ...,
    inplace: bool = ...,
    verbose: int = ...,
    search_only: Literal[False] = ...,
) -> TuneResult: ...


def tune(
    model: Any,
    data: Any,
    budget: str | float | Budget = "0.5%",
    *,
    metric: Any = None,
    higher_is_better: bool | None = None,
    target: str | None = None,
    candidates: Sequence[str] | None = None,
    granularity: str = "layer",
    keep_float32: str | Sequence[str] = (),
    force_16bit: str | Sequence[str] = (),
    objective: str | None = None,
    cost: str = "estimate",
    device: str | Device | None = None,
    n_trials: int = 60,
    timeout: float | None = None,
    seed: int = 0,
    storage: Any = None,
    study_name: str | None = None,
    verify: str = "eval",
    train_data: Any = None,
    steps: int = 50,
    pretrain_steps: int | None = None,
    max_fallbacks: int = 8,
    confidence: float | str | None = "auto",
    holdout: Any = None,
    calibration_data: Any = None,
    batch_size: int | str = "auto",
    profile_batch_size: int | str = "auto",
    nonfinite_inputs: str = "raise",
    inplace: bool = False,
    verbose: int = 1,
    search_only: bool = False,
) -> TuneResult | WorkerResult:
    """Find the fastest per-layer precision whose metric stays within ``budget``.

    Every option is keyword-only and validated (by :class:`autoprec.options.TuneOptions`)
    before any work on the model starts.

    Args:
        model: a float32 Keras model (Functional, Sequential, nested; subclassed
            models are tuned with real policies set in place).
        data: evaluation data: ``(x, y)``, a ``tf.data.Dataset`` or a ``PyDataset``.
        budget: largest allowed metric drop: ``"0.5%"`` / ``0.005`` (absolute),
            ``"1% relative"`` / ``Budget(0.01, relative=True)``.
        metric: what the budget is judged on: a Keras metric name or instance, a
            loss, a callable ``(y_true, y_pred) -> float`` (with ``higher_is_better``),
            or ``{output name: metric}``; by default the model's first compiled
            metric, else its loss.
        higher_is_better: the direction of a callable ``metric``.
        target: the 16-bit format to tune for: ``"mixed_float16"`` (the default),
            ``"mixed_bfloat16"``, or ``"auto"`` (float16 on a CUDA GPU, bfloat16 elsewhere).
        candidates: the formats each layer chooses among, ``float32`` first, e.g.
            ``("float32", "mixed_float16", "mixed_bfloat16")`` for a three-way choice,
            or with Keras's quantized modes ``"int8"``, ``"int4"``, ``"float8"``.
        granularity: ``"layer"`` (one decision per layer) or ``"block"`` (one per
            residual or transformer block).
        keep_float32: layer paths, or full-match regexes, pinned to float32.
        force_16bit: layer paths, or full-match regexes, put in 16-bit whatever the profile says.
        objective: ``"speed"`` (the estimated training speed-up) or ``"size"``
            (weight bytes); by default size when integer candidates are offered.
        cost: ``"estimate"`` (the cost model) or ``"measured"`` (the best
            candidates' training steps timed on this machine).
        device: the device the policy is for, as the cost model knows it (``"gpu"``,
            ``"tpu"``, ``"cpu"``, ``"this"`` or a :class:`autoprec.search.cost.Device`);
            by default an accelerator for the target.
        n_trials: the most trials the search runs.
        timeout: seconds after which the search stops, or None.
        seed: the sampler's seed: the same seed gives the same policy.
        storage: an Optuna storage (URL or object) to resume or share the study.
        study_name: the study's name in ``storage``.
        verify: ``"eval"`` (real Keras policies on the evaluation data) or
            ``"train"`` (also a loss-scaled training run on ``train_data``).
        train_data: ``(x, y)`` for ``verify="train"`` and for pretraining.
        steps: training steps of the ``verify="train"`` check.
        pretrain_steps: steps to train an untrained model's float32 copy first.
        max_fallbacks: decisions the verification may return to float32.
        confidence: e.g. 0.95: the budget judges the drop's one-sided upper
            confidence bound, paired over the same samples (:mod:`autoprec.verify.bounds`);
            None judges the measured drop; ``"auto"`` (the default) is 0.95 wherever the
            data can resolve the budget at it, else the measured drop, with a warning
            naming the samples needed.
        holdout: data the search never sees, on which the winner must also hold:
            ``"auto"`` (a fifth from 5,000 samples on), a fraction, separate ``(x, y)``
            data, or None (the default; :mod:`autoprec.verify.holdout`).
        calibration_data: inputs whose ranges set float8 scales (default: ``data``).
        batch_size: evaluation batch size; ``"auto"`` fits memory.
        profile_batch_size: the profile's micro-batch size; ``"auto"`` fits memory.
        nonfinite_inputs: ``"raise"`` on non-finite samples in ``data``, or ``"drop"`` them.
        inplace: tune ``model`` itself instead of a copy (a subclassed model then
            keeps the tuned policies).
        verbose: 0 silent, 1 progress lines.
        search_only: a worker that adds trials to a shared ``storage`` and returns a
            :class:`autoprec.search.plan.WorkerResult`, verifying and emitting nothing.

    Returns:
        A :class:`TuneResult` (with ``search_only=True``, a :class:`autoprec.search.plan.WorkerResult`).

    Raises:
        BudgetError: the budget is malformed, or allows any result at all.
        ArgumentError: another option has the wrong type or value (a storage URL that cannot be opened too).
        StudyError: a stored study belongs to another search.
        PolicyError: a pin matches no layer, a layer is in both lists, or an output is forced.
        DataError: the data is malformed, non-finite, too small for the budget, or does not fit the model.
        ModelError: the model's weights or float32 outputs are not finite.
        MetricError: the metric cannot be resolved.
        UntrainedModelError: the model scores at chance level and no ``train_data`` was given.
        OutputError: an output path cannot be written.

    Example:
        >>> result = tune(model, (x_val, y_val), budget="0.5%", target="mixed_bfloat16")  # doctest: +SKIP
        >>> result.policy.save("policy.json")                                              # doctest: +SKIP
    """
    options = dict(locals())  # every keyword, as given: validated in one place before anything else
    del options["model"], options["data"], options["budget"]
    return run(model, data, TuneOptions.create(budget, **options))


def run(model: Any, data: Any, opts: TuneOptions) -> TuneResult | WorkerResult:
    """The stages of :func:`tune` for validated options."""
    progress = Progress(opts.verbose)
    started = time.monotonic()
    model = working_model(model, inplace=opts.inplace)
    clock = StageClock()
    session, pretrained = clock.run("open", open_run, model, data, opts, progress)
    frame = clock.run("profile", profile_stage, session, opts, progress)
    space = build_space(
        session.graph,
        frame,
        granularity=opts.granularity,
        target=opts.target,
        choices=opts.choices,
        tolerance=ablation_tolerance(session, opts.budget),
        objective=opts.objective,
        # The ablation measured layers alone in the target format: only there does it rule a choice out.
        allowed=session.rule(opts.budget).allowed if opts.target in opts.choices else None,
    )
    device, device_why = resolve_device(opts.device, target=opts.target, target_why=opts.target_why)
    progress.say(f"autoprec: cost model for a {device.name} ({device_why}).")
    cost = CostModel(session.graph, device=device, quantized_speed=_speeds(opts))
    found = clock.run(
        "search", search_stage, session, space, cost, opts, progress, ranked_by=frame.attrs.get("method", "full")
    )
    if opts.search_only:  # a worker: the run without search_only verifies and emits
        from autoprec.search.plan import WorkerResult

        best = cost.speedup(space.expand(found.assignment)) if found.feasible else 1.0
        return WorkerResult.of(
            found.study, evaluations=found.evaluations, best_speedup=best, seconds=time.monotonic() - started
        )
    space, found = clock.run("split", split_stage, session, space, found, cost, opts, progress)
    verified = clock.run("verify", verify_stage, session, space, frame, found, cost, opts, progress)
    progress.stage_seconds = clock.seconds
    progress.stage_peak_rss_gb = clock.peak_rss_gb
    costs = stage_passes(clock.seconds, session.pass_seconds)
    if costs:
        progress.say(
            "autoprec: cost in float32 passes over the data: " + ", ".join(f"{k} {v:g}" for k, v in costs.items())
        )
    return result_stage(
        model,
        session,
        space,
        frame,
        found,
        verified,
        cost,
        opts,
        pretrained,
        seconds=time.monotonic() - started,
        progress=progress,
    )


class StageClock:
    """Wall seconds per pipeline stage, for the cost in passes (:func:`stage_passes`), and the peak RSS after each.

    The process's peak resident set only grows, so the first stage whose
    figure jumps is the one that holds the memory (NaN where the platform
    has no ``resource`` module).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_gb: dict[str, float] = {"start": round(backends.peak_rss_gb(), 3)}

    def run(self, name: str, stage: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return stage(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started
            self.peak_rss_gb[name] = round(backends.peak_rss_gb(), 3)


def stage_passes(seconds: dict[str, float], pass_seconds: float) -> dict[str, float]:
    """Each stage's wall time in float32 passes over the evaluation data, and their ``total``.

    The unit is one warm float32 forward pass of the model over the whole
    evaluation data (:attr:`Session.pass_seconds`), so the figures compare
    across machines and models: ``open`` includes the baseline pass, the
    graph walk and the first trace.

    >>> stage_passes({"open": 2.0, "search": 6.0}, 2.0)
    {'open': 1.0, 'search': 3.0, 'total': 4.0}
    """
    if not pass_seconds or pass_seconds <= 0:
        return {}
    out = {name: round(sec / pass_seconds, 2) for name, sec in seconds.items()}
    out["total"] = round(sum(seconds.values()) / pass_seconds, 2)
    return out


def working_model(model: Any, *, inplace: bool) -> Any:
    """The model tune may change: the user's own only with ``inplace=True``.

    A path is loaded (Keras ``safe_mode``). Functional and Sequential models
    are cloned wherever policies are applied, so they are never changed. A
    subclassed model cannot be cloned layer by layer: its real policies are
    set on the model tune verifies, so without ``inplace=True`` tune works on
    a copy rebuilt from its config, or refuses when the class cannot be.
    """
    import os

    import keras

    if isinstance(model, (str, os.PathLike)):
        from autoprec.files import load_model_file

        return load_model_file(model)
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"Expected a Keras model (keras.Model, or the path of a .keras file). Received: "
            f"model={describe(model)}. autoprec tunes Keras 3 models only."
        )
    from autoprec.graph import model_kind

    if inplace or model_kind(model) != SUBCLASSED:
        return model
    return _copy_subclassed(model)


def _copy_subclassed(model: Any) -> Any:
    """A subclassed model rebuilt from its config, with its weights and its compile configuration."""

    why = "its class cannot be rebuilt from get_config()"
    try:
        copy = model.__class__.from_config(model.get_config())
        build = model.get_build_config()  # the shapes the model was first called (built) with
        shape = (build or {}).get("input_shape")
        if isinstance(shape, (list, tuple)) and shape and all(d is None or isinstance(d, int) for d in shape):
            copy(np.zeros((1, *[d or 1 for d in shape[1:]]), "float32"))  # called, as the original was: built
        elif build:
            copy.build_from_config(build)
        copy.set_weights(model.get_weights())
        config = model.get_compile_config() if model.compiled else None
        if config:
            copy.compile_from_config(config)
        return copy
    except Exception as exc:  # a user's class: any error means it cannot be copied
        why = f"{why} ({type(exc).__name__}: {str(exc)[:160]})"
    raise UnsupportedModelError(
        f"Expected a model tune can copy, or inplace=True. Received the subclassed model {model.name!r}: {why}, and "
        "Keras cannot clone subclassed models layer by layer. Pass inplace=True to let tune set the tuned policies "
        "(and a LossScaleOptimizer) on this model itself, or give the class a get_config() that rebuilds it."
    )


def _speeds(opts: TuneOptions) -> dict[str, float]:
    """Each quantized candidate's speed on this device, measured (only the speed objective needs it)."""
    from autoprec.quantize import measured_speed

    if opts.objective != "speed":
        return {}
    return {c: measured_speed(c) for c in opts.choices if c in QUANTIZED_MODES}


def objective(cost: CostModel, space: DecisionSpace, which: str):
    """The search's objective per assignment: the estimated speed-up, or the weight-size ratio with
    the speed-up as a tie-break (a 16-bit float layer is no smaller than a float32 one, but it is faster)."""
    if which == "size":

        def size(a: dict[str, str]) -> float:
            expanded = space.expand(a)
            return cost.size_ratio(expanded) + 1e-3 * cost.speedup(expanded)

        return size
    return lambda a: cost.speedup(space.expand(a))


# ---------------------------------------------------------------------------
# Stage: session


def open_run(model: Any, data: Any, opts: TuneOptions, progress: Progress) -> tuple[Session, int]:
    """Open the session; pretrain a float32 copy when the model scores at chance. Returns (session, steps trained)."""
    if opts.target_why != "as asked":
        progress.say(f"autoprec: target=auto -> {opts.target} ({opts.target_why}).")
    data, held, why = split_holdout(
        data,
        opts.holdout,
        model=model,
        nonfinite=opts.nonfinite_inputs,
        seed=opts.seed,
    )
    progress.say(f"autoprec: {why}.")
    session = _session(model, data, opts)
    _check_train_labels(session, opts)
    at_chance = at_chance_level(session)
    if not (at_chance or opts.pretrain_steps):
        _check_resolution(session, opts.budget, opts.confidence)
        session.holdout = held_session(session, held) if held is not None else None
        return session, 0
    if opts.train_data is None:
        raise UntrainedModelError(
            f"The float32 model scores {session.metric.name}={session.baseline:.4g} on the evaluation data, which is "
            "chance level: its weights look untrained, and a budget measured on random weights means nothing. Pass "
            "train_data=(x, y) (and optionally pretrain_steps=N) so autoprec trains a float32 copy first, or "
            "tune the model after training it."
        )
    if session.graph.kind == SUBCLASSED:
        raise UnsupportedModelError(
            "Pretraining clones the model; a subclassed model cannot be cloned. Train it first, then tune."
        )
    from autoprec.apply import apply_policy
    from autoprec.verify.real import cycle_batches, train_steps

    steps = opts.pretrain_steps or DEFAULT_PRETRAIN_STEPS
    why = "the float32 baseline is at chance level" if at_chance else f"pretrain_steps={steps}"
    progress.say(f"autoprec: training a float32 copy for {steps} steps before searching ({why}).")
    work = apply_policy(session.model, {}, graph=session.graph)
    train_steps(work, cycle_batches(opts.train_data, steps, TRAIN_BATCH_SIZE, model=work))
    session = _session(work, data, opts)
    if at_chance_level(session):
        logger.warning(
            "autoprec: still at chance level after %d pretraining steps; pass a larger pretrain_steps.", steps
        )
    _check_resolution(session, opts.budget, opts.confidence)
    session.holdout = held_session(session, held) if held is not None else None
    return session, steps


def _session(model: Any, data: Any, opts: TuneOptions) -> Session:
    return open_session(
        model,
        data,
        target=opts.target,
        formats=opts.formats,
        metric=opts.metric,
        higher_is_better=opts.higher_is_better,
        batch_size=opts.batch_size,
        keep_float32=opts.keep_float32,
        force_16bit=opts.force_16bit,
        nonfinite_inputs=opts.nonfinite_inputs,
        # "auto" is settled by _check_resolution, once the data's size is known.
        confidence=DEFAULT_CONFIDENCE if isinstance(opts.confidence, str) else opts.confidence,
    )


def _check_train_labels(session: Session, opts: TuneOptions) -> None:
    """Training data whose labels cannot fit the outputs or the loss fails here, before any search."""
    if opts.train_data is None:
        return
    import keras

    from autoprec.data import EvalData
    from autoprec.metrics import check_labels, label_reshaper
    from autoprec.verify.real import predict_batches

    train = EvalData.get(
        opts.train_data,
        batch_size=TRAIN_BATCH_SIZE,
        what="train_data",
        model=session.model,
        nonfinite=opts.nonfinite_inputs,
    )
    from autoprec.session import check_inputs_fit

    check_inputs_fit(session.model, train, what="train_data")
    one = predict_batches(
        session.model,
        EvalData.get((train.x_sample(1), keras.tree.map_structure(lambda a: a[:1], train.y)), model=session.model),
    )
    # Every label is checked against the shape of one prediction, broadcast (no copy) to all samples.
    like = keras.tree.map_structure(lambda a: np.broadcast_to(a, (train.n, *a.shape[1:])), one)
    fix = label_reshaper(train.y, like)  # y of shape (n,) for an (n, 1) output: Keras's fit accepts it as it is
    check_labels(session.model, fix(train.y) if fix else train.y, like, what="train_data")


def _check_resolution(session: Session, budget: Budget, confidence: float | str | None) -> None:
    """Refuse a budget the data is too small to resolve, or one that allows any result; settle confidence="auto"."""
    metric = session.metric
    bounded = metric.bounds is not None and metric.bounds[0] >= 0
    rule = session.rule(budget)
    rule.check_meaningful(bounded_below=bounded)
    allowed = rule.allowed
    per = session.units_per_sample  # under a padding mask, the real tokens only
    counted = _counted(session)
    units, what = counted["counted"], counted["unit"]
    if metric.bounds == (0.0, 1.0) and 0 < allowed < 1.0 / units:  # first: no confidence would help
        raise DataError(
            f"Expected at least {_samples(1.0 / allowed / per)} evaluation samples to resolve a drop of {allowed:.4g} "
            f"in {metric.name}: one {what} is 1/{units} = {1.0 / units:.4g} of it here, so any change would exceed "
            f"the budget. Pass more data, or a budget of at least {1.0 / units:.4g} (or 0 to allow no change at all)."
        )
    if confidence == AUTO_CONFIDENCE:
        session.confidence, need = auto_confidence(units, allowed, binary=session.binary_values)
        if session.confidence is None:
            logger.warning(
                "autoprec: %d evaluation %ss are too few to bound a drop of %.4g in %s at %.0f%% confidence with room "
                "for a 16-bit candidate to change a prediction, so the budget judges the measured drop itself, which "
                "may not hold on unseen data. Pass at least %d samples for the default 95%% bound (or "
                "confidence=None to judge the measured drop without this warning).",
                units,
                what,
                allowed,
                metric.name,
                100 * DEFAULT_CONFIDENCE,
                _samples(need / per),
            )
    if session.confidence is not None and session.binary_values and 0 < allowed:
        # The bound on a candidate that flips no sample is about z / n: below that budget nothing in 16-bit can pass.
        smallest = no_change_bound(units, session.confidence)
        if allowed < smallest:
            need = _samples((NormalDist().inv_cdf(session.confidence) + 0.5) / allowed / per)
            raise DataError(
                f"Expected at least {need} evaluation samples to resolve a drop of {allowed:.4g} in {metric.name} "
                f"at {session.confidence:.0%} confidence: on {units} {what}s, even a candidate that changes no "
                f"prediction has an upper bound of {smallest:.4g}. Pass more data, a budget of at least "
                f"{smallest:.4g}, or confidence=None to judge the measured drop itself."
            )


def _samples(estimate: float) -> int:
    """A sample count from a real-valued estimate, whole and finite for a budget as small as 1e-300."""
    return math.ceil(min(estimate, float(sys.maxsize)))


def _say_what_resolves(session: Session, ev: Any, rule: BoundBudget) -> None:
    """The smallest drop these samples tell from zero, from the all-16-bit candidate's bound (a loss, an AUC).

    For right-or-wrong metrics :func:`_check_resolution` knows it before any
    pass. For other metrics the bound's margin depends on how much the
    per-sample values move, which only a candidate shows: the all-16-bit one
    moves them most. The margin shrinks as one over the root of the samples,
    which gives the samples that would bring it under the budget.
    """
    if session.confidence is None or session.binary_values or ev.rejected or math.isnan(ev.bound):
        return
    margin, allowed, n = float(ev.bound - ev.drop), float(rule.allowed), session.data.n
    if not (margin > 0 and allowed > 0 and math.isfinite(margin)):
        return
    need = max(n, _samples(n * (margin / allowed) ** 2))
    session.resolution = {"resolvable_drop": margin, "samples": n, "samples_needed": need}
    if margin >= allowed:
        logger.warning(
            "autoprec: at %.0f%% confidence, %d evaluation samples tell a drop in %s from zero only above %.4g "
            "(the margin of the all-16-bit candidate's bound), and the budget allows %.4g: a candidate passes only "
            "if it moves the per-sample values less. About %d samples would resolve the budget; pass more data, a "
            "budget of at least %.4g (absolute), or confidence=None to judge the measured drop itself.",
            100 * session.confidence,
            n,
            session.metric.name,
            margin,
            allowed,
            need,
            margin,
        )


def _counted(session: Session) -> dict[str, Any]:
    """What the metric averages over: ``counted`` samples or tokens (``unit``), ``weighted`` by the data's sample
    weights or the model's output mask (only the tokens weighed above zero count)."""
    tokens = units_per_sample(session.metric.labels_of(session.data.y)) > 1
    counted = max(1, round(session.data.n * session.units_per_sample))
    return {"counted": counted, "unit": "token" if tokens else "sample", "weighted": session.data.weights is not None}


def _holdout_facts(session: Session, ev: Any, opts: TuneOptions) -> dict[str, Any] | None:
    """The held-out check's figures for the result and the report, or None without a held-out part."""
    held = session.holdout
    if held is None or ev is None:
        return None
    return {
        "samples": held.data.n,
        "baseline": held.baseline,
        "metric": ev.metric,
        "drop": ev.drop,
        "drop_bound": None if math.isnan(ev.bound) else ev.bound,
        "allowed": held.rule(opts.budget).allowed,
        "feasible": held.rule(opts.budget).feasible(ev.judged),
    }


def _drop_text(ev: Any, session: Session) -> str:
    """``0.0031`` or, judged by a bound, ``0.0031 (95% bound 0.0046)``."""
    if session.confidence is None or math.isnan(ev.bound):
        return f"{ev.drop:.4g}"
    return f"{ev.drop:.4g} ({session.confidence:.0%} bound {ev.bound:.4g})"


def at_chance_level(session: Session) -> bool:
    """No better than a constant predictor that knows only the label statistics.

    Accuracy: always guessing the most common class (+2 points or 2 samples).
    Cross-entropy: predicting the class frequencies (their entropy, -2%).
    Mean squared error: predicting the mean label (the label variance, -2%).
    A custom callable metric cannot be judged and is trusted; neither can
    fewer than 20 samples, which say nothing about chance.
    """
    name = session.metric.name.lower().rsplit("/", 1)[-1]
    y, pred = session.metric.select(session.data.y, session.baseline_outputs[0])
    if session.data.n < 20 or isinstance(pred, (list, tuple, dict)):
        return False
    y = np.asarray(y)
    n_out = np.asarray(pred).shape[-1]
    freqs = _class_frequencies(y, n_out, session.metric.weights_of(session.data.weights))
    if "acc" in name and session.metric.higher_is_better:
        return session.baseline <= max(freqs.max(), 1.0 / max(n_out, 2)) + max(0.02, 2.0 / len(y))
    if "crossentropy" in name and not session.metric.higher_is_better and n_out > 1:
        return session.baseline >= 0.98 * float(-(freqs * np.log(freqs)).sum())
    if name in ("mse", "mean_squared_error") and not session.metric.higher_is_better:
        variance = float(np.mean(np.var(y.astype("float64"), axis=0)))
        return variance > 0 and session.baseline >= 0.98 * variance
    return False


def _class_frequencies(y: np.ndarray, n_out: int, weights: Any) -> np.ndarray:
    """The labels' class frequencies over every token of a sequence label (its first token alone, as this read
    before, gives 128 sequences of a 2,048-token vocabulary a most common class of 2/128, and a language model
    above chance looks at chance); under sample weights, each token counted by its weight (a padding mask's
    padding not at all: its filler label would look like the most common class).

    >>> _class_frequencies(np.array([[1, 0, 0], [2, 2, 0]]), 5, np.array([[1, 0, 0], [1, 1, 0]])).tolist()
    [0.3333333333333333, 0.6666666666666666]
    """
    one_hot = y.ndim > 1 and y.shape[-1] > 1 and y.shape[-1] == n_out
    classes = (y.argmax(-1) if one_hot else y).reshape(len(y), -1).round()
    w = np.ones((len(y), 1)) if weights is None else np.asarray(weights, np.float64).reshape(len(y), -1)
    w = np.broadcast_to(w if w.shape[1] in (1, classes.shape[1]) else w.mean(axis=1, keepdims=True), classes.shape)
    kinds, index = np.unique(classes, return_inverse=True)
    totals = np.bincount(index.ravel(), weights=w.ravel(), minlength=len(kinds))
    return totals[totals > 0] / totals.sum()


# ---------------------------------------------------------------------------
# Stage: profile


def ablation_tolerance(session: Session, budget: Budget) -> float:
    """Groups with a drop within a quarter of the budget are cleared without splitting."""
    return session.rule(budget).allowed / 4.0


def profile_stage(session: Session, opts: TuneOptions, progress: Progress):
    """Statistics and score always; group-tested ablation only when the search will need a ranking.

    When every eligible layer in the target format already meets the budget,
    the search stops at its first trial, and the ablation would rank layers
    for nothing: it is skipped (the verification still checks the winner).
    """
    from autoprec import backends
    from autoprec.profiling.sensitivity import STATS_SAMPLES, profile, settled_samples

    gradients = backends.name() in ("tensorflow", "jax") and session.graph.kind != SUBCLASSED
    from autoprec.metrics import single

    if isinstance(single(session.baseline_outputs[0]), (list, tuple, dict)) and not isinstance(
        single(session.data.y), (list, tuple, dict)
    ):
        # One label array for several outputs (a callable metric reads it): the compiled losses, one per output,
        # have no labels to differentiate, so the profile ranks by ablation alone.
        progress.say(
            "autoprec: one label array for several outputs: no per-output loss to take gradients of; the "
            "profile ranks layers by ablation alone."
        )
        gradients = False
    rule = session.rule(opts.budget)
    progress.say(f"autoprec: target {opts.target}; budget {opts.budget}: {rule.formula()}")
    all_fit = False
    if opts.target in opts.choices:  # with quantized candidates alone, the 16-bit target only ranks: rank fully
        # Spelled as the search's first trial will be (decisions named, followers following their producers), so
        # that the search reuses it from the session's cache: naming every eligible node instead would put a
        # follower of a pinned and a 16-bit producer (GPT2's embeddings_add) in 16-bit, a different assignment.
        graph = session.graph
        everything = {
            p: opts.target
            for p in [i.path for i in graph.units] + sorted(graph.forced)
            if p in graph and graph[p].eligible
        }
        # With real policies where the model has a graph (a subclassed model's engine sets them already): where
        # this check settles the answer, the verification reuses it, and tune scores its answer once.
        check = (
            real_check(session, everything, budget=opts.budget)
            if graph.kind != SUBCLASSED
            else session.evaluate(everything, budget=opts.budget)
        )
        all_fit = rule.feasible(check.judged)
        _say_what_resolves(session, check, rule)
    method = ("fast" if all_fit else "full") if gradients else "ablation"
    frame = profile(
        session.model,
        None,
        target=opts.target,
        method=method,
        profile_batch_size=opts.profile_batch_size,
        # Settled by the all-16-bit check, the statistics only describe the ranges for the report and order a
        # fall-back: up to two training batches do; a search they rank reads STATS_SAMPLES for the activation
        # peaks, and the gradients fewer where a sample's tape is large (sensitivity.gradient_samples_for).
        stats_samples=settled_samples(session.graph) if all_fit else STATS_SAMPLES,
        tolerance=ablation_tolerance(session, opts.budget),
        max_ablation_passes=len(session.graph.eligible) + 8,
        budget=opts.budget,  # a layer alone that breaks it is stopped early, and ruled out of the search
        verbose=opts.verbose,
        session=session,
    )
    progress.seconds.update({k: v for k, v in frame.attrs.get("seconds", {}).items()})
    return frame


# ---------------------------------------------------------------------------
# Stage: search

RUNNERS_UP = 3  # feasible candidates after the best that the verification may take instead of falling back


@dataclass(frozen=True)
class Found:
    """What the search found: the study, its statistics, and the best assignment (per decision key)."""

    study: Any
    assignment: dict[str, str]
    feasible: bool
    evaluations: int
    cache_hits: int
    measured: dict[int, float] = field(default_factory=dict)
    runners_up: tuple[dict[str, str], ...] = ()  # the next feasible assignments, best first, for the verification


def search_stage(
    session: Session,
    space: DecisionSpace,
    cost: CostModel,
    opts: TuneOptions,
    progress: Progress,
    *,
    ranked_by: str = "full",
) -> Found:
    """Run (or resume) the Optuna study over the decision space.

    ``ranked_by`` is the profile method that ordered the decisions: a resumed
    study made with a score-only order takes a later run's ablation order.
    """
    import optuna

    from autoprec.search.plan import Search

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar replaces Optuna's per-trial log
    try:
        study, order, ruled = _open_study(session, space, opts, ranked_by)
        bar = progress.stage("search", total=opts.n_trials, unit="trial")
        rule = session.rule(opts.budget)
        search = Search(
            dataclasses.replace(space.search_space(), order=order, ruled_out=ruled),
            lambda a: session.evaluate(space.expand(a), budget=opts.budget),
            objective(cost, space, opts.objective),
            rule.feasible,
            rule.allowed,
            study,
            n_trials=opts.n_trials,
            timeout=opts.timeout,
            on_trial=lambda s: bar.update(s.finished(), [("best", s.best_speedup())]),
        )
        best = search.run()
        bar.done(min(search.finished(), opts.n_trials), [("best", search.best_speedup())])
    finally:
        optuna.logging.set_verbosity(verbosity)
    best = _say_outcome(best, space, cost, opts, progress)
    runners = tuple(dict(o.assignment) for o in search.ranked()[1 : RUNNERS_UP + 1] if o.speedup > 1.0) if best else ()
    found = Found(
        study, dict(best.assignment) if best else {}, best is not None, search.evaluations, search.cache_hits,
        runners_up=runners,
    )  # fmt: skip
    if opts.cost == "measured" and not opts.search_only:
        found = _measure_candidates(session, space, search, found)
    return found


def _open_study(
    session: Session, space: DecisionSpace, opts: TuneOptions, ranked_by: str
) -> tuple[Any, tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The study (opened, resumed or shared), the decision order it searches in, and the choices it rules out."""
    from autoprec.search.plan import make_sampler
    from autoprec.search.study import agreed_ruling, fail_orphans, name_objective, open_study, record_or_check

    name = opts.study_name or (
        f"autoprec-{getattr(session.model, 'name', 'model')}-{opts.target}-"
        f"{opts.budget.max_drop:g}{'rel' if opts.budget.relative else ''}-seed{opts.seed}"
    )
    budget = str(opts.budget) + (f" at {session.confidence:.0%} confidence" if session.confidence else "")
    study = open_study(name, opts.storage, make_sampler(opts.seed))
    name_objective(study, opts.objective)
    fail_orphans(study)
    order = record_or_check(
        study,
        {
            "keys": list(space.keys),
            "choices": list(space.choices),
            "order": list(space.order),
            "baseline": session.baseline,
            "fingerprint": session.fingerprint(),
            "metric": session.metric.name,
            "ranked_by": ranked_by,
        },
        budget=budget,
    )
    ruled = agreed_ruling(study, dict(space.ruled_out), budget=budget)
    return study, order, {k: v for k, v in ruled.items() if k in space.groups}


def _say_outcome(best: Any, space: DecisionSpace, cost: CostModel, opts: TuneOptions, progress: Progress) -> Any:
    """Say why the result is all float32 where it is; a best slower than float32 becomes None (all float32)."""
    if best is not None and opts.objective == "speed" and best.speedup <= 1.0 + 1e-9:
        # Within budget, but no faster than float32 by the cost model (or float32 itself, which a search may
        # evaluate): float32 is the answer, and the user is told why.
        slower = slower_note(cost.device, opts.target)
        if any(v != FLOAT32 for v in best.assignment.values()):
            what = (
                f"the best assignment within budget is estimated at {best.speedup:.2f}x float32 on the "
                f"{cost.device.name} profile; float32 is faster, so the result is all float32"
            )
        else:
            what = (
                "no assignment with a layer in 16-bit both met the budget and was estimated faster than float32 on "
                f"the {cost.device.name} profile; the result is all float32"
            )
        progress.say(f"autoprec: {what}" + (f": {slower}." if slower else "."))
        best = None
    elif best is None and not space.keys:
        progress.say(
            "autoprec: nothing to search: every layer is pinned float32 (a model output, a layer that "
            "hard-codes float32, or keep_float32); the result is all float32."
        )
    elif best is None:
        slower = slower_note(cost.device, opts.target)
        if slower:
            # Candidates the cost model rates slower than float32 are never tried, so "none met the budget" would
            # be false.
            progress.say(
                f"autoprec: the result is all float32: no assignment both met the budget and was estimated "
                f"faster than float32; {slower}."
            )
        else:
            progress.say("autoprec: no assignment with a decision in 16-bit met the budget; the result is all float32.")
    return best


def _measure_candidates(session: Session, space: DecisionSpace, search: Any, found: Found, *, top: int = 3) -> Found:
    """Time the real training step of the best feasible candidates, interleaved; keep the fastest."""
    candidates = sorted((o for o in search.cache.values() if o.feasible), key=lambda o: -o.speedup)[:top]
    if not candidates:
        return found  # nothing feasible to time; force_16bit layers still come from space.expand
    speeds = measure_speedups(session, [space.expand(o.assignment) for o in candidates])
    winner = int(np.argmax(speeds))
    by_trial = {o.trial: s for o, s in zip(candidates, speeds, strict=True) if o.trial is not None}
    return dataclasses.replace(found, assignment=dict(candidates[winner].assignment), feasible=True, measured=by_trial)


def measure_speedups(session: Session, assignments: list[dict[str, str]], *, steps: int = 10) -> list[float]:
    """float32 step time / each assignment's step time, timed interleaved on this machine."""
    from autoprec.apply import apply_policy
    from autoprec.verify.real import train_steps

    batches = list(itertools.islice(_cycle(session.data), steps))
    models = [apply_policy(session.model, {}, graph=session.graph)]
    models += [apply_policy(session.model, session.graph.resolve(a), graph=session.graph) for a in assignments]
    for m in models:
        train_steps(m, batches[:2])  # warm-up: trace the train function
    times: list[list[float]] = [[] for _ in models]
    for x, y in batches:  # interleaved, so drift on the machine hits every variant alike
        for i, m in enumerate(models):
            t = time.perf_counter()
            m.train_on_batch(x, y)
            times[i].append(time.perf_counter() - t)
    base = float(np.median(times[0]))
    return [base / float(np.median(t)) for t in times[1:]]


def _cycle(data: Any):
    while True:
        yield from data.batches()


# ---------------------------------------------------------------------------
# Stage: split producers from their joined followers


def followers_of(graph: Any, space: DecisionSpace, key: str) -> tuple[list[str], list[str]]:
    """The weightless computing layers after ``key`` up to the next weighted layer: ``(decision keys, joined paths)``.

    They are what a weighted layer's 16-bit outputs flow through; a mild
    hazard among them is what keeps it float32.
    """
    consumers = graph.consumers
    decided = {p: k for k, paths in space.groups.items() for p in paths}
    keys: list[str] = []
    joined: list[str] = []
    frontier, seen = [c for p in space.groups[key] for c in consumers.get(p, ())], set(space.groups[key])
    while frontier:
        path = frontier.pop(0)
        if path in seen or path not in graph:
            continue
        seen.add(path)
        info = graph[path]
        if info.is_unit or info.pinned is not None or info.role == BLOCK:
            continue  # the next weighted (or pinned) layer, or a block of decided sublayers, ends the stretch
        if info.is_layer and info.eligible and info.role != MOVEMENT:
            owner = decided.get(path)
            if owner is None:
                joined.append(path)
            elif owner not in keys and owner != key:
                keys.append(owner)
        frontier.extend(consumers.get(path, ()))
    return keys, joined


def split_stage(
    session: Session, space: DecisionSpace, found: Found, cost: CostModel, opts: TuneOptions, progress: Progress
) -> tuple[DecisionSpace, Found]:
    """Try each float32 layer in 16-bit with the weightless layers that follow it kept float32.

    A weightless layer without a risk of its own joins its producer, so a mild
    hazard in it (a small drop, no overflow) can only be kept float32 by
    keeping its producer there too, which spends the producer's speed-up. For
    each such producer that the cost model says would pay, one evaluation
    tries the split; a split within budget makes its followers decisions of
    their own (float32) and the producer 16-bit.

    The search's best may hold producers in 16-bit whose joined followers
    carry such a hazard too: their drop fills the budget the splits need (a
    bound's margin leaves little). So where a split missed the budget and
    keeping those followers float32 lowers the judged drop (one evaluation),
    the splits are tried again from there; the faster outcome is taken where
    it beats the best.
    """
    if not found.feasible or opts.objective != "speed" or opts.target not in opts.choices:
        return space, found
    best = cost.speedup(space.expand(found.assignment))
    outcome = None
    tried = _split_greedily(session, space, dict(found.assignment), {}, cost, opts)
    if tried.speed > best + 1e-9:
        outcome, best = tried, tried.speed
    # Room for the splits that missed the budget (only they can gain from it).
    room = _followers_made_room(session, space, found.assignment, opts) if tried.missed else {}
    if room:
        again = _split_greedily(session, space, dict(found.assignment), room, cost, opts)
        if again.speed > best + 1e-9:
            outcome, best = again, again.speed
    if outcome is None:
        return space, found
    assignment, splits = outcome.assignment, outcome.splits
    for line in outcome.said:
        progress.say(line)
    own = {f: (f,) for fs in splits.values() for f in fs}
    searched = space
    if own:
        space = dataclasses.replace(
            space,
            groups={**space.groups, **own},
            order=(*space.order, *own),
            own=space.own | set(own),
            options={**space.options, **{f: tuple(c for c in space.choices if c not in QUANTIZED_MODES) for f in own}},
            split={**getattr(space, "split", {}), **splits},
        )
        assignment.update({f: FLOAT32 for f in own})
    # The search's best before the split is now the first runner-up. Every runner-up is spelled in the old space,
    # where the new keys followed their producers; named as they resolved there, they compute exactly as ranked.
    runners = []
    for candidate in (found.assignment, *found.runners_up):
        nodes = session.graph.resolve_nodes(searched.expand(candidate))
        runners.append({**candidate, **{f: nodes[f] for f in own}})
    return space, dataclasses.replace(found, assignment=assignment, runners_up=tuple(runners[:RUNNERS_UP]))


@dataclass
class _Splits:
    """One greedy pass of the split stage: where it ended, the followers split off per producer, its estimated
    speed-up, what to say, and how many splits it evaluated that missed the budget."""

    assignment: dict[str, str]
    splits: dict[str, list[str]]
    speed: float = 0.0
    said: list[str] = field(default_factory=list)
    missed: int = 0


def _split_greedily(
    session: Session,
    space: DecisionSpace,
    assignment: dict[str, str],
    splits: dict[str, list[str]],
    cost: CostModel,
    opts: TuneOptions,
) -> _Splits:
    """Each float32 producer in 16-bit with its followers float32, least sensitive first, where it pays and fits."""
    out = _Splits(assignment, splits, cost.speedup(_with_splits(space, assignment, splits)))
    for key in space.order[::-1]:  # least sensitive first: the likeliest to fit
        if out.assignment.get(key, FLOAT32) != FLOAT32 or opts.target not in space.choices_of(key):
            continue
        keys, followers = followers_of(session.graph, space, key)
        keys = [k for k in keys if out.assignment.get(k, FLOAT32) != FLOAT32]
        if not (keys or followers):
            continue
        moved = {**out.assignment, key: opts.target, **{k: FLOAT32 for k in keys}}
        trial = _with_splits(space, moved, {**out.splits, key: followers})
        speed = cost.speedup(trial)
        if speed <= out.speed + 1e-9:
            continue
        evaluation = session.evaluate(trial, budget=opts.budget)
        if evaluation.rejected or not session.rule(opts.budget).feasible(evaluation.judged):
            out.missed += 1
            continue
        out.assignment, out.speed = moved, speed
        if followers:
            out.splits[key] = followers
        out.said.append(
            f"autoprec: {key!r} computes in {opts.target} with {', '.join(map(repr, [*keys, *followers]))} "
            f"after it in float32 (estimated {speed:.3f}x, drop {evaluation.drop:.4g})."
        )
    return out


def _with_splits(space: DecisionSpace, assignment: Mapping[str, str], splits: Mapping[str, list[str]]) -> dict:
    """The layer policies of ``assignment`` with the followers split off so far in float32."""
    return {**space.expand(assignment), **{f: FLOAT32 for fs in splits.values() for f in fs}}


def _followers_made_room(
    session: Session, space: DecisionSpace, assignment: dict[str, str], opts: TuneOptions
) -> dict[str, list[str]]:
    """The joined followers of the best's 16-bit producers, where keeping them float32 lowers the judged drop."""
    lowered = {
        key: joined
        for key in space.keys
        if assignment.get(key, FLOAT32) != FLOAT32
        for joined in [followers_of(session.graph, space, key)[1]]
        if joined
    }
    if not lowered:
        return {}
    rule = session.rule(opts.budget)
    before = session.evaluate(space.expand(assignment), budget=opts.budget)  # the search's best: in the cache
    after = session.evaluate(_with_splits(space, assignment, lowered), budget=opts.budget)
    if after.rejected or not rule.feasible(after.judged) or not after.judged < before.judged:
        return {}
    return lowered


# ---------------------------------------------------------------------------
# Stage: verify


@dataclass(frozen=True)
class Verified:
    """The assignment after the real checks, the real model and its score, and what fell back."""

    assignment: dict[str, str]
    model: Any
    evaluation: Any
    fallbacks: list
    training: TrainCheck | None
    discrepancies: list
    measured_speedup: float | None
    holdout: Any = None  # the winner's Evaluation on the held-out data, when there is any
    runner_up: dict = field(default_factory=dict)  # runner-ups the verification tried instead of falling back


def verify_stage(
    session: Session,
    space: DecisionSpace,
    frame: Any,
    found: Found,
    cost: CostModel,
    opts: TuneOptions,
    progress: Progress,
) -> Verified:
    """Real Keras policies on this device, then (on request) a short training run; fall back decision by decision."""
    bar = progress.stage("verify", total=None, unit="check")
    check_eval = _EvalCheck(session, space, opts)
    start, first, runner_up = _verified_start(session, space, found, check_eval, opts, progress)
    pick = _sensitive_first(space, start)
    limit = opts.max_fallbacks
    assignment, fallbacks, _ = fall_back(
        start,
        check_eval,
        _nonfinite_first(session, space, check_eval, pick),
        kind="verify",
        limit=limit,
        say=progress.say,
        checked=first,
    )
    training = None
    if opts.verify == "train":
        check_train = _TrainCheck(session, space, opts)
        assignment, more, _ = fall_back(
            assignment,
            check_train,
            _hazards_first(space, frame, pick),
            kind="train",
            limit=limit - len(fallbacks),
            say=progress.say,
        )
        fallbacks += more
        training = check_train.training
        if more:
            check_eval(assignment)
    measured = None
    if opts.cost == "measured" and any(v != FLOAT32 for v in space.expand(assignment).values()):
        measured = measure_speedups(session, [space.expand(assignment)])[0]  # the final policy, after fallbacks
    bar.done(len(check_eval.checks))
    return Verified(
        assignment,
        check_eval.model,
        check_eval.evaluation,
        fallbacks,
        training,
        check_eval.checks,
        measured,
        check_eval.holdout,
        runner_up,
    )


def _verified_start(
    session: Session, space: DecisionSpace, found: Found, check: _EvalCheck, opts: TuneOptions, progress: Progress
) -> tuple[dict[str, str], tuple[bool, str], dict[str, Any]]:
    """The search's best; or, where real policies tip it over the budget, the best runner-up with room to spare.

    The best sits at the edge of the budget by construction (it is the fastest
    candidate that passed), so a difference of a few samples between the
    simulated and the real arithmetic tips it over. Returning its most
    sensitive decision to float32 then costs far more speed than the next
    candidate whose simulated judgement clears the budget by that difference
    (measured: ``benchmarks/bench_holdout.py``). Returns where the fall-back
    starts, that start's check result, and what was tried.
    """
    best = dict(found.assignment)
    first = check(best)
    facts: dict[str, Any] = {"tried": 0, "chosen": False}
    if first[0] or not found.runners_up or opts.max_fallbacks == 0:  # 0: the result is the search's best, as is
        return best, first, facts
    rule = session.rule(opts.budget)
    if rule.feasible(check.evaluation.judged):  # it failed on the held-out part: no runner-up was judged there
        return best, first, facts
    gap = check.evaluation.judged - session.evaluate(space.expand(best)).judged
    if not (math.isfinite(gap) and gap > 0):  # not a near miss of the simulation: the fall-back's business
        return best, first, facts
    facts["gap"] = gap
    kept = check.model, check.evaluation, check.holdout  # the best's check, restored if no runner-up passes
    for candidate in found.runners_up:
        if candidate == best or not rule.feasible(session.evaluate(space.expand(candidate)).judged + gap):
            continue
        facts["tried"] += 1
        result = check(candidate)
        check.checks[-1]["kind"] = "runner-up"
        if result[0]:
            facts["chosen"] = True
            progress.say(
                f"autoprec: verify check failed ({first[1]}); taking the search's next best candidate, which "
                f"clears the budget by the {gap:.4g} that the real arithmetic added."
            )
            return dict(candidate), result, facts
    check.model, check.evaluation, check.holdout = kept  # none passed: the fall-back starts from the best
    return best, first, facts


class _TrainCheck:
    """The verification's training check of one assignment; it keeps the last run's figures."""

    def __init__(self, session: Session, space: DecisionSpace, opts: TuneOptions) -> None:
        self.session, self.space, self.opts = session, space, opts
        self.training: TrainCheck | None = None

    def __call__(self, assignment: dict[str, str]) -> tuple[bool, str]:
        s, opts = self.session, self.opts
        self.training = train_check(
            s.model,
            s.graph.resolve(self.space.expand(assignment)),
            opts.train_data,
            graph=s.graph,
            steps=opts.steps,
            metric=s.metric,
            eval_data=s.data,
        )
        return self.training.passed, self.training.reason


class _EvalCheck:
    """The verification's check of one assignment: real Keras policies, then the held-out part if any.

    It keeps the last model and evaluations, and every check's simulated and real drops.
    """

    def __init__(self, session: Session, space: DecisionSpace, opts: TuneOptions) -> None:
        self.session, self.space, self.budget = session, space, opts.budget
        self.checks: list[dict] = []
        self.model: Any = None
        self.evaluation: Any = None
        self.holdout: Any = None

    def __call__(self, assignment: dict[str, str]) -> tuple[bool, str]:
        session, expanded = self.session, self.space.expand(assignment)
        reused = session.real_model(expanded)  # checked with real policies already, on the same data
        if reused is None:
            session.release_real_model()  # moved on to another candidate: one real model held at a time
        self.model, real = reused or verify_eval(session, session.graph.resolve(expanded))
        self.evaluation = real
        self.checks.append(
            {
                # None: no simulated pass of it was run (the search read the real check's figures)
                "simulated_drop": None if reused else session.evaluate(expanded).drop,
                "real_drop": real.drop,
                "n_16bit": sum(v != FLOAT32 for v in assignment.values()),
            }
        )
        if not session.rule(self.budget).feasible(real.judged):
            return False, f"real drop {_drop_text(real, session)} misses the budget"
        held = session.holdout
        if held is None:
            return True, ""
        self.holdout = h = held.score_outputs(predict_batches(self.model, held.data))
        self.checks[-1]["holdout_drop"] = h.drop
        ok = held.rule(self.budget).feasible(h.judged)
        return ok, f"held-out drop {_drop_text(h, held)} on {held.data.n} samples misses the budget"


def _sensitive_first(space: DecisionSpace, start: dict[str, str]):
    """Pick the most sensitive 16-bit decision (profile order)."""

    def pick(assignment: dict[str, str]) -> str | None:
        return next((k for k in space.order if assignment.get(k, FLOAT32) != FLOAT32), None)

    return pick


def _nonfinite_first(session: Session, space: DecisionSpace, check: _EvalCheck, fallback: Any):
    """Pick the 16-bit decision where the real model's values first turn non-finite, else ``fallback``'s pick.

    The biggest or most sensitive layer is the wrong one to give up when a
    small layer overflows: returning the layer where inf or NaN is born mends
    the model at the least cost. The real model of the failed check is walked
    batch by batch until a batch shows the origin (only when a check fails).
    Where it is born in a block's own ops between its sublayers, the block's
    16-bit sublayers are candidates in call order: the first feeds those ops
    (an attention query in float32 makes its scores float32).
    """
    inner = session.graph.inner

    def pick(assignment: dict[str, str]) -> str | None:
        live = {path: k for k in space.order if assignment.get(k, FLOAT32) != FLOAT32 for path in space.groups[k]}
        if check.model is not None and check.evaluation is not None and check.evaluation.nonfinite_outputs:
            for x, _ in session.data.batches():
                found = [q for p in nonfinite_origins(check.model, x) for q in (p, *inner.get(p, ()))]
                origins = [live[p] for p in found if p in live]
                if origins:
                    return origins[0]
        return fallback(assignment)

    return pick


def _hazards_first(space: DecisionSpace, frame: Any, fallback: Any):
    """Pick the 16-bit decision with the worst gradient or activation hazard, else the most sensitive."""
    rows = frame.set_index("path")

    def hazard(key: str) -> float:
        return sum(hazard_share(rows.loc[path]) for path in space.groups[key] if path in rows.index)

    def pick(assignment: dict[str, str]) -> str | None:
        live = [k for k in space.order if assignment.get(k, FLOAT32) != FLOAT32]
        if not live:
            return None
        worst = max(live, key=hazard)
        return worst if hazard(worst) > 0 else fallback(assignment)

    return pick


# ---------------------------------------------------------------------------
# Stage: result


def result_stage(
    model: Any,
    session: Session,
    space: DecisionSpace,
    frame: Any,
    found: Found,
    verified: Verified,
    cost: CostModel,
    opts: TuneOptions,
    pretrained: int,
    *,
    seconds: float,
    progress: Progress,
) -> TuneResult:
    """Emit the policy, the tuned model and the tables, with every decision's reason."""
    from autoprec.policy import PrecisionPolicy

    decided = space.expand(verified.assignment)
    names, rule = session.graph.resolve(decided), session.rule(opts.budget)
    if session.graph.kind == SUBCLASSED and opts.inplace:
        logger.info("autoprec: %r is subclassed and inplace=True: its layers now carry the tuned policies.", model.name)
    trials = _judged_trials(found, space, cost, rule)
    ev = verified.evaluation
    verification = _verification_facts(session, verified, opts, rule)
    stats = _run_stats(session, space, found, cost, opts, progress, seconds=seconds, decided=decided, trials=trials)
    stats.update({k: frame.attrs.get(k) for k in ("statistics_samples", "gradient_samples")}, samples=session.data.n)
    measured_on = None if verified.measured_speedup is None else backends.device_description()
    provenance = _provenance(session, ev, rule, cost, decided, verification, verified, measured_on)
    policy = PrecisionPolicy(
        names, target=opts.target, layers=session.graph.layer_facts(), provenance=_json_safe(provenance)
    )
    result = TuneResult(
        policy=policy,
        model=verified.model,
        sensitivity=decision_frame(frame, session, space, names, verified.fallbacks, cost=cost, target=opts.target),
        trials=trials,
        study=found.study,
        baseline_metric=session.baseline,
        metric=ev.metric,
        budget=opts.budget,
        speedup_estimate=cost.speedup(decided),
        objective=opts.objective,
        size_ratio=cost.size_ratio(decided),
        metric_name=session.metric.name,
        higher_is_better=session.metric.higher_is_better,
        target=opts.target,
        formula=rule.formula(),
        device=cost.device.name,
        verification=verification,
        training=verified.training,
        measured_speedup=verified.measured_speedup,
        measured_on=measured_on,
        pretrain_steps=pretrained,
        stats=stats,
        drop_bound=ev.bound,
        confidence=session.confidence,
    )
    progress.say(result.summary())
    _warn_if_slower(result, cost, opts)
    return result


def _provenance(
    session: Session,
    ev: Any,
    rule: BoundBudget,
    cost: CostModel,
    decided: dict[str, str],
    verification: dict[str, Any],
    verified: Verified,
    measured_on: str | None,
) -> dict[str, Any]:
    """How the policy was judged, for its JSON file: the metric, the drop and its bound, the data and the device."""
    return {
        "metric": session.metric.name,
        "baseline": session.baseline,
        "tuned": ev.metric,
        "drop": ev.drop,
        "drop_bound": ev.bound,
        "confidence": session.confidence,
        "allowed_drop": rule.allowed,
        "budget": rule.formula(),
        "samples": session.data.n,
        "holdout": verification.get("holdout"),
        "device": cost.device.name,
        "speedup_estimate": cost.speedup(decided),
        "measured_speedup": verified.measured_speedup,
        "measured_on": measured_on,
    }


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and infinite numbers as None (JSON has no such number), one level of objects deep."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.bool_):
            return bool(value)
        return value

    return {k: clean(v) for k, v in record.items()}


def _judged_trials(found: Found, space: DecisionSpace, cost: CostModel, rule: BoundBudget) -> Any:
    """The trials table, each trial's feasibility judged again by this run's rule."""
    from autoprec.search.study import trials_frame

    trials = trials_frame(found.study, list(space.as_searched().keys), found.measured)
    trials = _with_costs(trials, found.study, space, cost)
    if "drop" in trials and len(trials):
        drops = trials["drop"].astype(float)
        if "drop_bound" in trials:
            drops = trials["drop_bound"].astype(float).fillna(drops)
        trials["feasible"] = [
            rule.feasible(d if d < 1e8 else math.inf) and not r
            for d, r in zip(drops, trials["rejected"].fillna(False).astype(bool), strict=True)
        ]
    return trials


def _verification_facts(session: Session, verified: Verified, opts: TuneOptions, rule: BoundBudget) -> dict[str, Any]:
    """What the verification found, for ``TuneResult.verification`` and the report."""
    ev = verified.evaluation
    feasible = rule.feasible(ev.judged)
    return {
        "fallbacks": [{"key": f.key, "check": f.check, "detail": f.detail} for f in verified.fallbacks],
        "runner_up": dict(verified.runner_up),
        "checks": verified.discrepancies,
        "real_drop": ev.drop,
        "real_drop_bound": None if math.isnan(ev.bound) else ev.bound,
        "confidence": session.confidence,
        "samples": session.data.n,
        **_counted(session),
        "holdout": _holdout_facts(session, verified.holdout, opts),
        "feasible": feasible,
        "why": ""
        if feasible
        else (
            f"after {len(verified.fallbacks)} fallback(s) (max_fallbacks={opts.max_fallbacks}) the "
            f"verified drop is {_drop_text(ev, session)}, over the {rule.allowed:.4g} allowed"
        ),
    }


def _run_stats(
    session: Session,
    space: DecisionSpace,
    found: Found,
    cost: CostModel,
    opts: TuneOptions,
    progress: Progress,
    *,
    seconds: float,
    decided: dict[str, str],
    trials: Any,
) -> dict[str, Any]:
    """The run's counters and timings, for ``TuneResult.stats``."""
    return {
        "evaluations": found.evaluations,
        "cache_hits": found.cache_hits,
        "passes": session.passes,
        "traces": session.engine.traces,
        "engine": session.engine.kind,
        "granularity": opts.granularity,
        "decision_keys": len(space.keys),
        "own_weightless": sorted(space.own),
        "misaligned": sorted(cost.flagged),
        "seconds": seconds,
        "stage_seconds": dict(progress.seconds),
        "pass_seconds": session.pass_seconds,
        "stage_passes": stage_passes(progress.stage_seconds, session.pass_seconds),
        "stage_peak_rss_gb": dict(progress.stage_peak_rss_gb),
        "study_name": found.study.study_name,
        "quantized_speed": dict(cost.quantized_speed),
        "weight_bytes": cost.weight_bytes(decided),
        "rejected_early": int(trials["rejected"].fillna(False).astype(bool).sum()) if "rejected" in trials else 0,
        "resolution": dict(session.resolution),
    }


def _warn_if_slower(result: TuneResult, cost: CostModel, opts: TuneOptions) -> None:
    if result.n_16bit and result.speedup_estimate < 1.0:
        logger.warning(
            "autoprec: the tuned policy is estimated at %.2fx float32 on the %s profile, slower than float32. %s",
            result.speedup_estimate,
            cost.device.name,
            (
                slower_note(cost.device, opts.target)
                or "Casts at precision boundaries cost more than the 16-bit layers gain"
            ).capitalize()
            + ".",
        )


def _with_costs(trials: Any, study: Any, space: DecisionSpace, cost: CostModel) -> Any:
    """Each trial's estimated speed-up and weight-size ratio, whatever the search optimised (the report plots both)."""
    if not len(trials):
        return trials
    params = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    space = space.as_searched()
    expanded = {n: space.expand({k: p.get(k, FLOAT32) for k in space.keys}) for n, p in params.items()}
    trials["speedup_estimate"] = [cost.speedup(expanded[n]) if n in expanded else math.nan for n in trials["trial"]]
    trials["size_ratio"] = [cost.size_ratio(expanded[n]) if n in expanded else math.nan for n in trials["trial"]]
    return trials


def decision_frame(
    frame: Any,
    session: Session,
    space: DecisionSpace,
    names: dict[str, str],
    fallbacks: list,
    *,
    cost: CostModel | None = None,
    target: str | None = None,
) -> Any:
    """The profile with each layer's ``decision``, ``reason``, ``kind`` and the facts its sentence needs.

    With ``cost``, each float32 decision gets the cost model's estimate of the
    final policy with that decision in ``target`` (``speedup_16bit``) and as it
    is (``speedup_float32``): the figures behind ``NO_GAIN``.
    """
    from autoprec.decisions import reason_for

    graph = session.graph
    out = frame.copy()
    final = {k: names.get(space.groups[k][0], FLOAT32) for k in space.keys}
    nodes = graph.resolve_nodes(space.expand(final))
    failed = {p: f for f in fallbacks for p in space.groups.get(f.key, ())}
    split_from = {f: producer for producer, followers in space.split.items() for f in followers}
    gains = _gains(space, final, cost, target)
    hazards = op_hazards(graph, frame)
    decisions, reasons_, kinds_, details, producer_decisions, op_notes = [], [], [], [], [], []
    for row in out.to_dict("records"):
        info = graph[row["path"]]
        decision = (
            names.get(info.path, nodes.get(info.path, FLOAT32)) if info.is_layer else f"follows ({nodes[info.path]})"
        )
        own = info.is_unit or info.path in space.own
        kind = "pinned" if info.pinned else "decision" if own else {"compute": "joined"}.get(info.role, info.role)
        fallback = failed.get(info.path)
        row["op_hazard"] = hazards.get(info.path, "")
        row["speedup_16bit"], row["speedup_float32"] = gains.get(info.path, (math.nan, math.nan))
        row["split_from"] = split_from.get(info.path, "")
        reason = reason_for(
            row,
            decision=decision if info.is_layer else FLOAT32,
            pinned=info.pinned,
            role=info.role,
            own_decision=own and info.pinned is None,
            forced=info.path in space.forced,
            fallback=fallback.check if fallback else None,
            split_from=split_from.get(info.path),
        )
        decisions.append(decision)
        reasons_.append(str(reason))
        kinds_.append(kind)
        details.append(fallback.detail if fallback else "")
        producers = {nodes.get(p, FLOAT32) for p in info.producers}
        producer_decisions.append(producers.pop() if len(producers) == 1 else "")
        op_notes.append(row["op_hazard"])
    out["decision"], out["reason"], out["kind"] = decisions, reasons_, kinds_
    out["fallback_detail"], out["producer_decision"], out["op_hazard"] = details, producer_decisions, op_notes
    out["speedup_16bit"] = [gains.get(p, (math.nan, math.nan))[0] for p in out["path"]]
    out["speedup_float32"] = [gains.get(p, (math.nan, math.nan))[1] for p in out["path"]]
    out["split_from"] = [split_from.get(p, "") for p in out["path"]]
    return out


def _gains(
    space: DecisionSpace, final: dict[str, str], cost: CostModel | None, target: str | None
) -> dict[str, tuple[float, float]]:
    """Per path of a float32 decision: the estimated speed-up with it in ``target``, and as it is."""
    gains: dict[str, tuple[float, float]] = {}
    if cost is None or target is None:
        return gains
    as_is = cost.speedup(space.expand(final))
    for key, choice in final.items():
        if choice == FLOAT32 and target in space.choices_of(key):
            gains.update({p: (cost.speedup(space.expand({**final, key: target})), as_is) for p in space.groups[key]})
    return gains


def op_hazards(graph: Any, frame: Any) -> dict[str, str]:
    """``{layer path: "ops.exp"}``: a ``keras.ops`` node after the layer overflows, flushes or goes non-finite.

    The node has no policy of its own, so the layer it follows answers for it.
    """
    rows = frame.set_index("path").to_dict("index")
    out: dict[str, str] = {}
    for info in graph.layers:
        if info.is_layer:
            continue
        if hazard(rows.get(info.path, {})) is None:
            continue
        for path in graph.deciders(info.path):
            out.setdefault(path, f"ops.{info.class_name.lower()}")
    return out
