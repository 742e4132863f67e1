"""A tuning session: the model, its graph, the data, the metric, the engine and the float32 baseline.

:func:`open_session` checks everything once (the model's weights and float32
outputs are finite, labels fit the outputs and the loss) and measures the
baseline. :meth:`Session.evaluate` then scores one assignment in one pass
over the data, batch by batch, so a pass holds one batch of activations at
a time.

Early rejection: where the metric is a mean of bounded per-sample values
(accuracy in [0, 1], a non-negative loss), the final drop after ``m`` of
``n`` samples is at least ``(sum of drops so far + the most the remaining
samples could win back) / n``, because the baseline's value on every
remaining sample is known. When that lower bound is already over the budget,
the trial is over budget with certainty, and the pass stops there. A
non-finite output makes the drop infinite at once. Nothing is assumed about
the order of the data, and a rejected trial is recorded as rejected, with
its bound.

>>> session = open_session(model, (x, y), target="mixed_float16")  # doctest: +SKIP
>>> session.evaluate({"dense_1": "mixed_float16"}).drop            # doctest: +SKIP
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec.apply import clone_with_policies
from autoprec.budget import BoundBudget, Budget
from autoprec.data import DEFAULT_BATCH_SIZE, EvalData
from autoprec.engine import make_engine, output_masks
from autoprec.errors import DataError, MetricError, ModelError, UnsupportedModelError
from autoprec.formats import split
from autoprec.graph import SUBCLASSED, ModelGraph, build_graph
from autoprec.metrics import Metric, check_labels, label_reshaper, single

logger = logging.getLogger("autoprec")


@dataclass(frozen=True)
class Evaluation:
    """One assignment scored on the evaluation data.

    ``drop`` is exact, or, when ``rejected``, a certain lower bound reached
    after ``samples`` samples. ``harm`` is the one-sided drop: the mean over
    samples of what each sample lost, gains ignored (for a metric that is not
    a mean of per-sample values, ``max(drop, 0)``). Losses and gains of
    different layers cancel in ``drop`` but never in ``harm``.
    """

    metric: float
    drop: float
    output_error: float
    nonfinite_outputs: int
    samples: int
    rejected: bool = False
    harm: float = math.nan
    bound: float = math.nan  # upper confidence bound on the drop (autoprec.verify.bounds); NaN when none is asked for

    @property
    def judged(self) -> float:
        """The drop the budget judges: its upper confidence bound where one was computed, else the drop itself.

        Every feasibility decision (search, split, verify, fall-back, a
        resumed study) reads this one number, so they all follow one rule.
        """
        return self.drop if math.isnan(self.bound) else self.bound


@dataclass
class Session:
    """Everything later stages share. Build it with :func:`open_session`."""

    model: Any
    graph: ModelGraph
    data: EvalData
    metric: Metric
    engine: Any
    target: str
    formats: tuple[str, ...]
    baseline: float
    baseline_outputs: list = field(repr=False)
    baseline_values: np.ndarray | None = field(repr=False)
    passes: int = 0
    pass_seconds: float = 0.0  # one warm float32 pass over the whole data: the unit of tune's cost
    confidence: float | None = None  # judge drops by their upper bound at this confidence (autoprec.verify.bounds)
    holdout: Any = None  # a Session over held-out data (autoprec.verify.holdout), scored at verification only
    resolution: dict[str, Any] = field(default_factory=dict)  # what the data resolves under the bound (tuner)
    _cache: dict = field(default_factory=dict, repr=False)
    # Checks with real policies: (model, Evaluation) by assignment, the last complete one; by (assignment, budget)
    # with no model, those stopped over a budget.
    _real: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def units_per_sample(self) -> float:
        """What one sample's metric value averages over: 1, or the tokens of a sequence label (those weighed above
        zero, on average, under sample weights such as a padding mask)."""
        from autoprec.metrics import units_per_sample

        return units_per_sample(self.metric.labels_of(self.data.y), self.metric.weights_of(self.data.weights))

    @functools.cached_property
    def sample_scales(self) -> np.ndarray:
        """Each sample's weight in the metric (ones without sample weights; their mean is one)."""
        from autoprec.metrics import sample_scales

        return sample_scales(self.metric.weights_of(self.data.weights), self.data.n)

    @functools.cached_property
    def binary_values(self) -> bool:
        """Each sample (or each token of a sequence) is right or wrong in the float32 baseline: accuracy-like metrics.

        A per-token accuracy's value per sequence is a count of right tokens over
        :attr:`units_per_sample`; under a 0/1 padding mask, a count of right real tokens.
        """
        v, units = self.baseline_values, self.units_per_sample
        return v is not None and _whole_counts(v * units, units * self.sample_scales)

    def evaluate(
        self, assignment: Mapping[str, str], *, budget: Budget | None = None, harm_above: float | None = None
    ) -> Evaluation:
        """Score ``assignment`` in one pass.

        With ``budget``, stop as soon as the drop is certainly over it; with
        ``harm_above``, as soon as the harm is (it only grows along the pass).
        Complete passes are cached, so the profile and the search share them.
        """
        key = self._key(assignment)
        stopped = self._real.get((key, budget))
        if stopped is not None:  # real policies broke this budget: no simulated pass can make it feasible
            return stopped[1]
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if harm_above is not None and not self.binary_values:
            # Harm is max(drop, 0) here: the certain bound on the drop stops the pass early.
            budget, harm_above = Budget(harm_above), None
        self.engine.set_assignment(dict(assignment))
        self.passes += 1
        result = _Pass(self, budget, harm_above).run()
        if not result.rejected:
            self._cache[key] = result
        return result

    def _key(self, assignment: Mapping[str, str]) -> tuple:
        # Keyed by what every node computes in, not by how the assignment spells it: a layer named at the policy
        # it would follow anyway is the same pass (on MobileNetV2 at 224x224 a second all-16-bit pass, spelled
        # differently, cost 1.3 predict passes).
        return tuple(sorted(self.graph.resolve_nodes(assignment).items()))

    def score_batches(
        self, assignment: Mapping[str, str], model: Any, forward: Any, *, budget: Budget | None = None
    ) -> Evaluation:
        """Score ``model``, a copy of the model that computes ``assignment`` with real Keras policies, from
        ``forward(x, y) -> (outputs, per-sample values or None)`` batch by batch, stopping as :meth:`evaluate`
        does.

        A complete pass is cached as ``assignment``'s evaluation, so that the search reads the real figures,
        and the model is kept for the verification (:meth:`real_model`): the same policies, checked on the
        same data, need no second pass (where it meets ``budget``: one that misses cannot win). A pass stopped
        over ``budget`` answers :meth:`evaluate` under that budget, before any simulated figures.
        """
        self.passes += 1
        result = _Pass(self, budget, forward=forward).run()
        key = self._key(assignment)
        if result.rejected:  # stopped over ``budget``: the search under that budget reads it, nothing else
            self._real[(key, budget)] = (None, result)
            return result
        self._cache[key] = result
        self.release_real_model()
        if budget is None or self.rule(budget).feasible(result.judged):  # else it cannot win: let it go
            self._real[key] = (model, result)
        return result

    def release_real_model(self) -> None:
        """Let go of the model kept by :meth:`score_batches` (the verification has moved on from it)."""
        kept = {k: v for k, v in self._real.items() if v[0] is None}
        if len(kept) < len(self._real):
            self._real = kept
            gc.collect()  # a Keras model's layers hold reference cycles: free its memory now

    def real_model(self, assignment: Mapping[str, str]) -> tuple[Any, Evaluation] | None:
        """The model and evaluation of :meth:`score_batches` for ``assignment``, where that was its last check."""
        return self._real.get(self._key(assignment))

    def close(self) -> None:
        """Give the model back as it was (the real-policy engine restores each layer's policy)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def rule(self, budget: Budget) -> BoundBudget:
        """``budget`` bound to this session's float32 baseline, metric direction and confidence."""
        return budget.bind(
            baseline=self.baseline,
            higher_is_better=self.metric.higher_is_better,
            metric=self.metric.name,
            confidence=self.confidence,
        )

    def score_outputs(self, outputs: Any) -> Evaluation:
        """Score full-data outputs of a real model (verification), batch-aligned with the data."""
        import keras

        flat = keras.tree.flatten(outputs)
        base = [keras.tree.flatten(b) for b in self.baseline_outputs]
        num, den, offset = 0.0, 0.0, 0
        for b in base:
            n = len(b[0])
            part = [o[offset : offset + n] for o in flat]
            num += sum(float(np.sum((p.astype(np.float64) - q) ** 2)) for p, q in zip(part, b, strict=True))
            den += sum(float(np.sum(np.square(q, dtype=np.float64))) for q in b)
            offset += n
        nonfinite = int(sum(np.size(o) - np.count_nonzero(np.isfinite(o)) for o in flat))
        weights = self.data.weights
        value = self.metric.compute(self.data.y, outputs, weights)
        if self.metric.per_sample is not None and self.baseline_values is not None:
            values = self.metric.values(*self.metric.select(self.data.y, outputs), self.metric.weights_of(weights))
            bound = self.bound_of(values, value)
            return _evaluation(self, value, nonfinite, num, den, self.data.n, bound=bound)
        return _evaluation(self, value, nonfinite, num, den, self.data.n, bound=self.bootstrap_bound(outputs, value))

    def bound_of(self, values: np.ndarray, value: float) -> float:
        """Upper confidence bound on the drop of per-sample ``values`` against the float32 ones (NaN: none asked)."""
        if self.confidence is None or self.baseline_values is None:
            return math.nan
        if not math.isfinite(value):
            return math.inf
        from autoprec.verify.bounds import paired_upper_bound

        return paired_upper_bound(
            self.baseline_values,
            values,
            higher_is_better=self.metric.higher_is_better,
            binary=self.binary_values,
            confidence=self.confidence,
            units=self.units_per_sample,
        )

    def bootstrap_bound(self, outputs: Any, value: float) -> float:
        """Paired bootstrap bound for a metric that is not a mean over samples (AUC, F1, a callable)."""
        if self.confidence is None:
            return math.nan
        import keras

        from autoprec.verify.bounds import bootstrap_upper_bound

        base = keras.tree.map_structure(lambda *p: np.concatenate(p), *self.baseline_outputs)
        take = lambda tree, idx: keras.tree.map_structure(lambda a: np.asarray(a)[idx], tree)  # noqa: E731
        sign = 1.0 if self.metric.higher_is_better else -1.0

        def drop_on(idx: np.ndarray) -> float:
            y, w = take(self.data.y, idx), None if self.data.weights is None else take(self.data.weights, idx)
            return sign * (self.metric.compute(y, take(base, idx), w) - self.metric.compute(y, take(outputs, idx), w))

        point = Budget.drop(baseline=self.baseline, value=value, higher_is_better=self.metric.higher_is_better)
        return bootstrap_upper_bound(drop_on, self.data.n, confidence=self.confidence, point=point)

    def fingerprint(self) -> str:
        """A short hash of the labels, the first inputs, the sample weights (where any) and the sample count: what a
        stored study was judged on."""
        import keras

        h = hashlib.sha1(str(self.data.n).encode())
        weights = [] if self.data.weights is None else keras.tree.flatten(self.data.weights)
        for a in keras.tree.flatten(self.data.y) + keras.tree.flatten(self.data.x_sample(2)) + weights:
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(self.metric.name.encode())
        return h.hexdigest()[:16]


