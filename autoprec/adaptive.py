"""Adaptive precision during training: a Keras callback that moves layers between 16-bit and float32.

A policy tuned before training is a snapshot; activations and gradients drift
as weights grow. :class:`AdaptivePrecision` starts from a policy and watches
``model.fit`` cheaply. Every step it reads the loss Keras has already logged
(a Python float by then): a loss that turns non-finite triggers a check at
once. Every ``check_every`` steps it checks: it reads the LossScaleOptimizer's
scale and the steps it skipped (``optimizer.iterations`` counts applied steps
only), and samples the range statistics of every layer's activations and
gradients on one batch of ``data``, with the code ``profile`` uses
(:mod:`autoprec.stats`). That pass is traced once, in float32 whatever the
layers' policies (they are switched to float32 while it traces), so it sees
what a 16-bit layer *would* face and a policy change never retraces it.

Rules (thresholds in :class:`AdaptiveOptions`). A 16-bit layer reads its inputs
and writes its outputs in 16-bit, forward and backward, so it is judged on its
own output and its producers' outputs. Gradients are judged at the loss scale of
the last check without skipped steps, capped at the optimizer's initial scale.

- **Promote** a 16-bit layer when an activation there reaches ``promote_at``
  (0.5) of the format's largest finite value, before it overflows; when more than
  ``flush_share`` (1%) of the nonzero activations or gradients flush to zero; or,
  after ``skip_limit`` (3) skipped steps, when its gradients overflow even at the
  lowered scale. Skipped steps or a non-finite loss that no statistic explains
  return the layers on probation (``RETRY_FAILED``), else the 16-bit layer
  closest to the limits.
- **Demote** (``demote=True``) a float32 layer once its activations stayed under
  ``demote_at`` (1/16) of the largest finite value, with no flush and no
  overflowing gradient, for ``patience`` (3) checks in a row. It is then on
  probation for ``patience`` checks, and any promotion starts a ``cooldown``
  (10 checks) before it is tried again.

A change sets the policies in place and rebuilds the train function
(``make_train_function(force=True)``): the next step runs the new policy from the
same weights and optimizer state. It costs one retrace of the train step.

**Loss scaling.** Keras cannot swap the optimizer in the middle of ``fit``
without changing the object ``fit`` steps and ``model.save`` writes, so the
callback never wraps or unwraps one: when float16 layers may appear (the start
policy has some, or ``demote=True`` towards float16) the model must be compiled
with a ``keras.optimizers.LossScaleOptimizer``, else ``on_train_begin`` raises
:class:`~autoprec.errors.ArgumentError`. A policy left without float16 layers
keeps it: with float32 gradients it never skips, so it is harmless. The callback
only sets its scale: back to the last healthy value after a promotion that
followed skipped steps or a non-finite loss (the promoted layer caused the
halvings), and down to the initial scale when float16 layers return (it keeps
doubling while no layer needs it).

**Cost.** A check is one forward/backward pass on one batch, so the overhead
is about a step's time every ``check_every`` (100) steps, 1-4% measured by
``benchmarks/bench_adaptive.py``; between checks the callback compares a float.

**Subclassed models** have no graph to sample per-layer statistics from, and
on JAX and PyTorch the statistics pass is not sampled (a ``jax.jit`` trace would
keep the weights of its first call; TensorFlow is the tested backend). There
the policies are still set in place, but the callback acts on the training
signals alone: a non-finite loss or ``skip_limit`` skipped steps return every
16-bit layer to float32, and ``demote=True`` is refused.

>>> import numpy as np, keras, autoprec
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"), keras.layers.Dense(1, name="out")])
>>> model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), "mse")
>>> x, y = np.ones((64, 4), "float32"), np.ones((64, 1), "float32")
>>> callback = autoprec.AdaptivePrecision({"h": "mixed_float16"}, data=(x, y), check_every=2, verbose=0)
>>> _ = model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
>>> callback.policy["h"], len(callback.history)
('mixed_float16', 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import numpy as np

from autoprec import backends, stats
from autoprec.apply import set_policies_in_place
from autoprec.decisions import FLUSH_SHARE
from autoprec.errors import ArgumentError, UnsupportedModelError, check_int, describe
from autoprec.formats import FLOAT32, LOW_PRECISION, MIXED_FLOAT16, Format, resolve_target
from autoprec.formats import get as get_format
from autoprec.graph import SUBCLASSED, ModelGraph, build_graph, keyed_layers
from autoprec.policy import PrecisionPolicy

logger = logging.getLogger("autoprec")

# Files AdaptivePrecision.save writes (autoprec.report spells the CSV names too, so that
# reading a report does not import Keras; a test holds the two spellings together).
HISTORY_FILE = "adaptive_history.csv"
CHECKS_FILE = "adaptive_checks.csv"
POLICY_FILE = "adaptive_policy.json"

EVENT_COLUMNS = ("step", "epoch", "layer", "direction", "before", "after", "reason", "node", "statistic", "value",
                 "threshold", "why")
CHECK_COLUMNS = ("step", "epoch", "trigger", "loss", "sample_loss", "loss_scale", "skipped_steps", "layers_16bit",
                 "seconds")
PROMOTE, DEMOTE = "promote", "demote"
_CHUNK = 16  # tensors whose statistics share one flat vector (as in profile)


class Change(enum.StrEnum):
    """Why the callback moved a layer: the ``reason`` column of :attr:`AdaptivePrecision.history`.

    >>> Change.OVERFLOW == "OVERFLOW"
    True
    """

    OVERFLOW = "OVERFLOW"  # an activation at the layer reaches promote_at of the largest finite value
    UNDERFLOW = "UNDERFLOW"  # over flush_share of the nonzero activations at the layer flush to zero
    GRAD_UNDERFLOW = "GRAD_UNDERFLOW"  # over flush_share of its gradients flush at the loss scale
    GRAD_OVERFLOW = "GRAD_OVERFLOW"  # skipped steps, and its gradients overflow even at the lowered scale
    SKIPPED_STEPS = "SKIPPED_STEPS"  # skipped steps no statistic explains: the layer closest to the limits
    NONFINITE_LOSS = "NONFINITE_LOSS"  # a non-finite loss no statistic explains: the layer closest to the limits
    RETRY_FAILED = "RETRY_FAILED"  # trouble while a demoted layer was on probation
    SAFE_RANGE = "SAFE_RANGE"  # demoted: its statistics stayed well inside the format's range


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
    """The callback's cadence and thresholds, checked on construction.

    Example:
        >>> AdaptiveOptions(check_every=50).promote_at
        0.5
        >>> AdaptiveOptions(check_every=0)
        Traceback (most recent call last):
        ...
        autoprec.errors.ArgumentError: Expected check_every to be an integer >= 1. Received: check_every=0 (of type int).
    """

    check_every: int = 100
    batch_size: int = 32
    promote_at: float = 0.5
    demote_at: float = 1 / 16
    flush_share: float = FLUSH_SHARE
    patience: int = 3
    cooldown: int = 10
    skip_limit: int = 3

    def __post_init__(self) -> None:
        for name, minimum in (("check_every", 1), ("batch_size", 1), ("patience", 1), ("cooldown", 0), ("skip_limit", 1)):
            check_int(name, getattr(self, name), minimum)
        _check_share("promote_at", self.promote_at, 0.0, 1.0, closed="high")
        _check_share("demote_at", self.demote_at, 0.0, self.promote_at, what=" (below promote_at)")
        _check_share("flush_share", self.flush_share, 0.0, 1.0, closed="low")


def _check_share(name: str, value: object, low: float, high: float, *, closed: str = "", what: str = "") -> None:
    """Raise unless ``value`` is a number between ``low`` and ``high``; ``closed`` names the ends included."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    above = number and (low <= value if "low" in closed else low < value)
    below = number and (value <= high if "high" in closed else value < high)
    if not (above and below):
        span = f"{'[' if 'low' in closed else '('}{low:g}, {high:g}{']' if 'high' in closed else ')'}"
        raise ArgumentError(f"Expected {name} to be a number in {span}{what}. Received: {name}={describe(value)}.")


