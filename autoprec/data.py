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
array per model output.

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
    ) -> None:
        self._source, self.n, self.y, self.batch_size, self._sample, self.what = source, n, y, batch_size, sample, what

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
                or a ``keras.utils.PyDataset``. A third element (sample
                weights) is ignored. An ``EvalData`` is re-batched.
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
        for x, y in self._source():
            n = _length(x, self.what)
            if n <= self.batch_size:
                yield x, y
                continue
            for i in range(0, n, self.batch_size):
                yield _slice(x, i, i + self.batch_size), _slice(y, i, i + self.batch_size)

    def rebatch(self, batch_size: int) -> EvalData:
        """The same data read in batches of at most ``batch_size`` (no copy)."""
        return EvalData(self._source, n=self.n, y=self.y, batch_size=batch_size, sample=self._sample, what=self.what)

    def map_labels(self, fix: Callable[[Any], Any]) -> EvalData:
        """The same data with ``fix`` applied to the labels of every batch (and to ``y``); no copy of ``x``."""
        source = self._source

        def fixed() -> Iterator[tuple[Any, Any]]:
            for x, y in source():
                yield x, fix(y)

        return EvalData(fixed, n=self.n, y=fix(self.y), batch_size=self.batch_size, sample=self._sample, what=self.what)

    def split(self, fraction: float, *, seed: int = 0) -> tuple[EvalData, EvalData]:
        """A seeded random ``fraction`` of the samples held out: ``(the rest, the held-out part)``.

        Each part reads the same source and keeps its samples' order; a part
        that fits ``DEFAULT_CACHE_BYTES`` is kept in memory after its first pass.

        >>> rest, held = EvalData.get((np.arange(10.0)[:, None], np.arange(10))).split(0.3)
        >>> rest.n, held.n, sorted(set(rest.y) | set(held.y)) == list(range(10))
        (7, 3, True)
        """
        held = self._mask(int(round(fraction * self.n)), seed)
        return self._subset(~held), self._subset(held)

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
        return EvalData(
            part, n=int(mask.sum()), y=_take(self.y, mask), batch_size=self.batch_size, sample=sample, what=what
        )

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
    if len(data) == 3:
        _check_weights(data[2], f"{what}[2] (sample_weight)")
    x = to_arrays(data[0], f"{what}[0] (x)", parts=arity[0])
    y = to_arrays(data[1], f"{what}[1] (y)", parts=arity[1], labels=True)
    n = _length(x, f"{what}[0] (x)")
    if n == 0:
        raise DataError(f"Expected {what} to hold at least one sample. Received an empty x.")
    if _length(y, f"{what}[1] (y)") != n:
        raise DataError(
            f"Expected x and y with the same number of samples. Received: x has {n}, y has {_length(y, 'y')}."
        )
    keep = _finite_rows(x, y, what, nonfinite, offset=0)
    if keep is not None:
        x, y, n = _take(x, keep), _take(y, keep), int(keep.sum())
    return EvalData(lambda: iter([(x, y)]), n=n, y=y, batch_size=batch_size, sample=_slice(x, 0, 2), what=what)


def _check_weights(weights: Any, what: str) -> None:
    """Accept sample weights that weigh every sample (or token) alike; refuse the rest with a clear error.

    The metric, the budget's bound and the early stop count every sample and every token of a sequence equally:
    weights that differ (a padding mask over sequences of different lengths) would be ignored, and the metric
    would silently differ from Keras's ``evaluate`` with them.

    >>> _check_weights(np.ones((2, 3)), "data[2]")
    >>> _check_weights(np.array([[1, 1, 0]]), "data[2]")
    Traceback (most recent call last):
    ...
    autoprec.errors.DataError: Expected sample weights that are all equal ...
    """
    if weights is None:
        return
    import keras

    parts = [np.asarray(keras.ops.convert_to_numpy(w), np.float64).ravel() for w in keras.tree.flatten(weights)]
    values = np.concatenate(parts) if parts else np.zeros(0)
    if values.size and (np.all(values == values[0]) and values[0] > 0):
        return
    zeros = int(np.count_nonzero(values == 0))
    raise DataError(
        f"Expected sample weights that are all equal and positive in {what}: autoprec weighs every sample and "
        f"every token of a sequence alike. Received weights from {values.min():g} to {values.max():g} "
        f"({zeros} of {values.size} zero, as a padding mask has). Pass (x, y) pairs whose samples all count: "
        "sequences of one length (pack or bucket them), or only the unpadded evaluation samples."
    )


def _take(value: Any, mask: np.ndarray) -> Any:
    import keras

    return keras.tree.map_structure(lambda a: a[mask], value)


def _from_batches(data: Any, batch_size: int, what: str, arity: tuple, nonfinite: str, cache_bytes: int) -> EvalData:
    """A dataset: read it once to check it; keep it in memory when small, else re-read it each pass."""
    kept, labels, nbytes, total, sample = [], [], 0, 0, None
    for i, (x, y) in enumerate(_read_batches(data, what, arity)):
        keep = _finite_rows(x, y, f"{what} batch {i}", nonfinite, offset=total)
        total += _length(x, "x")
        if keep is not None:
            x, y = _take(x, keep), _take(y, keep)
        if _length(y, "y") == 0:
            continue
        sample = x if sample is None else sample
        labels.append(y)
        nbytes += _nbytes(x)
        if nbytes <= cache_bytes:
            kept.append((x, y))
    if not labels:
        raise DataError(f"Expected {what} to hold at least one sample. Received an empty dataset.")
    y_all = _concat(labels)
    n = _length(y_all, "y")
    if len(kept) == len(labels):
        return EvalData(lambda: iter(kept), n=n, y=y_all, batch_size=batch_size, sample=_slice(sample, 0, 2), what=what)
    logger.info(
        "autoprec: %s holds %.2g GB of inputs, more than cache_bytes; it is read again on every pass.",
        what,
        nbytes / 1e9,
    )
    source = _StreamingSource(data, what, arity, nonfinite, labels)
    return EvalData(source, n=n, y=y_all, batch_size=batch_size, sample=_slice(sample, 0, 2), what=what)


class _StreamingSource:
    """Iterate a large dataset again, checking it yields the same labels in the same order."""

    def __init__(self, data: Any, what: str, arity: tuple, nonfinite: str, labels: list) -> None:
        self.data, self.what, self.arity, self.nonfinite, self.labels = data, what, arity, nonfinite, labels

    def __call__(self) -> Iterator[tuple[Any, Any]]:
        import keras

        expected = iter(self.labels)
        for i, (x, y) in enumerate(_read_batches(self.data, self.what, self.arity)):
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


def _read_batches(data: Any, what: str, arity: tuple) -> Iterator[tuple[Any, Any]]:
    for i, item in enumerate(_iterate(data, what)):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise DataError(
                f"Expected {what} to yield (x, y) batches. Received batch {i} as {describe(item)}. "
                "Map the dataset to (features, labels) pairs first."
            )
        if len(item) == 3:
            _check_weights(item[2], f"{what} batch {i} sample_weight")
        x = to_arrays(item[0], f"{what} batch {i} x", parts=arity[0])
        y = to_arrays(item[1], f"{what} batch {i} y", parts=arity[1], labels=True)
        if _length(x, "x") != _length(y, "y"):
            raise DataError(
                f"Expected x and y of equal length in each batch. Received batch {i} with "
                f"{_length(x, 'x')} and {_length(y, 'y')}."
            )
        yield x, y


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