def _whole_counts(counts: np.ndarray, most: np.ndarray) -> bool:
    """Every count is a whole number from 0 to its ``most``.

    float32 means of 0/1 values (and weights scaled to a mean of one) are whole
    counts only to float32's precision, relative to the count: about 1e-5 over 2,048 tokens.
    """
    slack = 1e-5 * np.maximum(most, 1.0)
    return bool(np.all((counts >= -slack) & (counts <= most + slack) & (np.abs(counts - np.rint(counts)) < slack)))


def _evaluation(
    session: Session,
    value: float,
    nonfinite: int,
    num: float,
    den: float,
    samples: int,
    rejected: bool = False,
    drop: float | None = None,
    harm: float | None = None,
    bound: float = math.nan,
) -> Evaluation:
    error = math.inf if nonfinite or not math.isfinite(num) else math.sqrt(num) / (math.sqrt(den) or 1.0)
    if drop is None:
        drop = Budget.drop(baseline=session.baseline, value=value, higher_is_better=session.metric.higher_is_better)
        if nonfinite or not math.isfinite(value):
            drop = math.inf  # a model whose outputs go non-finite has no usable metric
    if harm is None or nonfinite:
        harm = math.inf if nonfinite else max(float(drop), 0.0)
    if nonfinite or not math.isfinite(drop):
        bound = math.nan if math.isnan(bound) else math.inf
    elif num == 0.0 and not math.isnan(bound):
        bound = drop  # outputs bit for bit the float32 ones (all float32): nothing is uncertain
    return Evaluation(
        float(value), float(drop), float(error), int(nonfinite), int(samples), rejected, float(harm), float(bound)
    )