@dataclasses.dataclass(frozen=True)
class Event:
    """One change of one layer's policy, with the statistic that caused it.

    >>> Event(step=98, epoch=6, layer="d2", direction="promote", before="mixed_float16", after="float32",
    ...       reason="OVERFLOW", node="d2", statistic="act_absmax", value=7.2e4, threshold=32752.0).why
    'mixed_float16 -> float32: act_absmax reached 7.2e+04 >= 3.28e+04'
    """

    step: int
    epoch: int
    layer: str
    direction: str
    before: str
    after: str
    reason: str
    node: str = ""
    statistic: str = ""
    value: float = math.nan
    threshold: float = math.nan

    @property
    def why(self) -> str:
        """The change in words."""
        where = "" if self.node in ("", self.layer) else f" at its input from `{self.node}`"
        fact = {
            Change.OVERFLOW: f"{self.statistic}{where} reached {self.value:.3g} >= {self.threshold:.3g}",
            Change.UNDERFLOW: f"{self.value:.2%} of the nonzero activations{where} flush to zero (> {self.threshold:.2%})",
            Change.GRAD_UNDERFLOW: f"{self.value:.2%} of the gradients{where} flush at the loss scale (> {self.threshold:.2%})",
            Change.GRAD_OVERFLOW: f"after skipped steps, its gradients{where} reach {self.value:.3g} at the lowered loss scale",
            Change.SKIPPED_STEPS: f"{self.value:g} skipped steps, and it is the 16-bit layer closest to the limits",
            Change.NONFINITE_LOSS: "the loss turned non-finite, and it is the 16-bit layer closest to the limits",
            Change.RETRY_FAILED: "training misbehaved while it was on probation in 16-bit",
            Change.SAFE_RANGE: f"{self.statistic}{where} stayed at {self.value:.3g} <= {self.threshold:.3g}",
        }[Change(self.reason)]
        return f"{self.before} -> {self.after}: {fact}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "why": self.why}


