"""``autoprec.tune``: the main job. Profile, search under the budget, verify for real, emit.

>>> result = autoprec.tune(model, (x_val, y_val), budget="0.5%")   # doctest: +SKIP
>>> result
TuneResult(metric=0.912, baseline=0.915, drop=0.003<=0.005, float16=41/52 layers, trials=50)
>>> result.save("reports/run1")                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec import reasons
from autoprec.apply import apply_policy
from autoprec.budget import Budget
from autoprec.cost import CostModel
from autoprec.errors import DataError, PolicyError, UnsupportedModelError, UntrainedModelError, describe
from autoprec.graph import SUBCLASSED
from autoprec.policy import FLOAT32, LOW_PRECISION, MIXED_BFLOAT16, MIXED_FLOAT16, PrecisionPolicy
from autoprec.search import Search, Space
from autoprec.sensitivity import Context, explain_target, prepare, profile
from autoprec.verify import TrainCheck, cycle_batches, train_check, train_steps, verify_eval

logger = logging.getLogger("autoprec")

GRANULARITIES = ("layer", "block")
VERIFY_MODES = ("eval", "train")
COSTS = ("estimate", "measured")
DEFAULT_PRETRAIN_STEPS = 200
_ABLATION_LIMIT = 400  # units; above it the profile uses the first-order score only


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found. ``repr`` is one line; ``summary()`` a few; ``save()`` writes it all."""

    policy: PrecisionPolicy
    model: Any = field(repr=False)
    sensitivity: Any = field(repr=False)
    trials: Any = field(repr=False)
    study: Any = field(repr=False)
    baseline_metric: float
    metric: float
    budget: Budget
    speedup_estimate: float
    metric_name: str = "metric"
    higher_is_better: bool = True
    target: str = MIXED_FLOAT16
    formula: str = ""
    verification: dict = field(default_factory=dict, repr=False)
    training: TrainCheck | None = field(default=None, repr=False)
    measured_speedup: float | None = None
    pretrain_steps: int = 0
    stats: dict = field(default_factory=dict, repr=False)

    @property
    def drop(self) -> float:
        return self.baseline_metric - self.metric if self.higher_is_better else self.metric - self.baseline_metric

    @property
    def allowed_drop(self) -> float:
        return self.budget.allowed(self.baseline_metric)

    @property
    def units(self):
        return self.sensitivity[self.sensitivity["decision_unit"] & (self.sensitivity["pinned"] == "")]

    @property
    def n_16bit(self) -> int:
        return int(self.units["decision"].isin(LOW_PRECISION).sum())

    @property
    def all_float32(self) -> bool:
        """True when no decision unit could leave float32 within the budget."""
        return self.n_16bit == 0

    def __repr__(self) -> str:
        fmt = "float16" if self.target == MIXED_FLOAT16 else "bfloat16"
        return (
            f"TuneResult(metric={self.metric:.4g}, baseline={self.baseline_metric:.4g}, "
            f"drop={self.drop:.4g}<={self.allowed_drop:.4g}, {fmt}={self.n_16bit}/{len(self.units)} layers, "
            f"trials={len(self.trials)})"
        )

    def summary(self) -> str:
        """A short human summary: budget, metrics, speed-up and the policy's counts."""
        lines = [
            repr(self),
            f"  budget: {self.formula}",
            f"  {self.metric_name}: float32 {self.baseline_metric:.6g} -> tuned {self.metric:.6g} (verified with Keras policies)",
            f"  estimated speed-up: {self.speedup_estimate:.2f}x"
            + (f"; measured: {self.measured_speedup:.2f}x" if self.measured_speedup else ""),
            self.policy.summary(),
        ]
        if self.verification.get("fallbacks"):
            lines.append(f"  verification returned {len(self.verification['fallbacks'])} unit(s) to float32: {self.verification['fallbacks']}")
        if self.training is not None:
            lines.append(f"  training check ({self.training.steps} steps): {'passed' if self.training.passed else 'FAILED'}: {self.training.reason}")
        return "\n".join(lines)

    def to_json_dict(self) -> dict[str, Any]:
        """Metadata for ``result.json`` (what the report needs besides the CSVs)."""
        return _jsonable({
            "metric_name": self.metric_name, "higher_is_better": self.higher_is_better, "target": self.target,
            "baseline_metric": self.baseline_metric, "metric": self.metric, "drop": self.drop,
            "budget": {"max_drop": self.budget.max_drop, "relative": self.budget.relative, "allowed": self.allowed_drop},
            "formula": self.formula, "speedup_estimate": self.speedup_estimate, "measured_speedup": self.measured_speedup,
            "pretrain_steps": self.pretrain_steps, "verification": self.verification,
            "training": self.training.to_dict() if self.training else None, "stats": self.stats,
            "n_16bit": self.n_16bit, "n_units": int(len(self.units)),
        })

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write policy.json, sensitivity.csv, trials.csv, result.json, model.keras and the report."""
        os.makedirs(directory, exist_ok=True)
        join = lambda name: os.path.join(directory, name)  # noqa: E731
        self.policy.save(join("policy.json"))
        self.sensitivity.to_csv(join("sensitivity.csv"), index=False)
        self.trials.to_csv(join("trials.csv"), index=False)
        with open(join("result.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_json_dict(), fh, indent=2, allow_nan=False)
        written = [join(n) for n in ("policy.json", "sensitivity.csv", "trials.csv", "result.json")]
        from autoprec.graph import SUBCLASSED, model_kind

        if model_kind(self.model) == SUBCLASSED:
            logger.warning(
                "autoprec: model.keras of a subclassed model reloads with default dtypes (Keras rebuilds its layers "
                "in __init__); after loading, apply policy.json again: apply_policy(model, 'policy.json', inplace=True)."
            )
        try:
            self.model.save(join("model.keras"))
            written.append(join("model.keras"))
        except Exception as exc:  # a subclassed model without get_config cannot be saved; the rest still is
            logger.warning("autoprec: could not save the tuned model (%s); the policy and reports are saved.", exc)
        from autoprec.report import write_report

        written += [str(p) for p in write_report(directory)]
        return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _say(verbose: int, message: str) -> None:
    logger.debug(message)
    if verbose:
        print(message, flush=True)


def _check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"Expected {name} to be an integer >= {minimum}. Received: {name}={describe(value)}.")


def _storage(storage: Any):
    import optuna

    if storage is None or not isinstance(storage, (str, os.PathLike)):
        return storage
    text = os.fspath(storage)
    if "://" in text:
        return text  # an RDB URL: sqlite:///x.db, postgresql://...
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(text))


def _at_chance(ctx: Context) -> bool:
    """No better than a constant predictor that knows only the label statistics.

    Accuracy: always guessing the most common class (+2 points or 2 samples).
    Cross-entropy: predicting the class frequencies (their entropy, -2%).
    Mean squared error: predicting the mean label (the label variance, -2%).
    A custom callable metric cannot be judged and is trusted.
    """
    name = ctx.metric.name.lower()
    y = np.asarray(ctx.y)
    if isinstance(ctx.baseline_outputs, (list, tuple, dict)):
        return False
    n_out = np.asarray(ctx.baseline_outputs).shape[-1]
    classes = y.argmax(-1) if y.ndim > 1 and y.shape[-1] > 1 and y.shape == np.shape(ctx.baseline_outputs) else y.reshape(len(y), -1)[:, 0].round()
    _, counts = np.unique(classes, return_counts=True)
    freqs = counts / len(y)
    if "acc" in name and ctx.metric.higher_is_better:
        chance = max(freqs.max(), 1.0 / max(n_out, 2))
        return ctx.baseline <= chance + max(0.02, 2.0 / len(y))
    if "crossentropy" in name and not ctx.metric.higher_is_better and n_out > 1:
        return ctx.baseline >= 0.98 * float(-(freqs * np.log(freqs)).sum())
    if name in ("mse", "mean_squared_error") and not ctx.metric.higher_is_better:
        variance = float(np.mean(np.var(y.astype("float64"), axis=0)))
        return variance > 0 and ctx.baseline >= 0.98 * variance
    return False


def _blocks(ctx: Context, keys: list[str]) -> dict[str, list[str]]:
    """Group units: a nested sub-model is one block, else layers sharing a name prefix.

    The prefix is the path with its last ``_``-separated token dropped
    (``conv2_block1_1_conv`` -> ``conv2_block1_1``); a custom layer's
    sublayers already share their parent.
    """
    groups: dict[str, list[str]] = {}
    for path in keys:
        info = ctx.graph[path]
        if info.parent:
            block = info.parent
        else:
            name = path.split("/")[0]
            block = name.rsplit("_", 1)[0] if "_" in name else name
        groups.setdefault(block, []).append(path)
    return groups


def tune(
    model: Any,
    data: Any,
    budget: Any = "0.5%",
    *,
    metric: Any = None,
    higher_is_better: bool | None = None,
    target: str = MIXED_FLOAT16,
    candidates: tuple[str, ...] | None = None,
    granularity: str = "layer",
    keep_float32=(),
    force_16bit=(),
    cost: str = "estimate",
    device: str | None = None,
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
    batch_size: int = 256,
    verbose: int = 1,
) -> TuneResult:
    """Find the fastest per-layer precision whose metric stays within ``budget``.

    Args:
        model: a float32 Keras model (Functional, Sequential, nested; subclassed
            models are tuned with real policies set in place).
        data: evaluation data: ``(x, y)``, a ``tf.data.Dataset`` or a ``PyDataset``.
        budget: largest allowed metric drop: ``"0.5%"`` / ``0.005`` (absolute),
            ``"1% relative"`` / ``Budget(0.01, relative=True)``.
        metric: metric name/instance, loss, or callable (with ``higher_is_better``).
        target: ``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"auto"``.
        candidates: formats per unit; default ``("float32", target)``. Pass
            ``("float32", "mixed_bfloat16", "mixed_float16")`` for a three-way choice.
        granularity: ``"layer"`` (one decision per layer) or ``"block"``.
        keep_float32 / force_16bit: user pins, exact paths or full-match regexes.
        cost: ``"estimate"`` (cost model) or ``"measured"`` (time the real
            training step of the best candidates on this device).
        device: cost-model device (``"gpu"``, ``"cpu"``, ``"cpu_no_bf16"``);
            default: ``"gpu"`` for float16 (its deployment device), else this machine.
        n_trials / timeout / seed: search limits and seed.
        storage / study_name: Optuna storage URL or journal-file path, to
            resume a search or share it between worker processes.
        verify: ``"eval"`` or ``"train"`` (also a short loss-scaled training run
            on ``train_data`` for ``steps`` steps).
        pretrain_steps: train a float32 copy this many steps on ``train_data``
            before searching (done automatically when the baseline is at chance).
        max_fallbacks: how many units verification may return to float32.
        verbose: 0 silent; 1 prints the budget formula and a progress bar.

    Returns:
        A :class:`TuneResult`.

    Raises:
        BudgetError, PolicyError, DataError, MetricError, UntrainedModelError.

    Example:
        >>> result = tune(model, (x_val, y_val), budget="0.5%", target="mixed_bfloat16")  # doctest: +SKIP
        >>> result.policy.save("policy.json")                                              # doctest: +SKIP
    """
    import optuna

    started = time.monotonic()
    budget = Budget.parse(budget)
    asked = target
    target, why = explain_target(target)
    if asked == "auto":
        _say(verbose, f"autoprec: target=auto -> {target} ({why}).")
    choices = tuple(candidates) if candidates is not None else (FLOAT32, target)
    if FLOAT32 not in choices or any(c not in (FLOAT32, MIXED_FLOAT16, MIXED_BFLOAT16) for c in choices) or len(set(choices)) != len(choices) or target not in choices:
        raise PolicyError(
            f"Expected candidates to hold 'float32', the target {target!r}, and optionally the other 16-bit format. "
            f"Received: candidates={describe(candidates)}."
        )
    if granularity not in GRANULARITIES:
        raise PolicyError(f"Expected granularity to be one of {list(GRANULARITIES)}. Received: granularity={describe(granularity)}.")
    if verify not in VERIFY_MODES:
        raise PolicyError(f"Expected verify to be one of {list(VERIFY_MODES)}. Received: verify={describe(verify)}.")
    if cost not in COSTS:
        raise PolicyError(f"Expected cost to be one of {list(COSTS)}. Received: cost={describe(cost)}.")
    _check_int("n_trials", n_trials, 1)
    _check_int("seed", seed, 0)
    _check_int("steps", steps, 2)
    _check_int("max_fallbacks", max_fallbacks, 0)
    _check_int("pretrain_steps", pretrain_steps, 1, allow_none=True)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise PolicyError(f"Expected timeout to be a number of seconds > 0, or None. Received: timeout={describe(timeout)}.")
    if verify == "train" and train_data is None:
        raise DataError("Expected train_data=(x, y) with verify='train': the training check fine-tunes on it.")
    if pretrain_steps is not None and train_data is None:
        raise DataError("Expected train_data=(x, y) with pretrain_steps: the float32 copy is pretrained on it.")

    formats = tuple(c for c in choices if c != FLOAT32)
    options = dict(metric=metric, higher_is_better=higher_is_better, batch_size=batch_size,
                   keep_float32=keep_float32, force_16bit=force_16bit)
    ctx = prepare(model, data, target=target, formats=formats, **options)
    work, pretrained = ctx.model, 0  # the model itself, or its float32 copy if it was built mixed
    at_chance = _at_chance(ctx)
    if at_chance or pretrain_steps:
        if train_data is None:
            raise UntrainedModelError(
                f"The float32 model scores {ctx.metric.name}={ctx.baseline:.4g} on the evaluation data, which is chance "
                "level: its weights look untrained, and a budget measured on random weights means nothing. Pass "
                "train_data=(x, y) (and optionally pretrain_steps=N) so autoprec trains a float32 copy first, or "
                "tune the model after training it."
            )
        if ctx.graph.kind == SUBCLASSED:
            raise UnsupportedModelError("Pretraining clones the model; a subclassed model cannot be cloned. Train it first, then tune.")
        pretrained = pretrain_steps or DEFAULT_PRETRAIN_STEPS
        why = "the float32 baseline is at chance level" if at_chance else f"pretrain_steps={pretrained}"
        _say(verbose, f"autoprec: training a float32 copy for {pretrained} steps before searching ({why}).")
        work = apply_policy(ctx.model, {}, graph=ctx.graph)
        train_steps(work, cycle_batches(train_data, pretrained, 32))
        ctx = prepare(work, data, target=target, formats=formats, **options)
        if _at_chance(ctx):
            logger.warning("autoprec: still at chance level after %d pretraining steps; pass a larger pretrain_steps.", pretrained)

    allowed = budget.allowed(ctx.baseline)
    formula = budget.formula(metric=ctx.metric.name, higher_is_better=ctx.metric.higher_is_better, baseline=ctx.baseline)
    _say(verbose, f"autoprec: target {target}; budget {budget}: {formula}")

    units = [u.path for u in ctx.graph.units]
    unit_set = set(units)
    forced = unit_set & ctx.graph.forced
    method = "full" if len(units) <= _ABLATION_LIMIT else "fast"
    from autoprec import backends

    if backends.name() not in ("tensorflow", "jax") and ctx.graph.kind != SUBCLASSED:
        method = "ablation"  # gradient statistics need tf.GradientTape or jax.grad
    sensitivity = profile(work, data, target=target, method=method, verbose=verbose, context=ctx)
    sens_order = [p for p in sensitivity["path"] if p in unit_set]  # most sensitive first
    order_units = [p for p in sens_order if p not in forced]
    free = [u for u in units if u not in forced]
    if granularity == "block":
        groups = _blocks(ctx, free)
    else:
        groups = {u: [u] for u in free}
    rank = {u: i for i, u in enumerate(order_units)}
    keys = list(groups)
    order = sorted(keys, key=lambda k: min(rank.get(u, len(rank)) for u in groups[k]))

    def expand(assignment: dict[str, str]) -> dict[str, str]:
        out = {u: target for u in forced}
        for key, choice in assignment.items():
            for u in groups[key]:
                out[u] = choice
        return out

    device = device or ("gpu" if target == MIXED_FLOAT16 or backends.is_cuda_gpu_available()
                        else ("cpu" if backends.cpu_has_fast_bf16() else "cpu_no_bf16"))
    cost_model = CostModel(ctx.graph, device=device)
    _say(verbose, f"autoprec: cost model for device '{device}'" + (f"; {len(cost_model.flagged)} layer(s) have dims not multiple of 8" if cost_model.flagged else ""))

    def estimate(assignment):
        return cost_model.speedup(ctx.graph.resolve(expand(assignment)))

    def evaluate(assignment):
        return ctx.evaluate(expand(assignment))

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar replaces Optuna's per-trial log
    try:
        study, search, best = _search(optuna, ctx, model, target, budget, seed, storage, study_name, keys, choices,
                                      order, estimate, evaluate, allowed, n_trials, timeout, verbose)
    finally:
        optuna.logging.set_verbosity(verbosity)
    # force_16bit units stay 16-bit even when nothing met the budget: the user asked for them.
    assignment = expand(best.assignment if best else {})
    if best is None:
        _say(verbose, "autoprec: no assignment with a unit in 16-bit met the budget; the result is all float32.")

    measured, measured_by_trial = None, {}
    if cost == "measured":
        assignment, measured, measured_by_trial = _measure_best(work, ctx, search, expand)

    # Verification: real Keras policies on this device, falling back by sensitivity.
    fallbacks, discrepancies, train_fallbacks = [], [], []
    simulated = ctx.evaluate(assignment) if assignment else {"drop": 0.0, "metric": ctx.baseline}
    while True:
        names = ctx.graph.resolve(assignment)
        tuned, real = verify_eval(work, ctx.graph, names, ctx)
        discrepancies.append({"simulated_drop": simulated["drop"], "real_drop": real["drop"], "n_16bit": sum(v != FLOAT32 for v in assignment.values())})
        if budget.feasible(baseline=ctx.baseline, drop=real["drop"]) or not assignment or len(fallbacks) >= max_fallbacks:
            break
        back = next((p for p in sens_order if assignment.get(p, FLOAT32) != FLOAT32 and p not in forced), None)
        if back is None:
            break
        _say(verbose, f"autoprec: real drop {real['drop']:.4g} misses the budget; returning {back!r} to float32.")
        fallbacks.append(back)
        assignment = {k: v for k, v in assignment.items() if k != back}
        simulated = ctx.evaluate(assignment)

    training = None
    if verify == "train":
        while True:
            names = ctx.graph.resolve(assignment)
            training = train_check(work, names, train_data, graph=ctx.graph, steps=steps, metric=ctx.metric, eval_data=ctx.data)
            if training.passed or not assignment or len(fallbacks) >= max_fallbacks:
                break
            back = _train_fallback(sensitivity, assignment, forced, sens_order)
            if back is None:
                break
            _say(verbose, f"autoprec: training check failed ({training.reason}); returning {back!r} to float32.")
            fallbacks.append(back)
            train_fallbacks.append({"path": back, "reason": training.reason})
            assignment = {k: v for k, v in assignment.items() if k != back}
        names = ctx.graph.resolve(assignment)
        tuned, real = verify_eval(work, ctx.graph, names, ctx)

    if ctx.graph.kind == SUBCLASSED:
        logger.warning("autoprec: %r is subclassed, so its layers now carry the tuned policies in place.", model.name)
    policy = PrecisionPolicy(names, target=target, layers=ctx.graph.layer_facts())
    sensitivity = _with_decisions(sensitivity, ctx, names, forced, fallbacks, train_fallbacks)
    trials = _trials_frame(study, keys, measured_by_trial)
    result = TuneResult(
        policy=policy, model=tuned, sensitivity=sensitivity, trials=trials, study=study,
        baseline_metric=ctx.baseline, metric=real["metric"], budget=budget,
        speedup_estimate=cost_model.speedup(names), metric_name=ctx.metric.name,
        higher_is_better=ctx.metric.higher_is_better, target=target, formula=formula,
        verification={"fallbacks": fallbacks, "train_fallbacks": train_fallbacks, "checks": discrepancies, "real_drop": real["drop"], "feasible": budget.feasible(baseline=ctx.baseline, drop=real["drop"])},
        training=training, measured_speedup=measured, pretrain_steps=pretrained,
        stats={"evaluations": search.evaluations, "cache_hits": search.cache_hits, "passes": ctx.engine.passes,
               "traces": ctx.engine.traces, "engine": ctx.engine.kind, "device": device, "granularity": granularity,
               "decision_keys": len(keys), "misaligned": sorted(cost_model.flagged), "seconds": time.monotonic() - started, "study_name": study.study_name},
    )
    if verbose:
        print(result.summary(), flush=True)
    return result


def _search(optuna, ctx, model, target, budget, seed, storage, study_name, keys, choices, order, estimate, evaluate,
            allowed, n_trials, timeout, verbose):
    """Create or resume the study and run the search on it."""
    name = study_name or f"autoprec-{getattr(model, 'name', 'model')}-{target}-{budget.max_drop:g}{'rel' if budget.relative else ''}-seed{seed}"
    study = optuna.create_study(
        study_name=name, storage=_storage(storage), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    _check_study(study, keys=keys, choices=choices, baseline=ctx.baseline)
    space = Space(tuple(keys), choices, target, tuple(order))
    bar = _progress(verbose, n_trials)
    search = Search(space, evaluate, estimate, allowed, study, n_trials=n_trials, timeout=timeout, seed=seed,
                    on_trial=(lambda s: bar.update(s.finished(), [("best_speedup", s.best_speedup())])) if bar else None)
    best = search.run()
    if bar is not None:
        bar.update(min(search.finished(), n_trials), [("best_speedup", search.best_speedup())], finalize=True)
    return study, search, best


def _check_study(study: Any, *, keys: list[str], choices: tuple, baseline: float) -> None:
    """A resumed study must describe the same search; else its trials would mislead this one."""
    attrs = study.user_attrs
    if not attrs:
        study.set_user_attr("keys", keys)
        study.set_user_attr("choices", list(choices))
        study.set_user_attr("baseline", baseline)
        return
    if attrs.get("keys") != keys or tuple(attrs.get("choices", ())) != choices:
        raise PolicyError(
            f"Expected the stored study {study.study_name!r} to search the same units and formats. Received a study "
            "made for another model, granularity or candidates. Pass a new study_name= or another storage."
        )
    if abs(float(attrs.get("baseline", baseline)) - baseline) > 1e-6 * max(1.0, abs(baseline)):
        raise PolicyError(
            f"Expected the stored study {study.study_name!r} to share this run's float32 baseline "
            f"({baseline:.6g}); it recorded {attrs.get('baseline')}. The data or weights changed; use a new study_name=."
        )


def _progress(verbose: int, n_trials: int):
    if not verbose:
        return None
    import keras

    return keras.utils.Progbar(n_trials, unit_name="trial", stateful_metrics=["best_speedup"])


def _train_fallback(sensitivity, assignment, forced, sens_order) -> str | None:
    """The unit to return to float32 after a failed training check: gradient hazards first."""
    frame = sensitivity.set_index("path")
    candidates = [p for p in assignment if assignment[p] != FLOAT32 and p not in forced]
    if not candidates:
        return None
    def hazard(p):
        row = frame.loc[p] if p in frame.index else {}
        get = lambda c: float(row.get(c, 0) or 0) if hasattr(row, "get") else 0.0  # noqa: E731
        return get("grad_scaled_overflow") + get("act_overflow") + get("grad_scaled_flush") + get("wgrad_scaled_overflow")
    ranked = sorted(candidates, key=lambda p: (-hazard(p), sens_order.index(p) if p in sens_order else len(sens_order)))
    return ranked[0]


def _measure_best(work, ctx, search, expand, *, top: int = 3, steps: int = 10):
    """Time the real training step of the best feasible candidates, interleaved; pick the fastest.

    Returns the winning unit assignment, its measured speed-up over float32,
    and the measured speed-up per trial number.
    """
    from autoprec.verify import train_steps as run

    feasible = sorted((o for o in search.cache.values() if o.feasible), key=lambda o: -o.speedup)[:top]
    if not feasible:
        return {}, None, {}
    batches = [ctx.data.batches[i % len(ctx.data.batches)] for i in range(steps)]
    models = {"float32": apply_policy(work, {}, graph=ctx.graph)}
    for i, o in enumerate(feasible):
        models[i] = apply_policy(work, ctx.graph.resolve(expand(o.assignment)), graph=ctx.graph)
    times = {k: [] for k in models}
    for m in models.values():
        run(m, batches[:2])  # warm-up: trace the train function
    for x, y in batches:  # interleaved, so drift on the machine hits every variant alike
        for k, m in models.items():
            t = time.perf_counter()
            m.train_on_batch(x, y)
            times[k].append(time.perf_counter() - t)
    base = float(np.median(times["float32"]))
    speed = {i: base / float(np.median(times[i])) for i in range(len(feasible))}
    by_trial = {o.trial: speed[i] for i, o in enumerate(feasible) if o.trial is not None}
    winner = max(speed, key=speed.get)
    return expand(feasible[winner].assignment), speed[winner], by_trial


def _with_decisions(sensitivity, ctx: Context, names: dict[str, str], forced, fallbacks, train_fallbacks):
    frame = sensitivity.copy()
    trained_back = {f["path"] for f in train_fallbacks}
    decisions, why = [], []
    for row in frame.itertuples(index=False):
        info = ctx.graph[row.path]
        decision = names.get(row.path, FLOAT32) if info.is_layer else "follows"
        if info.pinned:
            reason = info.pinned
        elif not info.is_unit:
            reason = reasons.FOLLOWS
            if info.is_layer:
                decision = names.get(row.path, FLOAT32)
        elif decision != FLOAT32:
            reason = reasons.FORCED_16BIT if row.path in forced else reasons.LOW_PRECISION_OK
        elif row.path in trained_back:
            reason = reasons.TRAIN_FALLBACK
        elif row.path in fallbacks:
            reason = reasons.VERIFY_FALLBACK
        elif _num(row, "act_overflow") > 0 or _num(row, "nonfinite_outputs") > 0:
            reason = reasons.OVERFLOW
        elif _num(row, "act_flush") > 0.01:
            reason = reasons.UNDERFLOW
        elif _num(row, "metric_drop") > 0:
            reason = reasons.METRIC_DROP
        else:
            reason = reasons.NO_GAIN
        decisions.append(decision)
        why.append(reason)
    frame["decision"] = decisions
    frame["reason"] = why
    return frame


def _num(row, name: str) -> float:
    value = getattr(row, name, 0.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(value) else value


def _trials_frame(study: Any, keys: list[str], measured: dict[int, float]):
    import pandas as pd

    rows = []
    for t in study.trials:
        a = t.user_attrs
        params = t.params
        rows.append({
            "trial": t.number, "state": t.state.name, "phase": a.get("phase", ""), "worker": a.get("worker", ""),
            "speedup_estimate": t.value, "metric": a.get("metric"), "drop": a.get("drop"), "feasible": a.get("feasible"),
            "nonfinite_outputs": a.get("nonfinite_outputs"), "output_error": a.get("output_error"),
            "n_16bit": a.get("n_16bit"), "cached": a.get("cached"), "measured_speedup": measured.get(t.number),
            "float32_units": ";".join(k for k in keys if params.get(k, FLOAT32) == FLOAT32) if params else "",
        })
    return pd.DataFrame(rows)
