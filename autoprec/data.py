"""Evaluation data and the metric, checked once and made uniform.

Data arrives as an ``(x, y)`` tuple of arrays, a ``tf.data.Dataset`` of
``(x, y)``, or a ``keras.utils.PyDataset``; it is read once into a list of
NumPy batches that every later pass reuses, so an evaluation sees the same
samples in the same order every time.

>>> import numpy as np
>>> data = as_eval_data((np.zeros((10, 3)), np.zeros(10)), batch_size=4)
>>> data.n, len(data.batches)
(10, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoprec.errors import DataError, MetricError, describe

DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class EvalData:
    """Batches of ``(x, y)`` as NumPy arrays (``x`` may be a list or dict of arrays)."""

    batches: tuple[tuple[Any, np.ndarray], ...]

    @property
    def n(self) -> int:
        return int(sum(len(y) for _, y in self.batches))

    @property
    def y(self) -> np.ndarray:
        return np.concatenate([y for _, y in self.batches])

    def x_sample(self, k: int = 2) -> Any:
        """The first ``k`` inputs of the first batch."""
        import keras

        return keras.tree.map_structure(lambda a: a[:k], self.batches[0][0])


def as_eval_data(data: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, what: str = "data") -> EvalData:
    """Read evaluation data into NumPy batches, with clear errors for bad input.

    Args:
        data: ``(x, y)`` arrays, a ``tf.data.Dataset`` yielding ``(x, y)``, or
            a ``keras.utils.PyDataset``. A third element (sample weights) is ignored.
        batch_size: batch size used for arrays (datasets keep their own).
        what: the argument's name, for error messages.

    Example:
        >>> import numpy as np
        >>> as_eval_data((np.ones((5, 2)), np.ones(5))).n
        5
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"Expected batch_size to be a positive integer. Received: batch_size={describe(batch_size)}.")
    if isinstance(data, EvalData):
        return data
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 3):
            raise DataError(
                f"Expected {what} as an (x, y) tuple of arrays. Received a {type(data).__name__} of "
                f"{len(data)} elements. Pass (x_val, y_val)."
            )
        x, y = _to_numpy(data[0], f"{what}[0] (x)"), _to_numpy(data[1], f"{what}[1] (y)", labels=True)
        n = _length(x, f"{what}[0] (x)")
        if n == 0:
            raise DataError(f"Expected {what} to hold at least one sample. Received an empty x.")
        if len(y) != n:
            raise DataError(f"Expected x and y with the same number of samples. Received: x has {n}, y has {len(y)}.")
        import keras

        batches = tuple(
            (keras.tree.map_structure(lambda a: a[i : i + batch_size], x), y[i : i + batch_size])
            for i in range(0, n, batch_size)
        )
        return EvalData(batches)
    batches = []
    for i, item in enumerate(_iterate(data, what)):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise DataError(
                f"Expected {what} to yield (x, y) batches. Received batch {i} as {describe(item)}. "
                "Map the dataset to (features, labels) pairs first."
            )
        x, y = _to_numpy(item[0], f"{what} batch {i} x"), _to_numpy(item[1], f"{what} batch {i} y", labels=True)
        if _length(x, "x") != len(y):
            raise DataError(f"Expected x and y of equal length in each batch. Received batch {i} with {_length(x, 'x')} and {len(y)}.")
        if len(y):
            batches.append((x, y))
    if not batches:
        raise DataError(f"Expected {what} to hold at least one sample. Received an empty dataset.")
    return EvalData(tuple(batches))


def _iterate(data: Any, what: str):
    import keras

    if isinstance(data, keras.utils.PyDataset):
        n = data.num_batches
        if n is None:
            raise DataError(f"Expected a PyDataset of finite length for {what}. Received one without __len__.")
        for i in range(n):
            yield data[i]
        return
    module = type(data).__module__
    if module.startswith("tensorflow"):
        cardinality = int(data.cardinality())
        if cardinality == -1:  # INFINITE_CARDINALITY
            raise DataError(f"Expected a finite tf.data.Dataset for {what}. Received an infinite one; add .take(n).")
        yield from data.as_numpy_iterator()
        return
    raise DataError(
        f"Expected {what} to be an (x, y) tuple of arrays, a tf.data.Dataset or a keras.utils.PyDataset. "
        f"Received: {describe(data)}."
    )


def _to_numpy(value: Any, what: str, *, labels: bool = False) -> Any:
    import keras

    if value is None:
        raise DataError(f"Expected {what} to be an array. Received None.")
    if isinstance(value, (dict, list, tuple)) and not labels:
        return keras.tree.map_structure(lambda a: _to_numpy(a, what), value)
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value) if hasattr(value, "shape") else value)
    except Exception as exc:
        raise DataError(f"Expected {what} to be an array. Received: {describe(value)} ({exc}).") from None
    if array.ndim == 0:
        raise DataError(f"Expected {what} with a batch dimension. Received a scalar.")
    if array.dtype.kind not in "biuf":
        raise DataError(f"Expected {what} to be numeric. Received dtype {array.dtype}.")
    if array.dtype.kind == "f" and array.dtype != np.float32 and not labels:
        array = array.astype(np.float32)
    return array