# ---------------------------------------------------------------------------
# The rules: plain Python over per-node statistics (tested with hand-made rows)


class Judge:
    """Decide promotions and demotions from one check's statistics; keeps patience, probation and cool-down.

    Args:
        producers: ``{layer path: its producers' paths}`` for every layer the callback may move.
        assignment: ``{layer path: policy name}``, the current policy of those layers.
        fmt: the 16-bit format layers are demoted to and judged against.
        options: the thresholds.
        demote: whether float32 layers may be tried in 16-bit.

    Example:
        >>> from autoprec.formats import get
        >>> judge = Judge({"d": ()}, {"d": "mixed_float16"}, get("mixed_float16"), AdaptiveOptions())
        >>> [e.reason for e in judge.decide({"d": {"act_absmax": 4e4}}, step=10)]
        ['OVERFLOW']
        >>> judge.assignment
        {'d': 'float32'}
    """

    def __init__(self, producers: Mapping[str, tuple[str, ...]], assignment: Mapping[str, str], fmt: Format,
                 options: AdaptiveOptions, *, demote: bool = False) -> None:
        self.producers, self.assignment, self.fmt, self.options = dict(producers), dict(assignment), fmt, options
        self.demote = demote
        self.checks = 0
        self._safe: dict[str, int] = {}
        self._cool: dict[str, int] = {}  # path -> last check of its cool-down
        self._probation: dict[str, int] = {}  # path -> last check of its probation

    def decide(self, rows: Mapping[str, Mapping[str, float]], *, step: int, epoch: int = 0, skipped: int = 0,
               nonfinite_loss: bool = False, scale_ratio: float = 1.0) -> list[Event]:
        """The changes this check calls for (already applied to :attr:`assignment`).

        Args:
            rows: statistics columns per node path (``act_absmax``, ``grad_flush``...); may be empty.
            step, epoch: where training is, for the events.
            skipped: steps the LossScaleOptimizer skipped since the last check.
            nonfinite_loss: the logged loss turned non-finite.
            scale_ratio: the current loss scale over the one the gradient rows were taken at.
        """
        self.checks += 1
        trouble = nonfinite_loss or skipped >= self.options.skip_limit
        found = [self._hazard(p, rows, trouble, scale_ratio) for p in self._low()]
        changes = [(p, *h) for p, h in zip(self._low(), found) if h is not None]
        if trouble and not changes:
            changes = self._blame(rows, skipped, nonfinite_loss, scale_ratio)
        events = [self._event(p, FLOAT32, reason, node, stat, value, limit, step, epoch)
                  for p, reason, node, stat, value, limit in changes]
        for event in events:
            self._cool[event.layer] = self.checks + self.options.cooldown
            self._probation.pop(event.layer, None)
        if self.demote and not trouble and not events:
            events += self._demotions(rows, step, epoch)
        else:
            self._safe.clear()
        return events

    def _low(self) -> list[str]:
        return [p for p, name in self.assignment.items() if name in LOW_PRECISION]

    def _nodes(self, path: str, rows: Mapping[str, Mapping[str, float]]) -> list[tuple[str, Mapping[str, float]]]:
        return [(n, rows[n]) for n in (path, *self.producers.get(path, ())) if n in rows]

    def _hazard(self, path: str, rows: Mapping, trouble: bool, scale_ratio: float) -> tuple | None:
        """``(reason, node, statistic, value, threshold)`` of the first hazard at ``path``, or None."""
        top, share = self.options.promote_at * self.fmt.max_finite, self.options.flush_share
        for node, r in self._nodes(path, rows):
            if _num(r, "act_absmax") >= top:
                return Change.OVERFLOW, node, "act_absmax", _num(r, "act_absmax"), top
            if _num(r, "act_flush") > share:
                return Change.UNDERFLOW, node, "act_flush", _num(r, "act_flush"), share
            if _num(r, "grad_flush") > share:
                return Change.GRAD_UNDERFLOW, node, "grad_flush", _num(r, "grad_flush"), share
            if trouble and _num(r, "grad_absmax") * scale_ratio >= self.fmt.max_finite:
                return Change.GRAD_OVERFLOW, node, "grad_absmax", _num(r, "grad_absmax") * scale_ratio, self.fmt.max_finite
        return None

    def _blame(self, rows: Mapping, skipped: int, nonfinite_loss: bool, scale_ratio: float) -> list[tuple]:
        """Trouble no statistic explains: the layers on probation, else the 16-bit layer closest to the limits."""
        reason = Change.NONFINITE_LOSS if nonfinite_loss else Change.SKIPPED_STEPS
        value = math.nan if nonfinite_loss else float(skipped)
        statistic = "loss" if nonfinite_loss else "skipped_steps"
        probation = [p for p, last in self._probation.items() if last >= self.checks and p in self._low()]
        if probation:
            return [(p, Change.RETRY_FAILED, p, statistic, value, math.nan) for p in probation]
        low = self._low()
        if not rows:  # no statistics (subclassed model): every 16-bit layer goes back
            return [(p, reason, p, statistic, value, math.nan) for p in low]

        def closeness(path: str) -> float:
            return max([max(_num(r, "act_absmax"), _num(r, "grad_absmax") * scale_ratio) for _, r in self._nodes(path, rows)]
                       or [-1.0])

        return [(max(low, key=closeness), reason, "", statistic, value, math.nan)] if low else []

    def _demotions(self, rows: Mapping, step: int, epoch: int) -> list[Event]:
        limit = self.options.demote_at * self.fmt.max_finite
        events = []
        for path, name in self.assignment.items():
            if name != FLOAT32 or self._cool.get(path, 0) >= self.checks:
                continue
            nodes = self._nodes(path, rows)
            safe = bool(nodes) and all(self._safe_row(r, limit) for _, r in nodes)
            self._safe[path] = self._safe.get(path, 0) + 1 if safe else 0
            if self._safe[path] >= self.options.patience:
                node, r = max(nodes, key=lambda nr: _num(nr[1], "act_absmax"))
                events.append(self._event(path, self.fmt.name, Change.SAFE_RANGE, node, "act_absmax",
                                          _num(r, "act_absmax"), limit, step, epoch))
                self._safe[path] = 0
                self._probation[path] = self.checks + self.options.patience
        return events

    def _safe_row(self, r: Mapping[str, float], limit: float) -> bool:
        share = self.options.flush_share
        return (_num(r, "act_absmax") <= limit and _num(r, "act_flush") <= share and _num(r, "grad_flush") <= share
                and _num(r, "grad_absmax") < self.fmt.max_finite
                and _num(r, "act_nonfinite") == 0 and _num(r, "grad_nonfinite") == 0)

    def _event(self, path: str, after: str, reason: str, node: str, statistic: str, value: float, threshold: float,
               step: int, epoch: int) -> Event:
        before = self.assignment[path]
        self.assignment[path] = after
        return Event(step=step, epoch=epoch, layer=path, direction=PROMOTE if after == FLOAT32 else DEMOTE, before=before,
                     after=after, reason=str(reason), node=node, statistic=statistic, value=float(value),
                     threshold=float(threshold))