class _Pass:
    """One pass over the data for the engine's current assignment, with the certain-bound early stop."""

    def __init__(
        self, session: Session, budget: Budget | None, harm_above: float | None = None, *, forward: Any = None
    ) -> None:
        self.s, self.budget, self.harm_above = session, budget, harm_above
        self.forward = forward or session.engine.forward  # (x, y, w) -> (outputs, per-sample values or None)
        metric = session.metric
        self.bound = None
        if budget is not None and session.baseline_values is not None and metric.bounds is not None:
            lo, hi = metric.bounds
            b, scale = session.baseline_values, session.sample_scales  # a weighted sample's range is scaled
            with np.errstate(invalid="ignore"):  # an unbounded range times a weight of 0: no bound, below
                best = (b - hi * scale) if metric.higher_is_better else (lo * scale - b)  # the most it can win back
            if np.all(np.isfinite(best)):
                self.bound = np.concatenate([np.cumsum(best[::-1])[::-1], [0.0]])  # suffix sums

    def run(self) -> Evaluation:
        s = self.s
        values, outputs, num, den, nonfinite, seen = [], [], 0.0, 0.0, 0, 0
        self.dsum = self.hsum = 0.0
        for (x, y, w), base in zip(s.data.weighted_batches(), s.baseline_outputs, strict=True):
            out, vals = self.forward(x, y, w)
            flat, bflat = _flat(out), _flat(base)
            bad = int(sum(np.size(o) - np.count_nonzero(np.isfinite(o)) for o in flat))
            nonfinite += bad
            with np.errstate(all="ignore"):
                num += sum(float(np.sum((o.astype(np.float64) - b) ** 2)) for o, b in zip(flat, bflat, strict=True))
            den += sum(float(np.sum(np.square(b, dtype=np.float64))) for b in bflat)
            start, seen = seen, seen + len(flat[0])
            if vals is None:
                outputs.append(out)
            else:
                values.append(vals)
            stop = self._certain_drop(vals, start, seen, bad)
            if stop is not None and seen < s.data.n:
                return _evaluation(
                    s, math.nan, nonfinite, num, den, seen, rejected=True, drop=stop, harm=self.hsum / s.data.n
                )
            if self.harm_above is not None and seen < s.data.n and (bad or self.hsum / s.data.n > self.harm_above):
                return _evaluation(
                    s, math.nan, nonfinite, num, den, seen, rejected=True, drop=math.nan, harm=self.hsum / s.data.n
                )
        if values:
            every = np.concatenate(values)
            value = float(np.mean(every))
            harm = self.hsum / s.data.n if s.binary_values else None
            return _evaluation(s, value, nonfinite, num, den, seen, harm=harm, bound=s.bound_of(every, value))
        import keras

        full = keras.tree.map_structure(lambda *p: np.concatenate(p), *outputs)
        value = s.metric.compute(s.data.y, full, s.data.weights)
        return _evaluation(s, value, nonfinite, num, den, seen, bound=s.bootstrap_bound(full, value))

    def _certain_drop(self, vals: np.ndarray | None, start: int, seen: int, bad: int) -> float | None:
        """Accumulate the per-sample drops; return a lower bound on the final drop that is over budget, or None."""
        if vals is not None and self.s.baseline_values is not None:
            b = self.s.baseline_values[start:seen]
            d = (b - vals) if self.s.metric.higher_is_better else (vals - b)
            finite = np.isfinite(d)
            self.dsum += float(d[finite].sum()) if finite.all() else math.inf
            # One-sided only where a sample is simply right or wrong: a continuous per-sample value
            # moves a little everywhere, and its positive parts would add up to noise.
            losses = np.clip(d, 0, None) if self.s.binary_values else None
            self.hsum += (float(losses.sum()) if finite.all() else math.inf) if losses is not None else 0.0
        if self.budget is None:
            return None
        if bad or not math.isfinite(self.dsum):
            return math.inf
        if self.bound is None or vals is None:
            return None
        lower = (self.dsum + float(self.bound[seen])) / self.s.data.n
        return lower if not self.s.rule(self.budget).feasible(lower) else None