def _length(x: Any, what: str) -> int:
    import keras

    lengths = {len(a) for a in keras.tree.flatten(x)}
    if len(lengths) != 1:
        raise DataError(f"Expected all inputs in {what} to have the same number of samples. Received lengths {sorted(lengths)}.")
    return lengths.pop()


def check_inputs_fit(model: Any, data: EvalData) -> None:
    """Raise :class:`DataError` when x's shape cannot feed the model's inputs."""
    import keras

    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    xs = keras.tree.flatten(data.batches[0][0])
    if len(xs) != len(inputs):
        raise DataError(f"Expected {len(inputs)} input array(s) for the model. Received {len(xs)}.")
    for array, spec in zip(xs, inputs):
        want = tuple(spec.shape[1:])
        got = tuple(array.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise DataError(
                f"Expected inputs of shape (batch, {', '.join('?' if w is None else str(w) for w in want)}) "
                f"for input {spec.name!r}. Received x of shape {array.shape}. Reshape the data to fit the model."
            )


# ---------------------------------------------------------------------------
# Metric


@dataclass(frozen=True)
class Metric:
    """A metric over whole arrays: ``compute(y_true, y_pred) -> float``.

    Example:
        >>> m = resolve_metric("accuracy", y=np.array([0, 1]), y_pred=np.eye(2))
        >>> m.compute(np.array([0, 1]), np.eye(2)), m.higher_is_better
        (1.0, True)
    """

    name: str
    higher_is_better: bool
    fn: Callable[[np.ndarray, np.ndarray], float]

    def compute(self, y_true: np.ndarray, y_pred: Any) -> float:
        y_pred = single_output(y_pred)
        try:
            value = float(self.fn(y_true, y_pred))
        except (ValueError, TypeError) as exc:
            raise MetricError(f"Metric {self.name!r} could not be computed on these labels and outputs: {exc}") from None
        return value

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse); NaN stays NaN."""
        return baseline - value if self.higher_is_better else value - baseline


def single_output(y_pred: Any) -> Any:
    """The array itself for a one-output model, even one built with ``outputs=[t]`` (a list of one).

    >>> single_output([np.zeros(2)]).shape
    (2,)
    """
    if isinstance(y_pred, (list, tuple)) and len(y_pred) == 1:
        return y_pred[0]
    if isinstance(y_pred, dict) and len(y_pred) == 1:
        return next(iter(y_pred.values()))
    return y_pred


def label_kind(y: np.ndarray, y_pred: np.ndarray) -> str:
    """``'sparse'`` (class ids), ``'dense'`` (same shape as outputs) or raise DataError."""
    y, y_pred = np.asarray(y), np.asarray(y_pred)
    if y.shape == y_pred.shape:
        return "dense"
    squeezed = y[..., 0] if (y.ndim == y_pred.ndim and y.shape[-1] == 1) else y
    if squeezed.shape == y_pred.shape[:-1] and y_pred.shape[-1] > 1:
        if y.dtype.kind == "f" and not np.all(np.equal(np.mod(squeezed, 1), 0)):
            raise DataError("Expected integer class ids as labels for this output. Received non-integer values.")
        if squeezed.size and (squeezed.min() < 0 or squeezed.max() >= y_pred.shape[-1]):
            raise DataError(
                f"Expected class ids in [0, {y_pred.shape[-1] - 1}] to fit the model's {y_pred.shape[-1]} outputs. "
                f"Received labels from {squeezed.min():g} to {squeezed.max():g}."
            )
        return "sparse"
    raise DataError(
        f"Expected labels that fit the model's outputs of shape (batch, {', '.join(map(str, y_pred.shape[1:]))}): "
        f"either the same shape or class ids of shape (batch,). Received labels of shape {y.shape}."
    )


def resolve_metric(
    metric: Any = None,
    *,
    model: Any = None,
    y: np.ndarray,
    y_pred: Any,
    higher_is_better: bool | None = None,
) -> Metric:
    """Turn ``metric=`` into a :class:`Metric`.

    ``None`` means the model's first compiled metric, else its compiled loss.
    A string is a Keras metric name (``"accuracy"`` picks sparse, categorical
    or binary accuracy from the labels), else a Keras loss name. A Keras
    ``Metric`` instance is cloned per evaluation. A plain callable
    ``(y_true, y_pred) -> float`` needs ``higher_is_better``.
    """
    import keras

    y_pred = single_output(y_pred)
    if isinstance(y_pred, (list, tuple, dict)) and not callable(metric):
        raise MetricError(
            "Expected a single-output model for a named metric. Received a model with several outputs; "
            "pass metric=callable(y_true, y_pred) -> float with higher_is_better=."
        )
    if metric is None:
        metric = _compiled_metric(model)
    if isinstance(metric, keras.metrics.Metric):
        config, cls = metric.get_config(), metric.__class__

        def run_keras_metric(yt, yp, _cls=cls, _config=config):
            m = _cls.from_config(_config)
            m.update_state(yt, yp)
            return float(keras.ops.convert_to_numpy(m.result()))

        direction = getattr(metric, "_direction", None)
        hib = higher_is_better if higher_is_better is not None else (direction == "up" if direction else _name_says_up(metric.name))
        return Metric(metric.name, hib, run_keras_metric)
    if isinstance(metric, str):
        return _named_metric(metric, y, y_pred, higher_is_better)
    if isinstance(metric, keras.losses.Loss):
        return Metric(metric.name, False, lambda yt, yp, _l=metric: float(keras.ops.convert_to_numpy(_l(yt, yp))))
    if callable(metric):
        if higher_is_better is None:
            raise MetricError(
                f"Expected higher_is_better=True or False with a callable metric. Received metric={describe(metric)} "
                "without it; autoprec cannot tell whether a larger value is better."
            )
        return Metric(getattr(metric, "__name__", "metric"), bool(higher_is_better), metric)
    raise MetricError(
        f"Expected metric to be None, a Keras metric name or instance, a Keras loss, or a callable. Received: {describe(metric)}."
    )


def _compiled_metric(model: Any) -> Any:
    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    metrics = config.get("metrics")
    flat = []
    if isinstance(metrics, dict):
        for value in metrics.values():
            flat.extend(value if isinstance(value, (list, tuple)) else [value])
    elif isinstance(metrics, (list, tuple)):
        for value in metrics:
            flat.extend(value if isinstance(value, (list, tuple)) else [value])
    elif metrics is not None:
        flat.append(metrics)
    flat = [m for m in flat if m is not None]
    if flat:
        return flat[0]
    if config.get("loss") is not None and not isinstance(config["loss"], (list, dict)):
        return config["loss"]
    raise MetricError(
        "Expected metric= or a compiled model to take the metric from. Received metric=None and a model "
        "compiled without metrics or loss. Pass e.g. metric='accuracy'."
    )


def _name_says_up(name: str) -> bool:
    name = name.lower()
    return not any(k in name for k in ("loss", "error", "entropy", "mse", "mae", "hinge", "divergence", "poisson", "logcosh"))


def _named_metric(name: str, y: np.ndarray, y_pred: Any, higher_is_better: bool | None) -> Metric:
    import keras

    lowered = name.lower()
    if lowered in ("accuracy", "acc"):
        kind = label_kind(y, y_pred)
        pred = np.asarray(y_pred)
        if pred.shape[-1] == 1 or pred.ndim == 1:
            metric = keras.metrics.BinaryAccuracy(name="accuracy")
        elif kind == "sparse":
            metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        else:
            metric = keras.metrics.CategoricalAccuracy(name="accuracy")
        return resolve_metric(metric, y=y, y_pred=y_pred, higher_is_better=higher_is_better)
    try:
        metric = keras.metrics.get(name)
    except (ValueError, TypeError):
        metric = None
    if isinstance(metric, keras.metrics.Metric):
        return resolve_metric(metric, y=y, y_pred=y_pred, higher_is_better=higher_is_better)
    try:
        fn = keras.losses.get(name)
    except (ValueError, TypeError):
        fn = metric if callable(metric) else None
    if fn is None:
        raise MetricError(f"Expected a Keras metric or loss name. Received: metric={name!r}, which Keras does not know.")
    hib = higher_is_better if higher_is_better is not None else _name_says_up(name)

    def run(yt, yp, _fn=fn):
        return float(np.mean(keras.ops.convert_to_numpy(_fn(yt, yp))))

    return Metric(name, hib, run)


def resolve_loss(model: Any, y: np.ndarray, y_pred: Any):
    """The loss for gradients: the compiled one, else one inferred from labels and outputs."""
    import keras

    loss = getattr(model, "loss", None)
    if loss is not None and not isinstance(loss, (list, dict, tuple)):
        return keras.losses.get(loss) if isinstance(loss, str) else loss
    pred = np.asarray(single_output(y_pred))
    kind = label_kind(y, pred)
    probabilities = pred.ndim >= 2 and np.allclose(pred.sum(-1), 1.0, atol=1e-3) and pred.min() >= 0
    if kind == "sparse":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    if pred.shape[-1] > 1 and probabilities:
        return keras.losses.CategoricalCrossentropy()
    return keras.losses.MeanSquaredError()
