"""Range statistics of a tensor against a 16-bit format, and their running aggregate.

One vector per tensor, computed with Keras ops inside a traced step, merged
across batches with :func:`merge`, and turned into named columns with
:func:`columns`. ``profile`` and the adaptive-precision callback share this
code, so they judge ranges by the same rule:

- ``absmax``: the largest finite magnitude;
- ``overflow``: share of values beyond the format's largest finite value;
- ``flush``: share of nonzero values that round to zero (below half the
  smallest subnormal, taken as the smallest subnormal);
- ``subnormal``: share of nonzero values below the smallest normal;
- ``nonfinite``: count of NaN or inf.

Every module reads these facts by the column names defined here
(``ACT_OVERFLOW``...) and judges them with one rule, :func:`hazard`.

>>> import numpy as np
>>> from autoprec.formats import get
>>> v = np.asarray(tensor_stats(np.array([1.0, 7e4, 1e-9, 0.0], "float32"), get("mixed_float16")))
>>> c = columns(v, "act")
>>> c["act_absmax"], c["act_overflow"], c["act_flush"]
(70000.0, 0.25, 0.333...)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from autoprec.formats import Format

FIELDS = ("absmax", "total", "nonzero", "overflow", "flush", "subnormal", "nonfinite")
WIDTH = len(FIELDS)

# The tensors a layer's statistics are taken of; "_scaled" ones are multiplied by the loss scale first.
ACT, GRAD, GRAD_SCALED, WGRAD, WGRAD_SCALED = "act", "grad", "grad_scaled", "wgrad", "wgrad_scaled"


def column(tensor: str, fact: str) -> str:
    """The profile column of ``fact`` (a name in ``FIELDS``) about ``tensor`` (``ACT``, ``GRAD``...).

    >>> column(ACT, "overflow")
    'act_overflow'
    """
    return f"{tensor}_{fact}"


ACT_ABSMAX = column(ACT, "absmax")
ACT_OVERFLOW = column(ACT, "overflow")
ACT_FLUSH = column(ACT, "flush")
ACT_NONFINITE = column(ACT, "nonfinite")
GRAD_ABSMAX = column(GRAD, "absmax")
GRAD_FLUSH = column(GRAD, "flush")
GRAD_NONFINITE = column(GRAD, "nonfinite")
GRAD_SCALED_OVERFLOW = column(GRAD_SCALED, "overflow")
GRAD_SCALED_FLUSH = column(GRAD_SCALED, "flush")
WGRAD_SCALED_OVERFLOW = column(WGRAD_SCALED, "overflow")
# Not a range statistic: the engine's count of non-finite model outputs with the layer alone in 16-bit.
NONFINITE_OUTPUTS = "nonfinite_outputs"
# Not a range statistic either: the ablation's column value for a layer alone in 16-bit that was stopped once it
# certainly broke the budget (its metric_drop a lower bound).
ALONE_STOPPED = "alone, stopped over the budget"


def tested_alone(row: Mapping[str, Any]) -> bool:
    """Whether the ablation measured this layer alone in 16-bit (to the end, or until it broke the budget).

    >>> tested_alone({"ablation": "alone"}), tested_alone({"ablation": ALONE_STOPPED}), tested_alone({})
    (True, True, False)
    """
    return str(row.get("ablation", "")).startswith("alone")


FLUSH_SHARE = 0.01  # a hazard: more than 1% of the nonzero values flush to zero


class Hazard(enum.StrEnum):
    """What a layer's profile row shows, in the order :func:`hazard` checks it."""

    OVERFLOW = "overflow"  # its outputs exceed the format's range, or are non-finite
    NONFINITE = "nonfinite"  # with it alone in 16-bit, the model's outputs turn non-finite
    FLUSH = "flush"  # more than FLUSH_SHARE of its nonzero outputs flush to zero