def _flat(structure: Any) -> list[np.ndarray]:
    import keras

    return [np.asarray(a) for a in keras.tree.flatten(structure)]


def open_session(
    model: Any,
    data: Any,
    *,
    target: str,
    formats: tuple[str, ...] | None = None,
    metric: Any = None,
    higher_is_better: bool | None = None,
    batch_size: int | str = "auto",
    keep_float32=(),
    force_16bit=(),
    nonfinite_inputs: str = "raise",
    confidence: float | None = None,
) -> Session:
    """Check the model and data, build the graph and engine, and measure the float32 baseline.

    Raises:
        DataError: the data is malformed, non-finite, or does not fit the model or its loss.
        ModelError: the model's weights or float32 outputs are not finite.
        MetricError: the metric cannot be resolved.
    """
    _check_weights(model)
    # A string other than "auto" reaches EvalData.get, whose check refuses it with the argument's name.
    size = DEFAULT_BATCH_SIZE if batch_size == "auto" else batch_size
    ev = EvalData.get(data, batch_size=size, model=model, nonfinite=nonfinite_inputs)  # type: ignore[arg-type]
    check_inputs_fit(model, ev)
    model, graph = _float32_graph(model, ev, keep_float32=keep_float32, force_16bit=force_16bit)
    if batch_size == "auto":
        ev = ev.rebatch(auto_batch_size(graph, budget_bytes=EVAL_MEMORY, cap=1024))
    ev = with_output_masks(model, ev)
    formats = tuple(formats or (target,))
    if graph.kind == SUBCLASSED and any(split(f)[0] for f in formats):
        raise UnsupportedModelError(
            f"Expected a Functional or Sequential model for quantized candidates. Received the subclassed model "
            f"{model.name!r}: its layers would be quantized in place for good, and the search must try and undo them. "
            "Rebuild it functionally, or drop the quantized candidates."
        )
    engine = make_engine(model, graph, formats=formats)
    outputs = [out for out, _ in (engine.forward(x, y) for x, y in ev.batches())]
    _check_outputs(engine, ev, outputs)
    ev, full = _checked_labels(model, ev, outputs, metric)
    resolved = Metric.get(metric, model=model, y=ev.y, y_pred=full, higher_is_better=higher_is_better)
    if ev.weights is not None and not resolved.weighs:
        raise MetricError(
            f"Expected a Keras metric or loss with sample weights (a padding mask, or the model's own output mask). "
            f"Received the callable metric {resolved.name!r}, which takes no weights. Pass metric='accuracy' (or "
            "another Keras metric), or data without weights and a callable that weighs the samples itself."
        )
    engine.use_metric(resolved)
    if hasattr(engine, "calibrate"):
        engine.calibrate(ev.batches())  # float8 twins: scales from this data, as the emitted model gets them
    values, baseline = _baseline(resolved, ev, full)
    if not math.isfinite(baseline):
        raise DataError(f"Expected a finite float32 baseline metric. Received {resolved.name}={baseline}.")
    session = Session(model, graph, ev, resolved, engine, target, formats, baseline, outputs, values)
    session.confidence = confidence
    session.pass_seconds = _warm_pass_seconds(engine, ev)
    return session