def _num(row: Mapping[str, float], key: str) -> float:
    value = row.get(key, 0.0)
    return 0.0 if value is None or value != value else float(value)


# ---------------------------------------------------------------------------
# The sampled statistics pass


@contextlib.contextmanager
def float32_policies(model: Any) -> Iterator[None]:
    """Inside the block every 16-bit layer of ``model`` computes in float32; the policies come back after.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d", dtype="mixed_bfloat16")])
    >>> with float32_policies(m):
    ...     inside = m.get_layer("d").compute_dtype
    >>> inside, m.get_layer("d").compute_dtype
    ('float32', 'bfloat16')
    """
    saved = {key: layer.dtype_policy.name for key, layer in keyed_layers(model).items()}
    set_policies_in_place(model, {key: FLOAT32 for key, name in saved.items() if name in LOW_PRECISION})
    try:
        yield
    finally:
        set_policies_in_place(model, saved)


class Sampler:
    """One traced float32 forward/backward pass on a batch: statistics of every node's activations and gradients.

    The layers are switched to float32 while the pass is traced (see
    :func:`float32_policies`), so the trace does not depend on the policies
    training runs with and is made once. The loss scale is a tensor argument
    (gradients are multiplied by it before :func:`autoprec.stats.table`), so a
    new scale does not retrace either.

    Example:
        >>> sampler = Sampler(model, build_graph(model), get_format("mixed_float16"), loss)  # doctest: +SKIP
        >>> rows, loss_value = sampler(x, y, 2.0**15)                                          # doctest: +SKIP
    """

    def __init__(self, model: Any, graph: ModelGraph, fmt: Format, loss: Any) -> None:
        from autoprec.engine import SimEngine

        with float32_policies(model):
            self._engine = SimEngine(model, graph, formats=(fmt.name,))
        self._model, self._fmt, self._loss = model, fmt, loss
        self.names: list[str] = []
        self.traces = 0
        self._fn = backends.compile_function(self._step)

    def _step(self, x: Any, y: Any, scale: Any) -> tuple[Any, Any]:
        from keras import ops

        self.traces += 1  # runs only while tracing
        taken: list[tuple[str, Any]] = []

        def forward(inputs: Any, watch: Any) -> Any:
            taken.clear()  # a backend may call forward more than once; keep the last call's

            def hook(path, op, call, args, kwargs, out):
                # Only a node with one floating output is watched (as in profile).
                if isinstance(out, (list, tuple, dict)) or "float" not in str(getattr(out, "dtype", "")):
                    return None
                taken.append((path, out))
                return watch(out)

            return self._engine.run(inputs, None, hook)

        with float32_policies(self._model):
            _, loss, grads, _ = backends.gradient_pass(forward, self._loss, x, y, [])
        chunks = []
        for i in range(0, len(taken), _CHUNK):
            (act,), _, _ = stats.table([a for _, a in taken[i:i + _CHUNK]], self._fmt)
            (grad,), _, _ = stats.table([g * ops.cast(scale, g.dtype) for g in grads[i:i + _CHUNK]], self._fmt)
            chunks.append(ops.concatenate([act, grad], axis=1))
        self.names = [p for p, _ in taken]
        return ops.concatenate(chunks, axis=0), loss

    def __call__(self, x: Any, y: Any, scale: float) -> tuple[dict[str, dict[str, float]], float]:
        """Statistics columns per node path (a shared layer's calls merged), and the batch loss."""
        rows, loss = self._fn(x, y, np.float32(scale))
        merged: dict[str, np.ndarray] = {}
        for path, row in zip(self.names, np.asarray(keras.ops.convert_to_numpy(rows), np.float64)):
            merged[path] = stats.merge(merged.get(path), row)
        w = stats.WIDTH
        out = {p: {**stats.columns(v[:w], "act"), **stats.columns(v[w:], "grad")} for p, v in merged.items()}
        return out, float(keras.ops.convert_to_numpy(loss))