def as_float(value: Any, default: float = math.nan) -> float:
    """``value`` as a float; ``default`` where it is None, NaN (an empty CSV cell) or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(value) else value


def number(row: Mapping[str, Any], key: str, default: float = math.nan) -> float:
    """``row[key]`` by :func:`as_float`; ``default`` where it is missing."""
    return as_float(row.get(key, default), default)


def hazards(row: Mapping[str, Any]) -> list[Hazard]:
    """Every hazard a profile row shows, in ``Hazard`` order: the one rule every stage judges ranges by.

    >>> hazards({ACT_OVERFLOW: 0.2, ACT_FLUSH: 0.5}), hazards({ACT_FLUSH: 0.001})
    ([<Hazard.OVERFLOW: 'overflow'>, <Hazard.FLUSH: 'flush'>], [])
    """
    found = []
    if number(row, ACT_OVERFLOW, 0.0) > 0 or number(row, ACT_NONFINITE, 0.0) > 0:
        found.append(Hazard.OVERFLOW)
    if number(row, NONFINITE_OUTPUTS, 0.0) > 0:
        found.append(Hazard.NONFINITE)
    if number(row, ACT_FLUSH, 0.0) > FLUSH_SHARE:
        found.append(Hazard.FLUSH)
    return found


def hazard(row: Mapping[str, Any]) -> Hazard | None:
    """The first of :func:`hazards`, or None.

    >>> hazard({ACT_FLUSH: 0.5}), hazard({})
    (<Hazard.FLUSH: 'flush'>, None)
    """
    found = hazards(row)
    return found[0] if found else None


def hazard_share(row: Mapping[str, Any]) -> float:
    """How much of a layer's training-step ranges fail at the loss scale: the shares that overflow or flush.

    Orders the layers to return to float32 first when a loss-scaled training check fails.
    """
    facts = (GRAD_SCALED_OVERFLOW, ACT_OVERFLOW, GRAD_SCALED_FLUSH, WGRAD_SCALED_OVERFLOW)
    return sum(number(row, c, 0.0) for c in facts)


def _edges(fmt: Format, scale: float) -> list[float]:
    # buckets: [0, tiny) zero | [tiny, sub) flush | [sub, normal) subnormal | [normal, max] ok | > max overflow
    # The smallest *normal* float32 stands for "nonzero": CPUs run TensorFlow with
    # denormals flushed to zero, and the edges must not decrease (bfloat16's
    # subnormals lie below float32's normals).
    tiny = float(np.finfo(np.float32).tiny)
    top = float(np.nextafter(np.float32(fmt.max_finite / scale), np.float32(np.inf)))
    return [tiny, max(tiny, fmt.min_subnormal / scale), max(tiny, fmt.min_normal / scale), top]


def tensor_stats(t: Any, fmt: Format, scale: float = 1.0) -> Any:
    """The statistics vector (``FIELDS`` order) of ``t`` multiplied by ``scale``, in Keras ops."""
    return _rows(t, fmt, (scale,))[0]


def _rows(t: Any, fmt: Format, scales: tuple[float, ...], *, axis: int | None = None) -> list[Any]:
    """One statistics vector per scale, from whole-tensor reductions: a count of the values at or above each
    bucket edge (see ``EACH_ELEMENTS``). With ``axis=1``, ``t`` is a matrix and each row gets its own vector:
    one ``(rows, WIDTH)`` array per scale."""
    from keras import ops

    t = t if str(getattr(t, "dtype", "")).endswith("float32") else ops.cast(t, "float32")
    finite = ops.isfinite(t)
    safe = ops.where(finite, ops.abs(t), 0.0)
    absmax = ops.max(safe, axis=axis, initial=0.0)
    # A matrix's rows all hold its known width; a whole tensor's size is read at run time.
    size = absmax * 0.0 + float(t.shape[1]) if axis is not None else ops.cast(ops.size(t), "float32")
    nonfinite = size - ops.sum(ops.cast(finite, "float32"), axis=axis)
    at_least: dict[float, Any] = {}  # edges repeat (bfloat16's lower edges are all float32's smallest normal)

    def count(edge: float) -> Any:
        if edge not in at_least:
            at_least[edge] = ops.sum(ops.cast(safe >= edge, "float32"), axis=axis)
        return at_least[edge]

    out = []
    for scale in scales:
        # Edges [tiny, subnormal, normal, past max]: >= tiny is nonzero; below the subnormal it flushes;
        # below the normal it is subnormal (or flushes); past the largest finite value it overflows.
        tiny, sub, normal, top = (count(e) for e in _edges(fmt, scale))
        out.append(ops.stack([absmax * scale, size, tiny, top, tiny - sub, tiny - normal, nonfinite], axis=-1))
    return out


def peak_row(t: Any, fmt: Format, *, axis: int | None = None) -> Any:
    """The statistics vector of ``t`` where only its peak is news: the largest magnitude and the size, and the
    overflow and non-finite counts, counted only where some value overflows or is not finite (a branch seldom
    taken). The counts of nonzero, flushed and subnormal values are left 0. With ``axis=1``, ``t`` is a matrix
    and each row gets its own vector, ``(rows, WIDTH)``.

    Four operations over the tensor instead of a dozen: a forward scan of many samples reads it for every node.

    >>> from autoprec.formats import get
    >>> [float(v) for v in peak_row(np.array([[1.0, 7e4, 1e-9]], "float32"), get("mixed_float16"))]
    [70000.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    >>> [float(v) for v in peak_row(np.array([[1.0, 2.0]], "float32"), get("mixed_float16"))]
    [2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    >>> np.asarray(peak_row(np.array([[1.0, 2.0], [7e4, 3.0]], "float32"), get("mixed_float16"), axis=1)).tolist()
    [[2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], [70000.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    """
    from keras import ops

    t = t if str(getattr(t, "dtype", "")).endswith("float32") else ops.cast(t, "float32")
    a = ops.abs(t)
    top = _edges(fmt, 1.0)[3]

    def row(peak: Any, over: Any, nonfinite: Any) -> Any:
        size = peak * 0.0 + float(t.shape[1]) if axis is not None else ops.cast(ops.size(t), "float32")
        zero = peak * 0.0
        return ops.stack([peak, size, zero, over, zero, zero, nonfinite], axis=-1)

    def counted() -> Any:
        finite = ops.isfinite(t)
        safe = ops.where(finite, a, 0.0)
        nonfinite = ops.sum(ops.cast(ops.logical_not(finite), "float32"), axis=axis)
        over = ops.sum(ops.cast(safe >= top, "float32"), axis=axis)
        return row(ops.max(safe, axis=axis, initial=0.0), over, nonfinite)

    def peak() -> Any:
        m = ops.max(a, axis=axis, initial=0.0)
        return row(m, m * 0.0, m * 0.0)

    # `a < top` is False for NaN and inf as well as for an overflow: one comparison tells every case apart.
    return ops.cond(ops.all(a < top), peak, counted)


PEAK_SPAN = 16  # nodes apart, at most, that one matrix of the forward peak scan gathers (see stacks)


def peak_table(tensors: list, fmt: Format, *, rows: int = 1) -> Any:
    """:func:`peak_row` of each of ``tensors``, ``(k, WIDTH)``: those of one shape as the rows of one matrix
    (:func:`stacks`; ``rows``: samples per tensor), so that a scan of every node stays a short trace.

    >>> from autoprec.formats import get
    >>> rows = peak_table([np.array([[1.0, 7e4]], "float32"), np.array([[3.0, 1.0]], "float32")], get("mixed_float16"))
    >>> np.asarray(rows)[:, [0, 3]].tolist()
    [[70000.0, 1.0], [3.0, 0.0]]
    """
    from keras import ops

    parts, order = [], []
    for indices in stacks(tensors, rows=rows, span=PEAK_SPAN):
        chosen = [tensors[i] for i in indices]
        if len(chosen) == 1:
            parts.append(ops.expand_dims(peak_row(chosen[0], fmt), 0))
        else:
            m, ids = matrix(chosen)
            parts.append(merge_rows(peak_row(m, fmt, axis=1), ids, len(chosen)))
        order += indices
    return in_order(parts, order)


# Elements per sample from which a tensor's statistics are reduced on their own, not in a shared flat vector.
# Whole-tensor reductions run 8x faster on CPU than bucketing each value and counting by segment (TensorFlow's
# Bucketize and UnsortedSegmentSum kernels run on one thread), but each tensor adds a dozen traced operations:
# on small tensors the trace is the cost, on large ones the run.
EACH_ELEMENTS = 1 << 14
FLAT_CHUNK = 16  # small tensors per flat vector: one copy of all of them at once could double a step's memory


def is_large(t: Any, *, batched: bool = True) -> bool:
    """Whether ``t`` holds at least ``EACH_ELEMENTS`` per sample (in all, when not ``batched``), or a size not
    known at trace time."""
    dims = tuple(getattr(t, "shape", ()))[1 if batched else 0 :]
    return any(d is None for d in dims) or math.prod(int(d) for d in dims) >= EACH_ELEMENTS


def groups(tensors: list, *, batched: bool = True) -> list[tuple[list[int], bool]]:
    """How the statistics of ``tensors`` are computed: ``(indices, flat)`` per group, chunks of ``FLAT_CHUNK``
    small tensors sharing one flat vector (``flat``), then the large ones, each reduced on its own.

    >>> groups([np.zeros((1, 4)), np.zeros((1, EACH_ELEMENTS)), np.zeros((1, 2))])
    [([0, 2], True), ([1], False)]
    """
    large_ones = [is_large(t, batched=batched) for t in tensors]
    small = [i for i, large in enumerate(large_ones) if not large]
    large = [i for i, large in enumerate(large_ones) if large]
    out = [(small[c : c + FLAT_CHUNK], True) for c in range(0, len(small), FLAT_CHUNK)]
    return out + [(large, False)] if large else out


def table(tensors: list, fmt: Format, scales: tuple[float, ...] = (1.0,), *, batched: bool = True) -> list[Any]:
    """Statistics of many tensors at once: one ``(k, WIDTH)`` array per scale; ``batched``: the first axis
    is the batch (a weight gradient has none).

    >>> from autoprec.formats import get
    >>> (rows,) = table([np.array([[1.0, 7e4]], "float32"), np.zeros((1, 3), "float32")], get("mixed_float16"))
    >>> np.asarray(rows)[:, :4].tolist()
    [[70000.0, 2.0, 2.0, 1.0], [0.0, 3.0, 0.0, 0.0]]
    """
    parts, order = [], []
    for indices, flat in groups(tensors, batched=batched):
        chosen = [tensors[i] for i in indices]
        parts.append(flat_table(chosen, fmt, scales)[0] if flat else each_table(chosen, fmt, scales, batched=batched))
        order += indices
    return [in_order([p[s] for p in parts], order) for s in range(len(scales))]


def each_table(tensors: list, fmt: Format, scales: tuple[float, ...] = (1.0,), *, batched: bool = True) -> list[Any]:
    """:func:`table` for large tensors: each reduced on its own (see ``EACH_ELEMENTS``), those of one shape as
    the rows of one matrix (:func:`stacks`).

    >>> from autoprec.formats import get
    >>> big = [np.full((2, EACH_ELEMENTS), v, "float32") for v in (1.0, 7e4, 3.0)]
    >>> (rows,) = each_table(big, get("mixed_float16"))
    >>> np.asarray(rows)[:, :4].tolist() == [[1.0, 2 * EACH_ELEMENTS, 2 * EACH_ELEMENTS, 0.0],
    ...                                      [7e4, 2 * EACH_ELEMENTS, 2 * EACH_ELEMENTS, 2 * EACH_ELEMENTS],
    ...                                      [3.0, 2 * EACH_ELEMENTS, 2 * EACH_ELEMENTS, 0.0]]
    True
    """
    from keras import ops

    parts, order = [], []
    for indices in stacks(tensors, batched=batched):
        chosen = [tensors[i] for i in indices]
        if len(chosen) == 1:
            parts.append([ops.expand_dims(r, 0) for r in _rows(chosen[0], fmt, scales)])
        else:
            m, ids = matrix(chosen, batched=batched)
            parts.append(matrix_table(m, ids, len(chosen), fmt, scales))
        order += indices
    return [in_order([p[s] for p in parts], order) for s in range(len(scales))]


# Large tensors of one shape are reduced as the rows of one matrix, in chunks of at most this many elements in
# all. Each tensor then adds a reshape to the traced step instead of a dozen reductions: on MobileNetV2 at 224x224
# the statistics step's trace took 7 s of its 14. A chunk is a copy, 16 MB at most, and what its reductions hold
# besides: sized per sample, a GPT2 decoder's micro-batches held 0.5 GB more.
STACK_ELEMENTS = 1 << 22


def _per_sample(t: Any, batched: bool) -> int | None:
    dims = tuple(getattr(t, "shape", ()))[1 if batched else 0 :]
    return None if any(d is None for d in dims) else math.prod(int(d) for d in dims)


def stacks(tensors: list, *, batched: bool = True, rows: int = 1, span: int | None = None) -> list[list[int]]:
    """Which of ``tensors`` are reduced together: those of one known shape past the batch axis (the whole shape
    when not ``batched``), in chunks of at most ``STACK_ELEMENTS`` in all, a tensor holding ``rows`` samples; a
    tensor of unknown or empty shape alone. With ``span``, a chunk's tensors lie at most ``span`` places apart
    in ``tensors``: a forward pass frees a tensor once read, and a chunk keeps its members until the last one
    exists.

    >>> stacks([np.zeros((1, 4)), np.zeros((1, 3)), np.zeros((2, 4))])
    [[0, 2], [1]]
    >>> stacks([np.zeros((1, 4)), np.zeros((1, 3)), np.zeros((2, 4))], span=1)
    [[0], [2], [1]]
    """
    keyed: dict[Any, list[list[int]]] = {}
    for i, t in enumerate(tensors):
        n = _per_sample(t, batched)
        key = (tuple(t.shape[1:]) if batched else tuple(t.shape)) if n else ("alone", i)
        chunks = keyed.setdefault(key, [[]])
        last, size = chunks[-1], (n or 0) * (rows if batched else 1)
        if last and (size * (len(last) + 1) > max(size, STACK_ELEMENTS) or (span is not None and i - last[0] > span)):
            chunks.append([])
        chunks[-1].append(i)
    return [c for chunks in keyed.values() for c in chunks]


def matrix(tensors: list, *, batched: bool = True, like: list | None = None) -> tuple[Any, Any]:
    """``tensors`` of one shape as the rows of one float32 matrix, one row per sample (one per tensor when not
    ``batched``), and each row's tensor index. ``like``: tensors of the same shapes whose static shapes are
    known (a gradient's may be less known than its activation's).

    >>> m, ids = matrix([np.ones((2, 3)), np.zeros((1, 3))])
    >>> np.asarray(m).shape, np.asarray(ids).tolist()
    ((3, 3), [0, 0, 1])
    """
    from keras import ops

    rows, ids = [], []
    for j, (t, shaped) in enumerate(zip(tensors, like or tensors, strict=True)):
        m = ops.reshape(ops.cast(t, "float32"), (-1, _per_sample(shaped, batched)) if batched else (1, -1))
        rows.append(m)
        ids.append(ops.full((ops.shape(m)[0],), j, dtype="int32"))
    return ops.concatenate(rows, axis=0), ops.concatenate(ids, axis=0)


def matrix_table(m: Any, ids: Any, k: int, fmt: Format, scales: tuple[float, ...] = (1.0,)) -> list[Any]:
    """The statistics of the ``k`` tensors whose rows :func:`matrix` gathered in ``m``: one ``(k, WIDTH)`` array
    per scale. Each row is reduced, then a tensor's rows merged: the largest ``absmax``, the sum of the counts
    (as :func:`merge`).

    >>> from autoprec.formats import get
    >>> (rows,) = matrix_table(*matrix([np.array([[1.0, 7e4], [2.0, 0.0]], "float32")]), 1, get("mixed_float16"))
    >>> np.asarray(rows)[:, :4].tolist()
    [[70000.0, 4.0, 3.0, 1.0]]
    """

    return [merge_rows(rows, ids, k) for rows in _rows(m, fmt, scales, axis=1)]


def merge_rows(rows: Any, ids: Any, k: int) -> Any:
    """Statistics vectors ``(n, WIDTH)`` merged into ``k`` by ``ids`` (as :func:`merge`: the largest ``absmax``,
    the sum of the counts)."""
    from keras import ops

    peak = ops.segment_max(rows[:, 0], ids, num_segments=k)
    counts = ops.segment_sum(rows[:, 1:], ids, num_segments=k)
    return ops.concatenate([ops.expand_dims(peak, 1), counts], axis=1)


def in_order(parts: list, order: list[int]) -> Any:
    """The rows of ``parts`` stacked, then put back in the tensors' order (``order``: each row's tensor)."""
    from keras import ops

    rows = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)
    return rows if order == sorted(order) else ops.take(rows, np.argsort(order), axis=0)


def flat_table(tensors: list, fmt: Format, scales: tuple[float, ...] = (1.0,)) -> tuple[Any, Any, Any]:
    """:func:`table` for small tensors, plus the flat values and segment ids.

    The tensors are flattened into one vector with a segment id per value, so
    one bucketing pass and one count serve all of them: a traced step holds a
    handful of operations instead of a dozen per tensor. Returns ``(rows per
    scale, values, ids)`` so callers can reduce other per-value quantities by segment.
    """
    from keras import ops

    k = len(tensors)
    flats = [ops.reshape(ops.cast(t, "float32"), (-1,)) for t in tensors]
    ids = ops.concatenate([ops.full(ops.shape(f), i, dtype="int32") for i, f in enumerate(flats)])
    values = ops.concatenate(flats)
    finite = ops.isfinite(values)
    safe = ops.where(finite, ops.abs(values), 0.0)
    absmax = ops.segment_max(safe, ids, num_segments=k)
    rows = []
    for scale in scales:
        # bucket 0 zero, 1 flush, 2 subnormal, 3 fine, 4 overflow, 5 non-finite
        bucket = ops.where(finite, ops.digitize(safe, _edges(fmt, scale)), 5)
        counts = ops.reshape(
            ops.segment_sum(ops.ones_like(safe), ids * 6 + ops.cast(bucket, "int32"), num_segments=6 * k), (k, 6)
        )
        size = ops.sum(counts, axis=1)
        zero, flush, sub, over, nonfinite = counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 4], counts[:, 5]
        rows.append(
            ops.stack([absmax * scale, size, size - zero - nonfinite, over, flush, flush + sub, nonfinite], axis=1)
        )
    return rows, values, ids


def merge(a: np.ndarray | None, b: np.ndarray, *, blocks: int | None = None) -> np.ndarray:
    """Aggregate two vectors that start with ``blocks`` statistics vectors: maxima for absmax, sums for the rest.

    >>> merge(np.array([2.0, 1, 1, 0, 0, 0, 0, 5]), np.array([3.0, 1, 1, 0, 0, 0, 0, 5]), blocks=1)[[0, 1, 7]]
    array([ 3.,  2., 10.])
    """
    b = np.asarray(b, np.float64)
    if a is None:
        return b.copy()
    out = a + b
    idx = np.arange(len(b) // WIDTH if blocks is None else blocks) * WIDTH
    out[idx] = np.maximum(a[idx], b[idx])
    return out


def columns(v: np.ndarray, prefix: str, *, scaled: bool = False) -> dict[str, float]:
    """Named columns from one statistics vector: shares of the total or of the nonzero values."""
    absmax, total, nonzero, overflow, flush, below_normal, nonfinite = (float(x) for x in v[:WIDTH])
    nz, total = nonzero or 1.0, total or 1.0
    out = {
        column(prefix, "overflow"): overflow / total,
        column(prefix, "flush"): flush / nz,
        column(prefix, "subnormal"): (below_normal - flush) / nz,
    }
    if not scaled:
        out = {column(prefix, "absmax"): absmax, **out, column(prefix, "nonfinite"): int(nonfinite)}
    return out