def _baseline(metric: Metric, ev: EvalData, full: Any) -> tuple[np.ndarray | None, float]:
    """The float32 per-sample values (where the metric has them) and the metric; unreadable labels: DataError.

    A metric that cannot compare these labels with these outputs (class ids
    of shape ``(n,)`` scored by ``mse`` against ``(n, 2)`` outputs) fails
    inside the backend with its own error; it is named here with the shapes.
    """
    from autoprec.errors import MetricError

    y, pred = metric.select(ev.y, full)
    try:
        values = metric.values(y, pred, metric.weights_of(ev.weights)) if metric.per_sample is not None else None
        return values, float(np.mean(values)) if values is not None else metric.compute(ev.y, full, ev.weights)
    except MetricError:
        raise
    except Exception as exc:
        raise DataError(
            f"Expected labels that the metric {metric.name!r} can compare with the model's outputs. Received "
            f"labels of shape {_shapes(y)} for outputs of shape {_shapes(pred)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}. Pass labels shaped like the output, or a "
            "metric that reads these labels (metric='accuracy' for class ids)."
        ) from None


def _shapes(structure: Any) -> list[tuple[int, ...]]:
    import keras

    return [np.shape(a) for a in keras.tree.flatten(structure)]


def _float32_graph(model: Any, ev: EvalData, *, keep_float32: Any, force_16bit: Any) -> tuple[Any, ModelGraph]:
    """The model's graph; a model built under a mixed global policy is measured on a float32 copy."""
    graph = build_graph(model, keep_float32=keep_float32, force_16bit=force_16bit, sample=ev.x_sample())
    if graph.kind != SUBCLASSED and any(
        i.is_layer and i.layer.compute_dtype != "float32" and i.pinned is None for i in graph.layers
    ):
        # A model built under a mixed global policy: the baseline and the
        # search need float32, so they run on a float32 copy with the same weights.
        logger.info(
            "autoprec: %r already computes partly in 16-bit; measuring a float32 copy with the same weights.",
            model.name,
        )
        model = clone_with_policies(model, graph.resolve({}))
        graph = build_graph(model, keep_float32=keep_float32, force_16bit=force_16bit, sample=ev.x_sample())
    return model, graph