# ---------------------------------------------------------------------------
# One training run under the callback


def _start_policy(policy: Any, model: Any, graph: ModelGraph) -> dict[str, str]:
    """``{eligible path: policy}`` from the callback's ``policy`` argument, or the model's current policies."""
    if policy is None:
        layers = keyed_layers(model)
        return {i.path: layers[i.path].dtype_policy.name for i in graph.eligible}
    names = policy.for_graph(graph)
    return {i.path: names.get(i.path, FLOAT32) for i in graph.eligible}


def _pick_target(target: Any, policy: PrecisionPolicy | None, start: Mapping[str, str]) -> str:
    """The 16-bit format: ``target``, else the policy's, else the one the start policy uses, else float16."""
    used = sorted({name for name in start.values() if name in LOW_PRECISION})
    if target is None:
        target = (policy.target if policy is not None else None) or (used[0] if used else MIXED_FLOAT16)
    target = resolve_target(target)[0]
    if any(name != target for name in used):
        raise ArgumentError(f"Expected the starting policy's 16-bit layers to use target={target!r}. Received layers in "
                            f"{used}. Pass target= to match them, or start from a policy with one 16-bit format.")
    return target


def _loss_scale_optimizer(model: Any) -> Any:
    optimizer = getattr(model, "optimizer", None)
    return optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else None


def _require_loss_scale(model: Any, start: Mapping[str, str], target: str, demote: bool) -> None:
    """Refuse to train float16 layers without a LossScaleOptimizer (Keras cannot add one mid-fit)."""
    starts = any(name == MIXED_FLOAT16 for name in start.values())
    if not (starts or (demote and target == MIXED_FLOAT16)) or _loss_scale_optimizer(model) is not None:
        return
    why = "the starting policy has float16 layers" if starts else "demote=True may move layers to float16"
    raise ArgumentError(
        f"Expected the model to be compiled with keras.optimizers.LossScaleOptimizer, because {why}. Received: "
        f"optimizer={describe(getattr(model, 'optimizer', None))}. float16 gradients underflow without a loss scale, "
        "and an optimizer cannot be wrapped in the middle of fit without changing the object fit steps and model.save "
        "writes. Compile with `keras.optimizers.LossScaleOptimizer(optimizer)` (autoprec.apply_policy does it); it is "
        "harmless while every layer is float32."
    )


