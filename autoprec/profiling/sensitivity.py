"""Per-layer sensitivity to 16-bit: :func:`profile` returns one DataFrame row per layer.

Three measures, cheapest first, over every layer that may carry a policy of
its own (weighted layers and weightless layers that compute, in one ranking):

- **Range statistics** for each node's output activations, the gradient at
  each output, and each weighted layer's weight gradients, as a training
  step on a batch of ``TRAIN_BATCH_SIZE`` (32) samples would see them: the largest
  magnitude, and the shares that would overflow the format, flush to zero or
  turn subnormal, unscaled and, for gradients, at the default loss scale;
  plus non-finite counts (see :mod:`autoprec.profiling.stats`).
- A **first-order score** from the same forward/backward pass: the sum over
  the data of ``(dL/dy * (round(y) - y))^2`` at each output ``y``, the
  squared change in loss that rounding ``y`` would cause to first order. It
  ranks all layers at once; it is infinite where ``y`` overflows.
- **Ablation by group testing**: the layers, ranked by the two measures
  above, are switched to 16-bit many at a time (every other layer stays
  float32). A group whose *harm* (what each sample lost, gains ignored, so
  that one member's gains cannot hide another's losses) is within
  ``tolerance`` is cleared at once; a group over it is split in two, down to
  single layers, whose exact drop alone is recorded. Many layers that are
  each slightly sensitive still show as harm in their group and are split
  down to where they sit. The layers the one pass already suspects are
  tested alone first.

Statistics stream over the data in micro-batches (``profile_batch_size``)
through one traced step and keep running aggregates only, so memory depends
on the micro-batch, not on the size of the data.

A weightless layer becomes a decision of its own (:func:`own_risk`) when it
shows a risk of its own: non-finite or overflowing outputs, more than 1%
of its outputs flushing to zero, an ablation drop over the tolerance alone,
or a first-order score ten times that of every neighbour it has. Otherwise
it joins its producers' decision, so the search stays small.

The SQNR column is the layer's *own* signal-to-quantisation-noise ratio:
the layer run with its inputs, weights and output rounded, against float32, in dB.

>>> frame = autoprec.profile(model, (x_val, y_val), target="mixed_float16")  # doctest: +SKIP
>>> frame[["path", "role", "kind", "metric_drop", "score"]].head()            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from autoprec import backends
from autoprec.data import PROFILE_BATCH_CAP, TRAIN_BATCH_SIZE
from autoprec.engine import SimEngine, call_rounded, round_to, round_with
from autoprec.errors import ArgumentError, describe
from autoprec.formats import DEFAULT_LOSS_SCALE, FLOAT32, MIXED_FLOAT16, Format
from autoprec.formats import get as get_format
from autoprec.graph import BLOCK, COMPUTE, MOVEMENT, OP, WEIGHTED, ModelGraph
from autoprec.metrics import resolve_loss
from autoprec.profiling import stats
from autoprec.progress import Progress
from autoprec.session import Session, auto_batch_size, open_session

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("autoprec")

METHODS = ("full", "fast", "ablation")
NONFINITE = stats.NONFINITE_OUTPUTS
RISK_SCORE_RATIO = 10.0  # a weightless layer whose score is 10x every neighbour's decides on its own
PROFILE_MEMORY = 256 << 20  # bytes of activations, gradients and rounding errors one micro-batch may hold
# Samples the range statistics and the score stream over. Ranges and flush shares are shares of elements, which
# settle on a few batches; what needs samples is an overflow that only some inputs cause: 256 samples see one that
# occurs on 1.2% of them with 95% probability (1 - 0.988^256), and one on 3% with 99.96%. Rarer ones that move
# the metric still show in the all-16-bit evaluation, the ablation and the verification, which read all the data.
STATS_SAMPLES = 256
# Where the all-16-bit check already settles the answer, the statistics only describe the ranges (the report, a
# fall-back's order): two training batches of samples where a sample's tape is small, fewer where it is large, down
# to SETTLED_SAMPLES_FLOOR. One statistics step on a 224x224 MobileNetV2 sample (its tape about 260 MB) cost 0.55 s
# here, 48 of model.predict's samples: 64 of them were 8 predict passes over 512 images.
SETTLED_TAPE_BYTES = 1 << 30
SETTLED_SAMPLES_FLOOR = 8
# Where the search must work, the gradients and the score (means over many elements) read as many of the sampled
# ones as hold this much tape; the activation peaks still read all of them, in a forward pass. On MobileNetV2 at
# 224x224 (260 MB of tape a sample) the statistics on 256 samples were 17.6 of tune's 42 predict passes; on 16,
# with the peaks on 256, about 6.
GRADIENT_TAPE_BYTES = 4 << 30


def profile(
    model: Any,
    data: Any,
    *,
    target: str = MIXED_FLOAT16,
    method: str = "full",
    metric: Any = None,
    higher_is_better: bool | None = None,
    batch_size: int | str = "auto",
    profile_batch_size: int | str = "auto",
    loss_scale: float = DEFAULT_LOSS_SCALE,
    stats_samples: int | None = STATS_SAMPLES,
    gradient_samples: int | str | None = "auto",
    tolerance: float | None = None,
    max_ablation_passes: int | None = None,
    budget: Any = None,
    verbose: int = 1,
    session: Session | None = None,
) -> pd.DataFrame:
    """Measure each layer's sensitivity to computing in ``target``.

    Args:
        model: a float32 Keras model (Functional, Sequential, nested or subclassed).
        data: evaluation data, ``(x, y)`` arrays, a ``tf.data.Dataset`` or a ``PyDataset``.
        target: ``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"auto"``.
        method: ``"full"`` (statistics, score and group-tested ablation),
            ``"fast"`` (statistics and score only), or ``"ablation"`` (no gradients).
        metric: a Keras metric name or instance, or a callable with ``higher_is_better``;
            default: the model's first compiled metric, else its loss.
        batch_size: evaluation batch; ``"auto"`` fits the activations of a batch in 256 MB.
        profile_batch_size: micro-batch of the gradient statistics; ``"auto"`` fits
            every layer's activations, gradients and rounding errors in 256 MB.
        loss_scale: the loss scale for the scaled gradient statistics.
        stats_samples: how many samples (seeded, at random) the statistics and
            the score read (default 256, see ``STATS_SAMPLES``); ``None`` reads
            all. The metric, the ablation and the budget always use all the data.
        gradient_samples: how many of those the gradients and the score read;
            ``"auto"`` (:func:`gradient_samples_for`: all of them, fewer where a
            sample's tape is large), ``None``: all of them. Where they are fewer,
            the activation peaks read all of them in a forward pass.
        tolerance: the largest group drop cleared without splitting; default 0
            for bounded metrics (accuracy) and 0.1% of the baseline otherwise.
        max_ablation_passes: cap on ablation passes (default: what full bisection may need, 2 per layer).
        budget: an accuracy budget (``"0.5%"``, a :class:`autoprec.Budget`): a layer
            tested alone stops being measured once it certainly breaks it (its
            ``metric_drop`` is then a certain lower bound, and ``ablation``
            ``"alone, stopped over the budget"``). Default: every layer
            tested alone is measured on all the data.
        verbose: 0 silences the progress bars.
        session: an open session (``tune`` passes its own).

    Returns:
        A DataFrame, one row per node, layers that may carry a policy first,
        most sensitive first; ``frame.attrs`` holds the baseline metric,
        metric name, target, and the passes and traces spent.

    Example:
        >>> frame = profile(model, (x, y), target="mixed_bfloat16", method="fast")  # doctest: +SKIP
    """
    budget = _checked(method, loss_scale, stats_samples, gradient_samples, budget)
    own_session = session is None
    if session is None:
        from autoprec.formats import resolve_target

        session = open_session(
            model,
            data,
            target=resolve_target(target)[0],
            metric=metric,
            higher_is_better=higher_is_better,
            batch_size=batch_size,
        )
    try:
        return _profile(
            session,
            method,
            loss_scale=loss_scale,
            profile_batch_size=profile_batch_size,
            stats_samples=stats_samples,
            gradient_samples=gradient_samples,
            tolerance=tolerance,
            max_ablation_passes=max_ablation_passes,
            budget=budget,
            verbose=verbose,
        )
    finally:
        if own_session:
            session.close()  # a subclassed model gets its own policies back


def _checked(method: str, loss_scale: Any, stats_samples: Any, gradient_samples: Any, budget: Any) -> Any:
    """Validate :func:`profile`'s options; return the budget as a :class:`autoprec.Budget` (or None)."""
    from autoprec.budget import Budget
    from autoprec.errors import check_choice, check_int

    check_choice("method", method, METHODS)
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not loss_scale >= 1:
        raise ArgumentError(f"Expected loss_scale to be a number >= 1. Received: loss_scale={describe(loss_scale)}.")
    if stats_samples is not None:
        check_int("stats_samples", stats_samples, 1)
    if gradient_samples is not None and gradient_samples != "auto":
        check_int("gradient_samples", gradient_samples, 1)
    return None if budget is None else Budget.get(budget)


def _profile(
    session: Session,
    method: str,
    *,
    loss_scale: float,
    profile_batch_size: Any,
    stats_samples: int | None,
    gradient_samples: int | str | None,
    tolerance: float | None,
    max_ablation_passes: int | None,
    budget: Any,
    verbose: int,
):
    import pandas as pd

    progress = Progress(verbose)
    fmt = get_format(session.target)
    rows = {info.path: _graph_row(info, session.graph.total_flops) for info in session.graph.layers}
    read = differentiated = None
    if method in ("full", "fast"):
        if isinstance(session.engine, SimEngine) and backends.name() in ("tensorflow", "jax"):
            read, differentiated = _sample_counts(session, stats_samples, gradient_samples)
            found = statistics(
                session, fmt, loss_scale=loss_scale, batch_size=profile_batch_size, samples=read,
                gradient_samples=differentiated, progress=progress,
            )  # fmt: skip
            for path, columns in found.items():
                rows[path].update(columns)
        else:
            logger.info("autoprec: range statistics need a graph and TensorFlow or JAX; only ablation is measured.")
    if method in ("full", "ablation"):
        tol = default_tolerance(session) if tolerance is None else float(tolerance)
        ranked, alone = prior_order(alone_prior(session.graph, rows))
        tested = ablation(
            session, ranked, tolerance=tol, max_passes=max_ablation_passes, alone=alone, budget=budget,
            progress=progress,
        )  # fmt: skip
        for path, result in tested.items():
            rows[path].update(result)
        for row in rows.values():  # the columns exist even when every layer was cleared with its group
            row.update({c: row.get(c, math.nan) for c in ("metric_drop", "output_error", NONFINITE, "group_drop")})
    frame = rank(pd.DataFrame(list(rows.values())))
    frame["kind"] = kinds(
        frame, session.graph, tolerance=default_tolerance(session) if tolerance is None else tolerance
    )
    frame.attrs.update(
        baseline_metric=session.baseline,
        metric_name=session.metric.name,
        higher_is_better=session.metric.higher_is_better,
        target=session.target,
        passes=session.passes,
        traces=session.engine.traces,
        engine=session.engine.kind,
        seconds=dict(progress.seconds),
        method=method,
        statistics_samples=read,
        gradient_samples=differentiated,
        samples=session.data.n,
    )
    return frame


def _sample_counts(session: Session, stats_samples: int | None, gradient_samples: int | str | None) -> tuple:
    """How many samples the statistics read, and how many of those the gradients read (see :func:`profile`)."""
    read = session.data.n if stats_samples is None else min(int(stats_samples), session.data.n)
    if gradient_samples == "auto":
        return read, gradient_samples_for(session.graph, read)
    return read, read if gradient_samples is None else min(int(gradient_samples), read)


def default_tolerance(session: Session) -> float:
    """0 for a bounded per-sample metric (any lost sample counts), else 0.1% of the baseline."""
    return 0.0 if session.metric.bounds is not None and session.metric.bounds[1] <= 1 else 1e-3 * abs(session.baseline)


def _graph_row(info: Any, total_flops: float) -> dict[str, Any]:
    return {
        "order": info.order,
        "path": info.path,
        "class": info.class_name,
        "role": info.role,
        "params": info.params,
        "flops": info.flops,
        "flops_share": info.flops / total_flops if total_flops else 0.0,
        "decision_unit": info.is_unit,
        "eligible": info.eligible,
        "pinned": info.pinned or "",
        "producers": ";".join(info.producers),
    }


def rank(frame):
    """Layers that may carry a policy first, most sensitive first: by ablation drop, output error, then score."""
    drop = frame["metric_drop"] if "metric_drop" in frame else np.nan
    bound = frame["group_drop"].clip(lower=0) if "group_drop" in frame else np.nan
    key = frame.assign(
        _rank=np.where(frame["eligible"], 0, 1),
        _drop=(drop if isinstance(drop, float) else drop.fillna(bound if isinstance(bound, float) else bound)),
    )
    keys, ascending = ["_rank"], [True]
    for column in ("_drop", "output_error", "score"):
        if column in key:
            keys.append(column)
            ascending.append(False)
    ordered = key.sort_values(keys, ascending=ascending, na_position="last", kind="stable")
    return ordered.drop(columns=["_rank", "_drop"]).reset_index(drop=True)


def _flagged(row: dict[str, Any]) -> bool:
    """The statistics alone show a hazard: overflowing or non-finite outputs, or a layer whose own call in 16-bit
    gives non-finite values where float32 does not (an overflow inside an author-written ``call``, such as a
    KerasHub block's attention, which its float32 output cannot show)."""
    return stats.hazard(row) is stats.Hazard.OVERFLOW or _num(row.get("sqnr_db")) == -math.inf


def alone_prior(graph: ModelGraph, rows: dict[str, dict[str, Any]]) -> dict[str, tuple[bool, float]]:
    """For each eligible layer, what the one pass predicts for it alone in 16-bit: (hazard, score).

    Alone in 16-bit, a layer rounds its output and its inputs (the float32
    outputs of its producers), so its first-order score is its own plus its
    producers', and it inherits their overflow.
    """
    out = {}
    for info in graph.eligible:
        own = rows.get(info.path, {})
        inputs = [rows.get(p, {}) for p in info.producers]
        # Its inputs are its producers' float32 outputs rounded: it inherits their overflow, not what overflows
        # inside their calls.
        hazard = _flagged(own) or any(stats.hazard(r) is stats.Hazard.OVERFLOW for r in inputs)
        score = sum(_num(r.get("score")) for r in (own, *inputs))
        out[info.path] = (hazard, score if math.isfinite(score) else math.inf)
    return out


def prior_order(prior: dict[str, tuple[bool, float]]) -> tuple[list[str], list[str]]:
    """All paths ranked by the prior (hazards first, then by score), and those to test alone at once: the
    hazards, and the layers whose score is infinite (rounding overflows where the gradient is nonzero).

    A large but finite score is only an estimate: GPT2's embeddings score 100 times the median and lose
    nothing alone, and each test alone is a whole pass on a metric like a loss, which never stops early. Such
    layers lead the group instead, so that a group that fails splits them off first.

    >>> prior_order({"a": (False, 1.0), "b": (True, 0.5), "c": (False, float("inf")), "d": (False, 900.0)})
    (['b', 'c', 'd', 'a'], ['b', 'c'])
    """
    ranked = sorted(prior, key=lambda p: (0 if prior[p][0] else 1, -prior[p][1]))
    alone = [p for p in ranked if prior[p][0] or prior[p][1] == math.inf]
    return ranked, alone


def kinds(frame, graph: ModelGraph, *, tolerance: float) -> list[str]:
    """``decision``, ``joined``, ``movement``, ``op`` or ``pinned`` for each row, by :func:`own_risk`."""
    own = own_risk(frame, graph, tolerance=tolerance)
    out = []
    for row in frame.itertuples(index=False):
        info = graph[row.path]
        if info.pinned is not None:
            out.append("pinned")
        elif info.role == WEIGHTED or row.path in own:
            out.append("decision")
        else:
            out.append({COMPUTE: "joined", MOVEMENT: "movement", OP: "op", BLOCK: "block"}[info.role])
    return out


def own_risk(frame, graph: ModelGraph, *, tolerance: float) -> set[str]:
    """The weightless computing layers that show a risk of their own (see the module docstring)."""
    rows = frame.set_index("path").to_dict("index")
    scores = {p: _num(r.get("score")) for p, r in rows.items()}
    consumers = graph.consumers
    own = set()
    for info in graph.eligible:
        if info.role != COMPUTE:
            continue
        r = rows.get(info.path, {})
        drop = _num(r.get("metric_drop"))
        risky = stats.hazard(r) is not None or (stats.tested_alone(r) and drop > tolerance)
        neighbours = [scores.get(p, 0.0) for p in (*info.producers, *consumers.get(info.path, ())) if p in graph]
        mine = scores.get(info.path, 0.0)
        if not risky and neighbours and mine > 0:
            risky = mine == math.inf or mine > RISK_SCORE_RATIO * max(neighbours)
        if risky:
            own.add(info.path)
    return own


def _num(value: Any) -> float:
    return stats.as_float(value, 0.0)


# ---------------------------------------------------------------------------
# Ablation by group testing


def ablation(
    session: Session,
    ranked: Sequence[str],
    *,
    tolerance: float,
    max_passes: int | None = None,
    alone: Sequence[str] = (),
    budget: Any = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Group-tested ablation of ``ranked`` (most suspicious first); see the module docstring.

    ``alone`` are tested one by one at once (the suspects of the one-pass measures). With ``budget`` (a
    :class:`autoprec.Budget`), a layer alone stops once it certainly breaks it: a planted overflow is told
    apart on its first batch, not after a whole pass.
    Returns per path: ``metric_drop``, ``output_error`` and ``nonfinite_outputs``
    of the layer alone (``ablation="alone"``), or ``group_drop`` and
    ``ablation="cleared in a group of K"`` for layers cleared with their group (their own
    ``metric_drop`` stays NaN: only the group's ``group_drop`` was measured), or
    ``ablation="untested"`` past ``max_passes``.
    """
    everything = {p: FLOAT32 for p in ranked}
    cap = 2 * len(ranked) + 1 if max_passes is None else max_passes  # full bisection's worst case
    out: dict[str, dict[str, Any]] = {}
    # Layers the one pass already suspects are tested alone at once; the rest start as one group.
    suspects = set(alone)
    rest = tuple(p for p in ranked if p not in suspects)
    queue: deque[tuple[str, ...]] = deque([(p,) for p in ranked if p in suspects] + ([rest] if rest else []))
    passes = 0
    bar = progress.stage("ablation", total=min(cap, 2 * len(ranked)), unit="pass") if progress else None
    while queue:
        group = queue.popleft()
        if passes >= cap:
            out.update({p: {"ablation": "untested"} for p in group})
            continue
        single = len(group) == 1
        # A group is only asked whether its harm (losses, gains ignored, so that members
        # cannot hide each other) is over the tolerance: the pass stops once it is.
        assignment = {**everything, **{p: session.target for p in group}}
        ev = session.evaluate(assignment, **({"budget": budget} if single else {"harm_above": tolerance}))
        passes += 1
        if bar:
            bar.update(passes)
        if single:
            out[group[0]] = _alone_row(ev)
        elif ev.rejected or not math.isfinite(ev.harm) or ev.harm > tolerance:
            middle = len(group) // 2
            queue.extend([group[:middle], group[middle:]])
        else:
            out.update(
                {
                    p: {
                        "group_drop": ev.drop,
                        "group_harm": ev.harm,
                        "group_error": ev.output_error,
                        "ablation": f"cleared in a group of {len(group)}",
                    }
                    for p in group
                }
            )
    if bar:
        bar.done(passes)
    return out


def _alone_row(ev: Any) -> dict[str, Any]:
    """The ablation's columns for a layer measured alone (its drop a certain lower bound when stopped early)."""
    return {
        "metric": ev.metric,
        "metric_drop": ev.drop,
        "output_error": ev.output_error,
        stats.NONFINITE_OUTPUTS: ev.nonfinite_outputs,
        "ablation": stats.ALONE_STOPPED if ev.rejected else "alone",
    }


# ---------------------------------------------------------------------------
# Statistics and score


def statistics(
    session: Session,
    fmt: Format,
    *,
    loss_scale: float = DEFAULT_LOSS_SCALE,
    batch_size: int | str = "auto",
    samples: int | None = None,
    gradient_samples: int | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """Activation, output-gradient and weight-gradient statistics, score and SQNR, streamed in micro-batches
    over ``samples`` of the data (a seeded random subset; all of it by default).

    With ``gradient_samples`` fewer than that, the step reads ``gradient_samples`` of them, and the activation
    peaks (largest magnitude, overflow and non-finite counts) are read on all ``samples`` in a forward pass
    (:func:`_ranges`, no tape).
    """
    import keras

    graph = session.graph
    data = session.data if samples is None else session.data.sample(int(samples), seed=0)
    forward = None
    if gradient_samples is not None and int(gradient_samples) < data.n:
        # An overflow that only some inputs cause needs many samples, which only a forward pass affords at high
        # resolution; gradient shares and the score are means over many elements and settle on a few samples.
        forward = _ranges(session, fmt, data, progress)
        data = data.sample(int(gradient_samples), seed=0)
    if batch_size == "auto":
        # Down to one sample: at 224x224 one MobileNetV2 sample is about 260 MB here, and a floor of 8 held 2 GB
        # over model.predict's peak.
        batch_size = auto_batch_size(
            graph, budget_bytes=PROFILE_MEMORY, cap=PROFILE_BATCH_CAP, per_sample=tape_bytes(graph), floor=1
        )
    data = data.rebatch(int(batch_size))
    fn, names = _stats_step(session, fmt, loss_scale, rows=data.batch_size)
    step = backends.compile_function(fn, optimize=False)  # a large graph, run a few micro-batches
    totals: dict[str, np.ndarray] = {}
    n_batches = -(-data.n // data.batch_size)
    bar = progress.stage("statistics", total=n_batches, unit="micro-batch") if progress else None
    session.passes += 1
    for i, (x, y, w) in enumerate(data.weighted_batches()):
        for kind, value in (step(x, y) if w is None else step(x, y, w)).items():
            rows = np.asarray(keras.ops.convert_to_numpy(value), np.float64)
            suffix = {"nodes": "", "weights": "\x00w", "own": "\x00q"}[kind]
            for path, row in zip(names[kind], rows, strict=True):
                key = path + suffix
                totals[key] = stats.merge(totals.get(key), row, blocks=_BLOCKS[suffix[1:]])
        if bar:
            bar.update(i + 1)
    if bar:
        bar.done(n_batches)
    out = _columns(totals)
    for path, v in (forward or {}).items():  # the peaks, read on more samples than the gradients
        peaks = stats.columns(v, stats.ACT)
        row = out.setdefault(path, {})
        row[stats.ACT_ABSMAX] = max(peaks[stats.ACT_ABSMAX], row.get(stats.ACT_ABSMAX, 0.0))
        row[stats.ACT_OVERFLOW] = peaks[stats.ACT_OVERFLOW]
        row[stats.ACT_NONFINITE] = max(peaks[stats.ACT_NONFINITE], row.get(stats.ACT_NONFINITE, 0))
    return out


def _ranges(session: Session, fmt: Format, data: Any, progress: Progress | None) -> dict[str, np.ndarray]:
    """Each node's activation peaks (:func:`autoprec.profiling.stats.peak_row`: largest magnitude, overflow and
    non-finite counts) from a forward pass over ``data`` at the evaluation batch size.

    An overflow that only a few inputs cause is what needs many samples, and only its peak is news: the shares
    of values that flush settle on the gradient statistics' fewer samples.
    """
    import keras

    engine = session.engine
    names: list[str] = []

    def scan(x):
        taken: list[tuple[str, Any]] = []

        def hook(path, op, call, args, kwargs, out):
            if _watched(out):
                taken.append((path, out))
            return None

        engine.run(x, None, hook)
        names[:] = [p for p, _ in taken]
        return stats.peak_table([a for _, a in taken], fmt, rows=data.batch_size) if taken else None

    step = backends.compile_function(scan, optimize=False)  # as the statistics step: a large graph, run a few times
    totals: dict[str, np.ndarray] = {}
    n_batches = -(-data.n // data.batch_size)
    bar = progress.stage("ranges", total=n_batches, unit="batch") if progress else None
    session.passes += 1
    for i, (x, _) in enumerate(data.batches()):
        value = step(x)
        if value is not None:
            for path, row in zip(names, np.asarray(keras.ops.convert_to_numpy(value), np.float64), strict=True):
                totals[path] = stats.merge(totals.get(path), row, blocks=1)
        if bar:
            bar.update(i + 1)
    if bar:
        bar.done(n_batches)
    return totals


def tape_bytes(graph: ModelGraph) -> float:
    """Bytes one sample holds in a statistics step: every output and the activations inside blocks, which the
    tape keeps, and their gradient and rounding error."""
    return 3.0 * sum(i.output_bytes + i.inner_bytes for i in graph.layers) or 4.0


def settled_samples(graph: ModelGraph) -> int:
    """How many samples the statistics read once the all-16-bit check has settled the answer.

    Two training batches (64) where they hold at most :data:`SETTLED_TAPE_BYTES`
    of tape, fewer where a sample is large, never under :data:`SETTLED_SAMPLES_FLOOR`.

    >>> import keras
    >>> from autoprec.graph import build_graph
    >>> settled_samples(build_graph(keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])))
    64
    >>> settled_samples(build_graph(keras.Sequential([keras.Input((1024, 1024, 32)), keras.layers.Conv2D(32, 3)])))
    8
    """
    fit = int(SETTLED_TAPE_BYTES // tape_bytes(graph))
    return max(SETTLED_SAMPLES_FLOOR, min(2 * TRAIN_BATCH_SIZE, fit))


def gradient_samples_for(graph: ModelGraph, samples: int) -> int:
    """How many of ``samples`` the gradient statistics and the score read: those that hold at most
    :data:`GRADIENT_TAPE_BYTES` of tape, never under :data:`SETTLED_SAMPLES_FLOOR`.

    >>> import keras
    >>> from autoprec.graph import build_graph
    >>> gradient_samples_for(build_graph(keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])), 256)
    256
    >>> big = keras.Sequential([keras.Input((512, 512, 32)), keras.layers.Conv2D(32, 3)])
    >>> gradient_samples_for(build_graph(big), 256)
    43
    """
    fit = int(GRADIENT_TAPE_BYTES // tape_bytes(graph))
    return min(int(samples), max(SETTLED_SAMPLES_FLOOR, fit))


_BLOCKS = {"": 3, "w": 2, "q": 0}  # statistics vectors in front of each kind of row (the rest is summed)


def _sixteen_bit_call(engine: Any, fmt: Format) -> Callable:
    """``(op, call, args, kwargs) -> outputs`` in ``fmt``: the engine's own 16-bit call (the real policy for a
    layer whose arithmetic it cannot round), or the plain rounding for a format the engine was not built with."""
    rnd = round_with(fmt.dtype)
    index = engine.formats.index(fmt.name) + 1 if fmt.name in engine.formats else None

    def in_16bit(op: Any, call: Callable, args: tuple, kwargs: dict) -> Any:
        if index is None:
            return call_rounded(op, call, rnd, args, kwargs)
        return engine.call_16bit(op, call, index, args, kwargs)

    return in_16bit


def _watched(out: Any) -> bool:
    """Whether a node's statistics are taken: a single floating output (a layer that also returns states, e.g.
    ``LSTM(return_state=True)``, is not watched)."""
    return not isinstance(out, (list, tuple, dict)) and "float" in str(getattr(out, "dtype", ""))


def _stats_step(session: Session, fmt: Format, loss_scale: float, *, rows: int):
    """The traced micro-batch step of ``rows`` samples: one forward/backward pass, small statistics vectors out."""
    import keras
    from keras import ops

    engine, graph = session.engine, session.graph
    # A block's own check too: where its real 16-bit call goes non-finite, the ops between its sublayers may
    # overflow, which the sublayers' own checks cannot show (see search.space: its sublayers are decided together).
    eligible = {i.path for i in graph.eligible} | set(graph.inner)
    unit_vars = [(u.path, v) for u in graph.units for v in u.layer.trainable_variables]
    variables = [v for _, v in unit_vars]
    loss = _training_batch_loss(
        resolve_loss(session.model, session.metric, session.data.y, session.baseline_outputs[0])
    )
    in_16bit = _sixteen_bit_call(engine, fmt)
    names: dict[str, list[str]] = {}  # the path of each row of each output, set while tracing

    def step(x, y, w=None):  # w: the batch's sample weights, where the data has them (the loss weighs by them)
        taken: list[tuple[str, Any]] = []
        own: dict[str, Any] = {}

        def forward(inputs, watch):
            # A backend may call forward more than once (JAX: to size its taps,
            # to differentiate, and a last concrete pass); keep the last call's.
            taken.clear()
            own.clear()

            def hook(path, op, call, args, kwargs, out):
                if not _watched(out):
                    return None
                taken.append((path, out))
                if path in eligible and path not in own:
                    r = keras.tree.flatten(in_16bit(op, call, args, kwargs))[0]
                    own[path] = ops.stack([ops.sum(ops.square(out)), ops.sum(ops.square(out - r))])
                return watch(out)

            return engine.run(inputs, None, hook)

        weighted = loss if w is None else (lambda y_true, y_pred: loss(y_true, y_pred, w))
        _, _, out_grads, var_grads = backends.gradient_pass(forward, weighted, x, y, variables)
        out: dict[str, Any] = {}
        if taken:
            out["nodes"] = _node_rows([a for _, a in taken], list(out_grads), fmt, loss_scale, rows)
        by_unit = _weight_rows(unit_vars, var_grads, y, fmt, loss_scale)
        if by_unit is not None:
            out["weights"] = by_unit
        if own:
            out["own"] = ops.stack(list(own.values()))
        names["nodes"], names["weights"], names["own"] = (
            [p for p, _ in taken],
            list(dict.fromkeys(p for p, _ in unit_vars)),
            list(own),
        )
        return out

    return step, names


def _training_batch_loss(mean_loss: Any) -> Any:
    """The loss as a part of a training batch of ``TRAIN_BATCH_SIZE`` samples.

    Per-sample gradients at layer outputs are then what a training step
    sees, whatever the micro-batch.
    """
    import keras
    from keras import ops

    def loss(y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        m = ops.cast(ops.shape(keras.tree.flatten(y_true)[0])[0], "float32")
        return mean_loss(y_true, y_pred, sample_weight) * m / TRAIN_BATCH_SIZE

    return loss


def _weight_rows(unit_vars: list, var_grads: list, y: Any, fmt: Format, loss_scale: float) -> Any:
    """Rows ``[stats, scaled stats]`` of each weighted layer's weight gradients, or None.

    A weight gradient sums over a whole training batch: this micro-batch's
    part is scaled up to it.
    """
    import keras
    from keras import ops

    if not unit_vars:
        return None
    whole = TRAIN_BATCH_SIZE / ops.cast(ops.shape(keras.tree.flatten(y)[0])[0], "float32")
    by_unit: dict[str, list] = {}
    for (path, _), g in zip(unit_vars, var_grads, strict=True):
        by_unit.setdefault(path, []).append(ops.reshape(ops.cast(g, "float32") * whole, (-1,)))
    w, w_scaled = stats.table(
        [ops.concatenate(parts) for parts in by_unit.values()], fmt, (1.0, loss_scale), batched=False
    )
    return ops.concatenate([w, w_scaled], axis=1)


def _node_rows(acts: list, grads: list, fmt: Format, loss_scale: float, rows: int = 1) -> Any:
    """Rows ``[act stats, grad stats, scaled grad stats, score]`` for each node.

    Small nodes share one flat vector, large ones of one shape are reduced as the rows of one matrix
    (:data:`autoprec.profiling.stats.EACH_ELEMENTS`, :func:`autoprec.profiling.stats.stacks`): the trace stays
    short and the run fast.
    """
    parts, order = [], []
    for indices, flat in stats.groups(acts):
        for chunk in [indices] if flat else stats.stacks([acts[i] for i in indices], rows=rows):
            chunk = [indices[j] for j in chunk] if not flat else chunk
            parts.append(_chunk_rows([acts[i] for i in chunk], [grads[i] for i in chunk], fmt, loss_scale, flat))
            order += chunk
    return stats.in_order(parts, order)


def _chunk_rows(a: list, g: list, fmt: Format, loss_scale: float, flat: bool) -> Any:
    """:func:`_node_rows` for one flat group of small nodes, or one chunk of large ones of one shape."""
    from keras import ops

    k = len(a)
    if flat:
        (act,), values, ids = stats.flat_table(a, fmt)
        (grad, grad_scaled), flat_grads, _ = stats.flat_table(g, fmt, (1.0, loss_scale))
        score = ops.segment_sum(_score_terms(values, flat_grads, fmt), ids, num_segments=k)
    elif k == 1:
        (act,) = stats.each_table(a, fmt)
        grad, grad_scaled = stats.each_table(g, fmt, (1.0, loss_scale))
        score = ops.reshape(ops.sum(_score_terms(a[0], g[0], fmt)), (1,))
    else:
        (m, ids), (dm, _) = stats.matrix(a), stats.matrix(g, like=a)
        (act,) = stats.matrix_table(m, ids, k, fmt)
        grad, grad_scaled = stats.matrix_table(dm, ids, k, fmt, (1.0, loss_scale))
        score = ops.segment_sum(ops.sum(_score_terms(m, dm, fmt), axis=1), ids, num_segments=k)
    return ops.concatenate([act, grad, grad_scaled, ops.reshape(score, (-1, 1))], axis=1)


def _score_terms(a: Any, g: Any, fmt: Format) -> Any:
    """``(g * (round(a) - a))^2`` per value; infinite where rounding overflows under a nonzero gradient."""
    from keras import ops

    a, g = ops.cast(a, "float32"), ops.cast(g, "float32")
    err = round_to(a, fmt.dtype) - a
    return ops.where(ops.isfinite(err), ops.square(g * err), ops.where(ops.abs(g) > 0, np.inf, 0.0))


def _columns(totals: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    w = stats.WIDTH
    out: dict[str, dict[str, float]] = {}
    for key, v in totals.items():
        path, _, kind = key.partition("\x00")
        row = out.setdefault(path, {})
        if kind == "":
            row.update(stats.columns(v[0:w], stats.ACT))
            row.update(stats.columns(v[w : 2 * w], stats.GRAD))
            row.update(stats.columns(v[2 * w : 3 * w], stats.GRAD_SCALED, scaled=True))
            row["score"] = float(v[3 * w])
        elif kind == "w":
            row.update(stats.columns(v[0:w], stats.WGRAD))
            row.update(stats.columns(v[w : 2 * w], stats.WGRAD_SCALED, scaled=True))
        elif kind == "q":
            signal, noise = v
            row["sqnr_db"] = (
                math.inf if noise == 0 else (10 * math.log10(signal / noise) if math.isfinite(noise) else -math.inf)
            )
    return out