def _checked_labels(model: Any, ev: EvalData, outputs: list, metric: Any) -> tuple[EvalData, Any]:
    """The data with labels shaped as the outputs (as Keras accepts them), checked; and the concatenated outputs."""
    import keras

    full = keras.tree.map_structure(lambda *p: np.concatenate(p), *outputs)
    fix = label_reshaper(ev.y, full)
    if fix is not None:  # y of shape (n,) for an output of shape (n, 1), as Keras accepts it
        ev = ev.map_labels(fix)
    # A callable metric over several outputs reads y as the user passed it (one array may serve them all).
    own_labels = (
        callable(metric)
        and isinstance(single(full), (list, tuple, dict))
        and not isinstance(single(ev.y), (list, tuple, dict))
    )
    if not own_labels:
        check_labels(model, ev.y, full, what="the evaluation data")
    return ev, full


def _warm_pass_seconds(engine: Any, ev: EvalData) -> float:
    """One warm float32 pass over the data, extrapolated from the first batch: the faster of two runs.

    One run is not enough: a call may still trace (a backend that compiles per
    assignment, or a first batch of another shape than the pass's last), and
    one trace extrapolated over the whole data made a 6 s pass read as 320 s.
    """
    import time

    import keras

    for x, y, w in ev.weighted_batches():
        seconds = []
        for _ in range(2):
            started = time.monotonic()
            engine.forward(x, y, w)
            seconds.append(time.monotonic() - started)
        return min(seconds) / max(len(keras.tree.flatten(x)[0]), 1) * ev.n
    return 0.0


EVAL_MEMORY = 256 << 20  # bytes of activations one evaluation batch may hold


def with_output_masks(model: Any, ev: EvalData) -> EvalData:
    """``ev`` with the Keras masks of the model's outputs folded into its sample weights, where it has any.

    A model whose ``Embedding(mask_zero=True)`` mask reaches its outputs has
    its padding left out of Keras's own ``evaluate`` (its metrics weigh by
    the mask); the metric here must leave it out too. A model without masked
    outputs costs one call on two samples; one with them, one eager pass.
    """
    import keras

    if all(m is None for m in output_masks(model, ev.x_sample(2))):
        _hint_padding(ev)
        return ev
    parts = [output_masks(model, x) for x, _ in ev.batches()]
    masks = [None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True)]
    if len(masks) == 1:
        given = ev.weights if not isinstance(ev.weights, (list, tuple, dict)) else keras.tree.flatten(ev.weights)[0]
        return ev.with_weights(_masked(given, masks[0], ev.n))
    # One part per output, in the model's output order, keyed as the labels are (by output name for a dict).
    names = list(getattr(model, "output_names", None) or range(len(masks)))
    combined = [_masked(_output_part(ev.weights, names, i), m, ev.n) for i, m in enumerate(masks)]
    weights: Any = dict(zip(names, combined, strict=True)) if isinstance(ev.y, dict) else combined
    return ev.with_weights(weights)


def _hint_padding(ev: EvalData) -> None:
    """Warn where a padding-mask input has padding, the labels are per token and no weights leave it out."""
    from autoprec.metrics import units_per_sample

    if ev.weights is not None or units_per_sample(ev.y) <= 1:
        return
    x = next(iter(ev.batches()))[0]
    masks = {k: v for k, v in x.items() if "padding_mask" in str(k)} if isinstance(x, dict) else {}
    padded = [k for k, v in masks.items() if np.asarray(v).size and not np.asarray(v).all()]
    if padded:
        logger.warning(
            "autoprec: the input %r has padding, and every token counts in the metric, padding included, as in "
            "Keras's evaluate without sample weights. Pass (x, y, x[%r]) to count only the real tokens, as "
            "KerasHub's preprocessors do with sample_weight.",
            padded[0],
            padded[0],
        )