class _Run:
    """The state of training under the callback: graph, rules, sampler, data, loss scale and records."""

    def __init__(self, model: Any, policy: PrecisionPolicy | None, *, data: Any, target: Any, demote: bool,
                 options: AdaptiveOptions, keep_float32: tuple[str, ...]) -> None:
        from autoprec.data import EvalData

        self.model, self.options = model, options
        self.data = EvalData.get(data, batch_size=options.batch_size, model=model, what="data")
        self._batches = self._cycle()
        x, y = next(self._batches)
        self.graph = build_graph(model, keep_float32=keep_float32, sample=x)
        start = _start_policy(policy, model, self.graph)
        self.fmt = get_format(_pick_target(target, policy, start))
        # A tf.function reads variables by handle at every call; a jax.jit trace would keep the weights of
        # its first call, so on JAX (and PyTorch) the callback acts on the training signals alone.
        has_stats = self.graph.kind != SUBCLASSED and backends.name() == "tensorflow"
        if demote and not has_stats:
            raise UnsupportedModelError(
                f"Expected a Functional or Sequential model on TensorFlow for demote=True. Received a "
                f"{self.graph.kind} model on {backends.name()}: demotion needs per-layer statistics, which need a graph "
                "to walk and TensorFlow's traced pass. Pass demote=False (promotion on a non-finite loss or skipped "
                "steps still works).")
        _require_loss_scale(model, start, self.fmt.name, demote)
        producers = {i.path: i.producers for i in self.graph.eligible}
        self.judge = Judge(producers, start, self.fmt, options, demote=demote)
        self.sampler = Sampler(model, self.graph, self.fmt, self._loss(x, y)) if has_stats else None
        self.events: list[Event] = []
        self.checks: list[dict[str, Any]] = []
        self.step = self.epoch = self.last_check = 0
        self.mark = 0  # the step at which `iterations` was read: skipped steps are counted from there
        self.apply()
        optimizer = _loss_scale_optimizer(model)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)  # its scale variable exists from the first step on anyway
        self.healthy_scale = self.scale() or 1.0
        self.iterations = self._iterations()

    def _cycle(self) -> Iterator[tuple[Any, Any]]:
        """The batches of ``data`` over and over; smaller ones only when no batch is full.

        Gradients at layer outputs scale with one over the batch size, so a
        short last batch would judge them at another scale.
        """
        any_size = False
        while True:
            full = 0
            for x, y in self.data.batches():
                if any_size or len(keras.tree.flatten(y)[0]) == self.options.batch_size:
                    full += 1
                    yield x, y
            any_size = any_size or full == 0

    def _loss(self, x: Any, y: Any) -> Any:
        from autoprec.engine import to_numpy
        from autoprec.metrics import Metric, resolve_loss

        # The compiled loss, as profile differentiates it; the metric only matters for a model compiled without one.
        y_pred = to_numpy(self.model(x, training=False))
        return resolve_loss(self.model, Metric("loss", False, lambda *_: math.nan), y, y_pred)

    # Loss scale -------------------------------------------------------------
    def scale(self) -> float | None:
        optimizer = _loss_scale_optimizer(self.model)
        return None if optimizer is None else float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))

    def _set_scale(self, value: float) -> None:
        _loss_scale_optimizer(self.model).dynamic_scale.assign(value)

    def _iterations(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0

    # Policies ---------------------------------------------------------------
    @property
    def policy(self) -> PrecisionPolicy:
        return PrecisionPolicy(self.graph.resolve(self.judge.assignment), target=self.fmt.name,
                               layers=self.graph.layer_facts())

    def apply(self) -> bool:
        """Set the current assignment on the model's layers; rebuild its functions when anything changed."""
        changed = set_policies_in_place(self.model, self.graph.resolve(self.judge.assignment))
        if changed:
            self.model.make_train_function(force=True)
            self.model.test_function = self.model.predict_function = None  # rebuilt on their next use
        return changed

    def layers_16bit(self) -> int:
        return sum(name in LOW_PRECISION for name in self.judge.assignment.values())

    # A check ----------------------------------------------------------------
    def check(self, *, trigger: str, loss: float | None) -> list[Event]:
        """Read the loss scale and skipped steps, sample statistics, and apply what the rules decide."""
        started = time.perf_counter()
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:  # JAX keeps the variables in a state tuple during an epoch
            sync()
        scale, iterations = self.scale(), self._iterations()
        skipped = max(0, (self.step - self.mark) - (iterations - self.iterations)) if scale is not None else 0
        nonfinite = trigger == "nonfinite_loss"
        if scale is not None and skipped == 0 and not nonfinite:
            self.healthy_scale = scale
        # Gradients are judged at the healthy scale, capped at the initial one: the scale keeps doubling
        # while no layer is float16, and is set back to the initial one when float16 layers return.
        judged = min(self.healthy_scale, _loss_scale_optimizer(self.model).initial_scale) if scale else 1.0
        rows, sample_loss = ({}, math.nan)
        if self.sampler is not None:
            rows, sample_loss = self.sampler(*next(self._batches), judged)
        ratio = min(1.0, scale / judged) if scale else 1.0
        had_float16 = any(n == MIXED_FLOAT16 for n in self.judge.assignment.values())
        events = self.judge.decide(rows, step=self.step, epoch=self.epoch, skipped=skipped, nonfinite_loss=nonfinite,
                                   scale_ratio=ratio)
        if events:
            self._after_change(events, scale, skipped=skipped > 0, nonfinite=nonfinite, had_float16=had_float16)
        elif nonfinite:
            logger.warning("autoprec: the loss turned non-finite at step %d and no 16-bit layer is left to blame: the "
                           "model diverges in float32 too (lower the learning rate, or check the data).", self.step)
        self.last_check, self.mark, self.iterations = self.step, self.step, iterations  # a change steps no optimizer
        self.record(trigger, loss, skipped=skipped, sample_loss=sample_loss, seconds=time.perf_counter() - started)
        return events

    def record(self, trigger: str, loss: float | None, *, skipped: int | None = None, sample_loss: float = math.nan,
               seconds: float = 0.0) -> None:
        """One row of :attr:`AdaptivePrecision.checks`: a check, or the loss and scale at an epoch's end."""
        self.checks.append({"step": self.step, "epoch": self.epoch, "trigger": trigger,
                            "loss": math.nan if loss is None else loss, "sample_loss": sample_loss,
                            "loss_scale": self.scale(), "skipped_steps": skipped, "layers_16bit": self.layers_16bit(),
                            "seconds": seconds})

    def _after_change(self, events: list[Event], scale: float | None, *, skipped: bool, nonfinite: bool,
                      had_float16: bool) -> None:
        self.apply()
        self.events.extend(events)
        if scale is not None:
            has_float16 = any(n == MIXED_FLOAT16 for n in self.judge.assignment.values())
            optimizer = _loss_scale_optimizer(self.model)
            if (skipped or nonfinite) and scale < self.healthy_scale:
                self._set_scale(self.healthy_scale)  # the halvings were the promoted layers' doing
            elif has_float16 and not had_float16 and scale > optimizer.initial_scale:
                self._set_scale(optimizer.initial_scale)  # it grew while no layer needed it
                self.healthy_scale = optimizer.initial_scale
        if nonfinite:
            # Keras logs the loss averaged since the epoch began: restart the averages at the fix,
            # or a non-finite step would hide every later one until the epoch ends.
            self.model.reset_metrics()


# ---------------------------------------------------------------------------
# The callback


class AdaptivePrecision(keras.callbacks.Callback):
    """Move layers between 16-bit and float32 while ``model.fit`` trains (see the module docstring for the rules).

    Args:
        policy: the policy to start from: a :class:`~autoprec.PrecisionPolicy`, a
            :class:`~autoprec.TuneResult`, anything ``PrecisionPolicy.get`` accepts,
            or None for the model's current layer policies.
        data: training data to sample statistics from, ``(x, y)`` arrays or a
            dataset (Keras does not show a callback the batches ``fit`` trains on).
        target: the 16-bit policy layers are demoted to and judged against
            (``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"auto"``); default:
            the policy's, else the one its layers use, else float16.
        demote: try float32 layers in 16-bit when their statistics allow.
        keep_float32: layer paths or regexes never moved to 16-bit.
        verbose: 1 prints a line per change, 0 only logs it.
        **options: the cadence and thresholds, see :class:`AdaptiveOptions`
            (``check_every=100``, ``batch_size=32``, ``promote_at=0.5``, ...).

    The events also go to the Keras logs: ``autoprec_changes`` at the batch
    of a change, and ``autoprec_changes``, ``autoprec_16bit_layers`` and
    ``autoprec_loss_scale`` at every epoch's end, so ``History``, ``CSVLogger``
    and ``TensorBoard`` record them when listed after this callback.

    Attributes:
        history: the changes, one row per event (``EVENT_COLUMNS``).
        checks: one row per check: loss, loss scale, skipped steps, seconds spent.
        policy: the current :class:`~autoprec.PrecisionPolicy`.

    Example:
        >>> callback = AdaptivePrecision(result, data=(x_train, y_train), demote=True)  # doctest: +SKIP
        >>> model.fit(x_train, y_train, epochs=10, callbacks=[callback])              # doctest: +SKIP
        >>> callback.history[["step", "layer", "direction", "reason"]]               # doctest: +SKIP
        >>> callback.save("runs/adaptive")                                           # doctest: +SKIP
    """

    def __init__(self, policy: Any = None, *, data: Any = None, target: str | None = None, demote: bool = False,
                 keep_float32: Any = (), verbose: int = 1, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(AdaptiveOptions)})
        if unknown:
            raise ArgumentError(f"Expected options among {[f.name for f in dataclasses.fields(AdaptiveOptions)]}. "
                                f"Received: {unknown}.")
        self.options = AdaptiveOptions(**options)
        self._policy = _policy_argument(policy)
        if data is None:
            raise ArgumentError("Expected data=(x, y) (or a dataset) of training samples to take statistics from. "
                                "Received: data=None. Keras does not show a callback the batches fit trains on; "
                                "pass the training arrays or a few batches of them.")
        if target is not None and target not in (*LOW_PRECISION, "auto"):
            raise ArgumentError(f"Expected target to be one of {[*LOW_PRECISION, 'auto']} or None. "
                                f"Received: target={describe(target)}.")
        if not isinstance(demote, bool):
            raise ArgumentError(f"Expected demote to be True or False. Received: demote={describe(demote)}.")
        if verbose not in (0, 1) or isinstance(verbose, float):
            raise ArgumentError(f"Expected verbose to be 0 or 1. Received: verbose={describe(verbose)}.")
        if isinstance(keep_float32, str):
            keep_float32 = (keep_float32,)
        if not isinstance(keep_float32, (list, tuple)) or not all(isinstance(k, str) for k in keep_float32):
            raise ArgumentError(f"Expected keep_float32 to be a list of layer paths or regexes. "
                                f"Received: keep_float32={describe(keep_float32)}.")
        self._keep = tuple(keep_float32)
        self._data, self._target, self._demote, self._verbose = data, target, demote, verbose
        self._run: _Run | None = None
        self._epoch_start, self._nonfinite = 0, False

    # Results ----------------------------------------------------------------
    @property
    def policy(self) -> PrecisionPolicy | None:
        """The current policy (None before training when it is read from the model)."""
        return self._run.policy if self._run is not None else self._policy

    @property
    def history(self):
        """Every change so far as a DataFrame: step, layer, direction, before, after, reason, statistic, why."""
        import pandas as pd

        return pd.DataFrame([e.to_dict() for e in self._run.events] if self._run else [], columns=list(EVENT_COLUMNS))

    @property
    def checks(self):
        """One row per check and per epoch end (``trigger``): logged and sampled loss, loss scale, skipped steps, seconds."""
        import pandas as pd

        return pd.DataFrame(self._run.checks if self._run else [], columns=list(CHECK_COLUMNS))

    def save(self, directory: str | os.PathLike, *, report: bool = True) -> list[str]:
        """Write the policy (``adaptive_policy.json``), the history and the checks, and the report.

        Other files in ``directory`` (a saved tune result) are kept; the report then shows both.

        Raises:
            OutputError: the directory cannot be written.

        Example:
            >>> callback.save("runs/adaptive")  # doctest: +SKIP
        """
        from autoprec.files import check_output_directory, write_text_atomic

        if self._run is None:
            raise ArgumentError("Expected a callback that has trained. Received one before fit; call model.fit first.")
        folder = check_output_directory(directory)
        os.makedirs(folder, exist_ok=True)
        self.policy.save(os.path.join(folder, POLICY_FILE))
        for name, frame in ((HISTORY_FILE, self.history), (CHECKS_FILE, self.checks)):
            write_text_atomic(os.path.join(folder, name), frame.to_csv(index=False), what="adaptive history")
        paths = [os.path.join(folder, n) for n in (POLICY_FILE, HISTORY_FILE, CHECKS_FILE)]
        if report:
            from autoprec.report import write_report

            paths += write_report(folder)
        return paths

    # Keras hooks ------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._run is None or self._run.model is not self.model:
            self._run = _Run(self.model, self._policy, data=self._data, target=self._target, demote=self._demote,
                             options=self.options, keep_float32=self._keep)
        # Steps count on across fit calls, so checks keep their cadence; the optimizer may have
        # stepped in between (a fit without this callback), so its count is read again.
        self._run.mark, self._run.iterations = self._run.step, self._run._iterations()
        self._run.record("train_begin", None)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._run.epoch, self._epoch_start, self._nonfinite = epoch, self._run.step, False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        run = self._run
        run.step = self._epoch_start + batch + 1
        loss = (logs or {}).get("loss")
        loss = float(loss) if isinstance(loss, (int, float, np.floating)) else None
        trigger = None
        if loss is not None and not math.isfinite(loss) and not self._nonfinite:
            trigger, self._nonfinite = "nonfinite_loss", True
        elif run.step - run.last_check >= self.options.check_every:
            trigger = "scheduled"
        if trigger is None:
            return
        events = run.check(trigger=trigger, loss=loss)
        if events:
            if trigger == "nonfinite_loss":
                self._nonfinite = False  # the averages restarted: a later non-finite loss is news again
            self._report(events)
            if logs is not None:
                logs["autoprec_changes"] = float(len(events))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        run = self._run
        loss = (logs or {}).get("loss")
        run.record("epoch_end", float(loss) if isinstance(loss, (int, float, np.floating)) else None)
        if logs is None:
            return
        logs["autoprec_16bit_layers"] = float(run.layers_16bit())
        logs["autoprec_changes"] = float(sum(e.epoch == epoch for e in run.events))
        scale = run.scale()
        if scale is not None:
            logs["autoprec_loss_scale"] = scale

    def _report(self, events: list[Event]) -> None:
        for e in events:
            line = f"autoprec: step {e.step}: {e.direction} {e.layer!r} ({e.why})"
            logger.info(line)
            if self._verbose:
                print(line)


def _policy_argument(policy: Any) -> PrecisionPolicy | None:
    if policy is None:
        return None
    inner = getattr(policy, "policy", None)  # a TuneResult
    if isinstance(inner, PrecisionPolicy):
        return inner
    return PrecisionPolicy.get(policy)
