"""Evaluation data, checked once and read in batches on demand.

Data arrives as an ``(x, y)`` tuple of arrays, a ``tf.data.Dataset`` of
``(x, y)``, or a ``keras.utils.PyDataset``. :meth:`EvalData.get` checks it
once (shapes, dtypes, non-finite values) and later passes read it batch by
batch, so a pass never holds more than one batch of inputs beyond what the
user already holds:

- arrays are sliced, never copied;
- a dataset small enough (``cache_bytes``) is kept as NumPy batches; a larger
  one is iterated again on every pass, and must yield the same labels in the
  same order each time (a shuffling dataset is refused with the fix).

The labels are kept (they are small); ``y`` may be a list or dict with one
array per model output. So are sample weights, the third element of
``(x, y, sample_weight)`` (a padding mask over tokens, say): they weigh the
metric as Keras's ``evaluate`` weighs its weighted metrics, and are kept
scaled to a mean of one, so that the metric stays the mean of the
per-sample values (see :attr:`EvalData.weights`).

>>> import numpy as np
>>> data = EvalData.get((np.zeros((10, 3)), np.zeros(10)), batch_size=4)
>>> data.n, [len(y) for _, y in data.batches()]
(10, [4, 4, 2])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from autoprec.errors import ArgumentError, DataError, describe

logger = logging.getLogger("autoprec")

# Batch sizes, in one place.
DEFAULT_BATCH_SIZE = 256  # evaluation (predict) batches, where memory does not size them
TRAIN_BATCH_SIZE = 32  # a training step's batch: Keras's default in fit, for the gradient statistics and checks
PROFILE_BATCH_CAP = 64  # the profile's micro-batches hold at most this many samples, whatever memory allows
COST_BATCH_SIZE = 64  # the training batch the cost model estimates, and measures, a step at
DEFAULT_CACHE_BYTES = 1 << 30  # datasets up to 1 GiB are kept in memory as NumPy batches
NONFINITE_MODES = ("raise", "drop")


class EvalData:
    """Batches of ``(x, y)`` as NumPy arrays (``x`` and ``y`` may be lists or dicts of arrays).

    Build it with :meth:`get`. ``batches()`` yields the batches in the same
    order on every call; ``n`` is the number of samples and ``y`` all labels.

    ``weights`` is None where every sample and token counts alike, else the
    sample weights (a structure like ``y``'s, or one array for every output),
    divided by their mean: Keras's weighted mean ``sum(w * v) / sum(w)`` is
    then the plain mean over samples of ``mean(w * v)`` within each sample.
    """

    def __init__(
        self,
        source: Callable[[], Iterator[tuple[Any, Any]]],
        *,
        n: int,
        y: Any,
        batch_size: int,
        sample: Any,
        what: str,
        weights: Any = None,
    ) -> None:
        self._source, self.n, self.y, self.batch_size, self._sample, self.what = source, n, y, batch_size, sample, what
        self.weights = weights

    @classmethod
    def get(
        cls,
        data: Any,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        what: str = "data",
        model: Any = None,
        nonfinite: str = "raise",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> EvalData:
        """Check ``data`` and wrap it; see the module docstring.

        Args:
            data: ``(x, y)`` arrays, a ``tf.data.Dataset`` yielding ``(x, y)``,
                or a ``keras.utils.PyDataset``. A third element holds sample
                weights: one per sample, or one per token (a padding mask),
                as Keras's ``evaluate`` takes them. An ``EvalData`` is re-batched.
            batch_size: the largest batch a pass holds (bigger batches are split).
            what: the argument's name, for error messages.
            model: the model, so that ``x`` and ``y`` are read with its number
                of inputs and outputs (a nested list is one array for a one-input model).
            nonfinite: ``"raise"`` refuses NaN/inf in ``x`` or ``y``; ``"drop"``
                drops those samples with a warning.
            cache_bytes: datasets up to this size are kept in memory.

        Raises:
            DataError: empty, malformed, non-finite or inconsistent data.

        Example:
            >>> import numpy as np
            >>> EvalData.get((np.ones((5, 2)), np.ones(5))).n
            5
        """
        from autoprec.errors import check_choice, check_int

        check_int("batch_size", batch_size, 1)
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        if isinstance(data, EvalData):
            return data.rebatch(batch_size)
        arity = _arity(model)
        if isinstance(data, (tuple, list)):
            return _from_arrays(data, batch_size, what, arity, nonfinite)
        return _from_batches(data, batch_size, what, arity, nonfinite, cache_bytes)

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """The ``(x, y)`` batches, each at most ``batch_size`` samples, in a fixed order."""
        for x, y, _ in self.weighted_batches():
            yield x, y

    def weighted_batches(self) -> Iterator[tuple[Any, Any, Any]]:
        """The ``(x, y, weights)`` batches: :meth:`batches` with each batch's rows of :attr:`weights` (or None).

        >>> data = EvalData.get((np.zeros((3, 2)), np.zeros(3), np.array([1.0, 1.0, 4.0])), batch_size=2)
        >>> [w.tolist() for _, _, w in data.weighted_batches()]
        [[0.5, 0.5], [2.0]]
        """
        offset = 0
        for x, y in self._source():
            n = _length(x, self.what)
            for i in range(0, n, self.batch_size):
                size = min(self.batch_size, n - i)
                part = (x, y) if size == n else (_slice(x, i, i + size), _slice(y, i, i + size))
                w = None if self.weights is None else _slice(self.weights, offset, offset + size)
                offset += size
                yield part[0], part[1], w

    def rebatch(self, batch_size: int) -> EvalData:
        """The same data read in batches of at most ``batch_size`` (no copy)."""
        return self._like(self._source, batch_size=batch_size)

    def with_weights(self, weights: Any) -> EvalData:
        """The same data with these sample weights (one row per sample; scaled here to a mean of one)."""
        return self._like(self._source, weights=normalized_weights(weights, self.y, self.what))

    def _like(self, source: Callable, **changes: Any) -> EvalData:
        fields = {"n": self.n, "y": self.y, "batch_size": self.batch_size, "sample": self._sample, "what": self.what}
        return EvalData(source, **{**fields, "weights": self.weights, **changes})

    def map_labels(self, fix: Callable[[Any], Any]) -> EvalData:
        """The same data with ``fix`` applied to the labels of every batch (and to ``y``); no copy of ``x``."""
        source = self._source

        def fixed() -> Iterator[tuple[Any, Any]]:
            for x, y in source():
                yield x, fix(y)

        return self._like(fixed, y=fix(self.y))

    def split(self, fraction: float, *, seed: int = 0) -> tuple[EvalData, EvalData]:
        """A seeded random ``fraction`` of the samples held out: ``(the rest, the held-out part)``.

        Each part reads the same source and keeps its samples' order; a part
        that fits ``DEFAULT_CACHE_BYTES`` is kept in memory after its first pass.

        >>> rest, held = EvalData.get((np.arange(10.0)[:, None], np.arange(10))).split(0.3)
        >>> rest.n, held.n, sorted(set(rest.y) | set(held.y)) == list(range(10))
        (7, 3, True)
        """
        held = self._mask(int(round(fraction * self.n)), seed)
        parts = self._subset(~held), self._subset(held)
        for part, name in zip(parts, ("searched", "held-out"), strict=True):
            if part.weights is not None and not any(np.any(w) for w in _leaves(part.weights)):
                raise DataError(
                    f"Expected samples weighed above zero in both parts of {self.what} split for a held-out check. "
                    f"Received a {name} part of {part.n} samples whose sample weights are all zero. Pass more "
                    "samples that count, or a separate holdout=(x, y, sample_weight)."
                )
        return parts

    def sample(self, k: int, *, seed: int = 0) -> EvalData:
        """A seeded random ``k`` of the samples (all of them when ``k >= n``), in their order.

        >>> part = EvalData.get((np.arange(10.0)[:, None], np.arange(10))).sample(4)
        >>> part.n, len(set(part.y))
        (4, 4)
        """
        return self if k >= self.n else self._subset(self._mask(k, seed))

    def _mask(self, k: int, seed: int) -> np.ndarray:
        chosen = np.zeros(self.n, dtype=bool)
        chosen[np.random.default_rng(seed).choice(self.n, size=k, replace=False)] = True
        return chosen

    def _subset(self, mask: np.ndarray) -> EvalData:
        source, what = self._source, self.what
        cache: list[list[tuple[Any, Any]]] = []

        def part() -> Iterator[tuple[Any, Any]]:
            if cache:
                yield from cache[0]
                return
            pieces, size, offset = [], 0, 0
            for x, y in source():
                n = _length(x, what)
                keep, offset = mask[offset : offset + n], offset + n
                if keep.any():
                    piece = (_take(x, keep), _take(y, keep))
                    size += _nbytes(piece)
                    pieces.append(piece)
                    yield piece
            if size <= DEFAULT_CACHE_BYTES:
                cache.append(pieces)

        sample = _slice(next(iter(part()))[0], 0, 2)
        y = _take(self.y, mask)
        weights = None if self.weights is None else _take(self.weights, mask)
        if weights is not None and any(np.any(w) for w in _leaves(weights)):  # all zero: kept so, for split to say
            weights = normalized_weights(weights, y, what)
        return self._like(part, n=int(mask.sum()), y=y, sample=sample, weights=weights)

    def x_sample(self, k: int = 2) -> Any:
        """The first ``k`` inputs."""
        return _slice(self._sample, 0, k)

    def __repr__(self) -> str:
        return f"EvalData(n={self.n}, batch_size={self.batch_size})"


def _arity(model: Any) -> tuple[int | None, int | None]:
    """(number of inputs, number of outputs) of a Functional model, None where unknown."""
    if model is None:
        return None, None
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    try:
        return (len(inputs) if inputs else None), (len(outputs) if outputs else None)
    except (TypeError, AttributeError, ValueError):
        return None, None


def _slice(value: Any, start: int, stop: int) -> Any:
    import keras

    return keras.tree.map_structure(lambda a: a[start:stop], value)


def _from_arrays(data: tuple | list, batch_size: int, what: str, arity: tuple, nonfinite: str) -> EvalData:
    if len(data) not in (2, 3):
        raise DataError(
            f"Expected {what} as an (x, y) tuple of arrays. Received a {type(data).__name__} of "
            f"{len(data)} elements. Pass (x_val, y_val)."
        )
    x = to_arrays(data[0], f"{what}[0] (x)", parts=arity[0])
    y = to_arrays(data[1], f"{what}[1] (y)", parts=arity[1], labels=True)
    w = _weight_arrays(data[2], f"{what}[2] (sample_weight)", arity) if len(data) == 3 else None
    n = _length(x, f"{what}[0] (x)")
    if n == 0:
        raise DataError(f"Expected {what} to hold at least one sample. Received an empty x.")
    if _length(y, f"{what}[1] (y)") != n:
        raise DataError(
            f"Expected x and y with the same number of samples. Received: x has {n}, y has {_length(y, 'y')}."
        )
    if w is not None and _length(w, f"{what}[2] (sample_weight)") != n:
        raise DataError(
            f"Expected one sample weight per sample in {what}[2] (sample_weight): {n} rows, as x has. Received "
            f"{_length(w, 'sample_weight')}."
        )
    keep = _finite_rows(x, y, what, nonfinite, offset=0)
    if keep is not None:
        x, y, n = _take(x, keep), _take(y, keep), int(keep.sum())
        w = None if w is None else _take(w, keep)
    weights = normalized_weights(w, y, f"{what}[2] (sample_weight)")
    return EvalData(
        lambda: iter([(x, y)]), n=n, y=y, batch_size=batch_size, sample=_slice(x, 0, 2), what=what, weights=weights
    )


def _weight_arrays(weights: Any, what: str, arity: tuple) -> Any:
    """Sample weights as arrays: one array, or one per model output like the labels (None stays None)."""
    if weights is None:
        return None
    return to_arrays(weights, what, parts=arity[1], labels=True)


def normalized_weights(weights: Any, y: Any, what: str) -> Any:
    """Sample weights checked against the labels and divided by their mean; None where all are equal.

    Each array holds one weight per sample, ``(n,)``, or one per token of a
    sequence label, ``(n, steps)`` (a padding mask), as Keras's ``evaluate``
    takes them. Equal weights change no mean, so they are dropped.

    >>> normalized_weights(np.array([[1, 1, 0], [1, 0, 0]]), np.zeros((2, 3), "int32"), "w").tolist()
    [[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]]
    >>> normalized_weights(np.full(4, 3.0), np.zeros(4), "w") is None
    True
    >>> normalized_weights(np.array([1.0, -1.0]), np.zeros(2), "w")
    Traceback (most recent call last):
    ...
    autoprec.errors.DataError: Expected sample weights that are finite and non-negative ...
    """
    import keras

    if weights is None:
        return None
    leaves = keras.tree.flatten(weights)
    labels = keras.tree.flatten(y)
    n = len(labels[0]) if labels else 0
    for leaf in leaves:
        _check_weight_leaf(leaf, labels, n, what)
    if all(leaf.size == 0 or np.all(leaf == leaf.flat[0]) for leaf in leaves):
        return None
    return keras.tree.map_structure(lambda a: (a / a.mean(dtype=np.float64)).astype(np.float32), weights)


def _check_weight_leaf(leaf: np.ndarray, labels: list, n: int, what: str) -> None:
    if leaf.ndim == 0 or len(leaf) != n:
        raise DataError(
            f"Expected one sample weight per sample in {what}: {n} rows. Received an array of shape {leaf.shape}."
        )
    if not np.all(np.isfinite(leaf)) or leaf.min(initial=0.0) < 0:
        raise DataError(
            f"Expected sample weights that are finite and non-negative in {what}. Received values from "
            f"{np.nanmin(leaf):g} to {np.nanmax(leaf):g}. Pass 1 for a sample or token that counts, 0 for padding."
        )
    if leaf.size and not leaf.any():
        raise DataError(
            f"Expected some sample weight above zero in {what}. Received all {leaf.size} zero: nothing would "
            "count in the metric. Pass 1 for each sample or token that counts."
        )
    shapes = [lab.shape for lab in labels]
    fits = any(
        lab.shape[: leaf.ndim] == leaf.shape or (leaf.shape[-1] == 1 and lab.shape[: leaf.ndim - 1] == leaf.shape[:-1])
        for lab in labels
    )
    if leaf.ndim > 1 and not fits:
        raise DataError(
            f"Expected sample weights of shape (n,) or the labels' leading shape (one per token) in {what}. "
            f"Received weights of shape {leaf.shape} for labels of shape {shapes[0] if len(shapes) == 1 else shapes}."
        )


def _take(value: Any, mask: np.ndarray) -> Any:
    import keras

    return keras.tree.map_structure(lambda a: a[mask], value)


def _from_batches(data: Any, batch_size: int, what: str, arity: tuple, nonfinite: str, cache_bytes: int) -> EvalData:
    """A dataset: read it once to check it; keep it in memory when small, else re-read it each pass."""
    kept, labels, weights, nbytes, total, sample = [], [], [], 0, 0, None
    for i, (x, y, w) in enumerate(_read_batches(data, what, arity)):
        keep = _finite_rows(x, y, f"{what} batch {i}", nonfinite, offset=total)
        total += _length(x, "x")
        if keep is not None:
            x, y, w = _take(x, keep), _take(y, keep), (None if w is None else _take(w, keep))
        if _length(y, "y") == 0:
            continue
        sample = x if sample is None else sample
        labels.append(y)
        weights.append(w)
        nbytes += _nbytes(x)
        if nbytes <= cache_bytes:
            kept.append((x, y))
    if not labels:
        raise DataError(f"Expected {what} to hold at least one sample. Received an empty dataset.")
    y_all = _concat(labels)
    n = _length(y_all, "y")
    w_all = _all_weights(weights, what)
    fields = {"n": n, "y": y_all, "batch_size": batch_size, "sample": _slice(sample, 0, 2), "what": what}
    fields["weights"] = normalized_weights(w_all, y_all, f"{what}'s sample weights")
    if len(kept) == len(labels):
        return EvalData(lambda: iter(kept), **fields)
    logger.info(
        "autoprec: %s holds %.2g GB of inputs, more than cache_bytes; it is read again on every pass.",
        what,
        nbytes / 1e9,
    )
    return EvalData(_StreamingSource(data, what, arity, nonfinite, labels), **fields)


def _all_weights(weights: list, what: str) -> Any:
    """The batches' sample weights as one structure; None where no batch has any."""
    given = sum(w is not None for w in weights)
    if given == 0:
        return None
    if given < len(weights):
        raise DataError(
            f"Expected sample weights in every batch of {what}, or in none. Received them in {given} of "
            f"{len(weights)} batches. Yield (x, y, sample_weight) from every batch."
        )
    return _concat(weights)


class _StreamingSource:
    """Iterate a large dataset again, checking it yields the same labels in the same order."""

    def __init__(self, data: Any, what: str, arity: tuple, nonfinite: str, labels: list) -> None:
        self.data, self.what, self.arity, self.nonfinite, self.labels = data, what, arity, nonfinite, labels

    def __call__(self) -> Iterator[tuple[Any, Any]]:
        import keras

        expected = iter(self.labels)
        for i, (x, y, _) in enumerate(_read_batches(self.data, self.what, self.arity)):
            keep = _finite_rows(x, y, f"{self.what} batch {i}", "drop", offset=0, quiet=True)
            if keep is not None:
                x, y = _take(x, keep), _take(y, keep)
            if _length(y, "y") == 0:
                continue
            want, got = next(expected, None), keras.tree.flatten(y)
            same = want is not None and len(keras.tree.flatten(want)) == len(got)
            same = same and all(np.array_equal(a, b) for a, b in zip(keras.tree.flatten(want), got, strict=True))
            if not same:
                raise DataError(
                    f"Expected {self.what} to yield the same samples in the same order on every pass. Received other "
                    f"labels in batch {i} on a later pass: the dataset shuffles or augments. Remove shuffle() "
                    "(or set reshuffle_each_iteration=False), or pass arrays."
                )
            yield x, y


def _read_batches(data: Any, what: str, arity: tuple) -> Iterator[tuple[Any, Any, Any]]:
    for i, item in enumerate(_iterate(data, what)):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise DataError(
                f"Expected {what} to yield (x, y) batches. Received batch {i} as {describe(item)}. "
                "Map the dataset to (features, labels) pairs first."
            )
        x = to_arrays(item[0], f"{what} batch {i} x", parts=arity[0])
        y = to_arrays(item[1], f"{what} batch {i} y", parts=arity[1], labels=True)
        w = _weight_arrays(item[2], f"{what} batch {i} sample_weight", arity) if len(item) == 3 else None
        lengths = [_length(x, "x"), _length(y, "y")] + ([] if w is None else [_length(w, "sample_weight")])
        if len(set(lengths)) != 1:
            raise DataError(
                f"Expected x, y (and sample weights) of equal length in each batch. Received batch {i} with "
                f"{' and '.join(map(str, lengths))}."
            )
        yield x, y, w


def _iterate(data: Any, what: str):
    import keras

    if isinstance(data, keras.utils.PyDataset):
        n = data.num_batches
        if n is None:
            raise DataError(f"Expected a PyDataset of finite length for {what}. Received one without __len__.")
        for i in range(n):
            yield data[i]
        return
    if type(data).__module__.startswith("tensorflow"):
        if int(data.cardinality()) == -1:  # INFINITE_CARDINALITY
            raise DataError(f"Expected a finite tf.data.Dataset for {what}. Received an infinite one; add .take(n).")
        yield from data.as_numpy_iterator()
        return
    raise DataError(
        f"Expected {what} to be an (x, y) tuple of arrays, a tf.data.Dataset or a keras.utils.PyDataset. "
        f"Received: {describe(data)}."
    )


def to_arrays(value: Any, what: str, *, parts: int | None = None, labels: bool = False) -> Any:
    """``value`` as a NumPy array, or a list/dict of them for a model with ``parts`` > 1 inputs (or outputs).

    A nested Python list is one array for a one-input model; float inputs become float32.

    >>> to_arrays([[1, 2], [3, 4]], "x", parts=1).shape
    (2, 2)
    """
    if value is None:
        raise DataError(f"Expected {what} to be an array. Received None.")
    if isinstance(value, dict):
        return {k: to_arrays(v, f"{what}[{k!r}]", parts=1, labels=labels) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and parts is not None and parts > 1:
        if len(value) != parts:
            kind = "outputs" if labels else "inputs"
            raise DataError(
                f"Expected {what} as a list of {parts} arrays, one per model {kind[:-1]}: the model has "
                f"{parts} {kind}. Received a {type(value).__name__} of {len(value)} elements."
            )
        return [to_arrays(v, f"{what}[{i}]", parts=1, labels=labels) for i, v in enumerate(value)]
    if (
        isinstance(value, (list, tuple))
        and parts is None
        and not labels
        and value
        and all(hasattr(v, "shape") for v in value)
    ):
        return [to_arrays(v, f"{what}[{i}]", parts=1) for i, v in enumerate(value)]
    return _one_array(value, what, labels)


def _one_array(value: Any, what: str, labels: bool) -> np.ndarray:
    import keras

    try:
        array = np.asarray(keras.ops.convert_to_numpy(value) if hasattr(value, "shape") else value)
    except Exception as exc:  # ragged lists, objects: NumPy and the backends raise many kinds
        raise DataError(
            f"Expected {what} to be an array of numbers. Received: {describe(value)} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})."
        ) from None
    if array.ndim == 0:
        raise DataError(f"Expected {what} with a batch dimension. Received a scalar ({describe(value)}).")
    if array.dtype.kind not in "biuf":
        raise DataError(f"Expected {what} to be numeric. Received dtype {array.dtype}.")
    if array.dtype.kind == "f" and array.dtype != np.float32 and not labels:
        array = array.astype(np.float32)
    return array


def _length(x: Any, what: str) -> int:
    import keras

    lengths = {len(a) for a in keras.tree.flatten(x)}
    if len(lengths) != 1:
        raise DataError(
            f"Expected all arrays in {what} to have the same number of samples. Received lengths {sorted(lengths)}."
        )
    return lengths.pop()


def _leaves(value: Any) -> list:
    import keras

    return keras.tree.flatten(value)


def _nbytes(x: Any) -> int:
    import keras

    return int(sum(a.nbytes for a in keras.tree.flatten(x)))


def _concat(parts: list) -> Any:
    import keras

    return keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)


def _finite_rows(x: Any, y: Any, what: str, mode: str, *, offset: int, quiet: bool = False) -> np.ndarray | None:
    """None when every sample is finite; else the mask of finite samples (mode 'drop') or raise."""
    import keras

    n = _length(x, what)
    good = np.ones(n, bool)
    for a in keras.tree.flatten(x) + keras.tree.flatten(y):
        if a.dtype.kind == "f":
            good &= np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if good.all():
        return None
    bad = int((~good).sum())
    if mode == "raise":
        raise DataError(
            f"Expected finite values in {what}. Received {bad} sample(s) with NaN or inf (first at sample "
            f"{offset + int(np.argmin(good))}). A non-finite input makes every precision look alike. Clean the data, "
            "or pass nonfinite_inputs='drop' to drop those samples with a warning."
        )
    if not quiet:
        logger.warning("autoprec: dropped %d sample(s) with NaN or inf from %s (nonfinite_inputs='drop').", bad, what)
    return good


def check_batch_size(value: Any, name: str) -> Any:
    """``"auto"`` or a positive integer, else :class:`ArgumentError`."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"Expected {name} to be a positive integer or 'auto'. Received: {name}={describe(value)}.")
    return int(value)