def _output_part(structure: Any, names: list, i: int) -> Any:
    """Output ``i``'s part of per-output weights: by position in a list, by its name in a dict; one array is all's."""
    if isinstance(structure, dict):
        return structure.get(names[i], list(structure.values())[i] if i < len(structure) else None)
    if isinstance(structure, (list, tuple)):
        return structure[i]
    return structure


def _masked(weights: Any, mask: np.ndarray | None, n: int) -> np.ndarray:
    """Sample weights times an output's mask, their ranks aligned as Keras aligns them (ones where neither)."""
    if mask is None:
        return np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    mask = mask.astype(np.float32)
    if weights is None:
        return mask
    w = np.asarray(weights, np.float32)
    while w.ndim < mask.ndim:
        w = w[..., None]
    while mask.ndim < w.ndim:
        mask = mask[..., None]
    return w * mask


def auto_batch_size(
    graph: ModelGraph, *, budget_bytes: int, cap: int, per_sample: float | None = None, floor: int = 8
) -> int:
    """The largest batch whose activations fit ``budget_bytes`` (at least ``floor``, at most ``cap``).

    ``per_sample`` is the bytes one sample needs; by default every layer's
    output, which is what a traced pass was measured to hold (its rounding
    branches keep more than the one or two outputs a plain predict holds).
    """
    need = per_sample if per_sample is not None else sum(i.output_bytes for i in graph.layers) or 4.0
    return int(max(min(floor, cap), min(cap, budget_bytes // max(need, 1.0))))


def _check_weights(model: Any) -> None:
    import keras

    for layer in model._flatten_layers(include_self=False):
        for v in getattr(layer, "_trainable_variables", []) + getattr(layer, "_non_trainable_variables", []):
            if "float" in str(v.dtype):
                value = keras.ops.convert_to_numpy(v.value)
                if not np.all(np.isfinite(value)):
                    raise ModelError(
                        f"Expected finite weights. Received NaN or inf in {v.path or v.name!r} of layer {layer.name!r} "
                        f"({int(np.size(value) - np.count_nonzero(np.isfinite(value)))} value(s)). The model is "
                        "broken in float32 already (a diverged run, a bad checkpoint); no precision can fix it."
                    )


def check_inputs_fit(model: Any, data: EvalData, *, what: str = "the evaluation data") -> None:
    """Refuse inputs whose count or shape cannot fit the model's inputs, with the data's own shape."""
    import keras

    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    xs = keras.tree.flatten(data.x_sample(1))
    if len(xs) != len(inputs):
        raise DataError(f"Expected {len(inputs)} input array(s) for the model. Received {len(xs)} in {what}.")
    for array, spec in zip(xs, inputs, strict=True):
        want, got = tuple(spec.shape[1:]), tuple(array.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise DataError(
                f"Expected inputs of shape (batch, {', '.join('?' if w is None else str(w) for w in want)}) "
                f"for input {spec.name!r}. Received x of shape {(data.n, *array.shape[1:])} in {what}. Reshape the "
                "data to fit the model."
            )


def _check_outputs(engine: Any, data: EvalData, outputs: list) -> None:
    """Refuse non-finite float32 outputs, naming the first layer whose output goes non-finite."""
    for (x, _), out in zip(data.batches(), outputs, strict=True):
        if all(np.all(np.isfinite(a)) for a in _flat(out)):
            continue
        culprit = _first_nonfinite_layer(engine, x)
        raise ModelError(
            "Expected finite float32 outputs on the evaluation data. Received NaN or inf from the float32 model "
            f"itself{f', first at layer {culprit!r}' if culprit else ''}: the model is broken before any 16-bit "
            "question arises. Check that layer's weights and inputs."
        )


def _first_nonfinite_layer(engine: Any, x: Any) -> str | None:
    if not hasattr(engine, "run"):
        return None
    from keras import ops

    found: list[str] = []

    def hook(path, op, call, args, kwargs, out):
        if not found and hasattr(out, "dtype") and "float" in str(out.dtype):
            if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(out)))):
                found.append(path)
        return None

    engine.run(x, None, hook)
    return found[0] if found else None
