"""The metric the budget is measured on, the loss gradients are taken of, and label checks.

A :class:`Metric` computes one number over the whole evaluation data. Where
it is a mean of per-sample values (accuracy, a loss, Keras's
``MeanMetricWrapper`` metrics) it also carries ``per_sample``, a function of
Keras ops that runs inside the engine's traced pass; a search can then stop
a trial as soon as its drop is certain (see ``session``). A multi-output
model is measured on one named output (``metric={"out_a": "accuracy"}``) or
with a callable over all outputs.

>>> import numpy as np
>>> m = Metric.get("accuracy", y=np.array([0, 1]), y_pred=np.eye(2))
>>> m.compute(np.array([0, 1]), np.eye(2)), m.higher_is_better, m.bounds
(1.0, True, (0.0, 1.0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoprec.errors import DataError, MetricError, describe

_NON_NEGATIVE = ("crossentropy", "squared", "absolute", "hinge", "poisson", "logcosh", "huber", "kl_divergence")


@dataclass(frozen=True)
class Metric:
    """A metric over whole arrays, with the output it reads.

    Attributes:
        name: its name in reports.
        higher_is_better: the direction of improvement.
        fn: ``(y_true, y_pred) -> float`` over all samples (NumPy in); one that
            ``weighs`` also takes ``sample_weight``.
        per_sample: ``(y_true, y_pred, sample_weight=None) -> (batch,)`` in Keras
            ops, whose mean is the metric; None when the metric is not a mean
            (AUC, a callable). Weights scaled to a mean of one (as
            :class:`~autoprec.data.EvalData` keeps them) keep it so: the mean
            is then Keras's weighted mean.
        bounds: the range of one per-sample value, when known.
        output: the index of the model output it reads (None: the only output,
            or all outputs for a callable).
        weighs: ``fn`` takes sample weights (a plain callable does not).
    """

    name: str
    higher_is_better: bool
    fn: Callable[..., float]
    per_sample: Callable[..., Any] | None = None
    bounds: tuple[float, float] | None = None
    output: int | str | None = None
    weighs: bool = True

    @classmethod
    def get(
        cls, metric: Any = None, *, model: Any = None, y: Any, y_pred: Any, higher_is_better: bool | None = None
    ) -> Metric:
        """Turn ``metric=`` into a :class:`Metric`.

        ``None`` means the model's first compiled metric, else its compiled
        loss. A string is a Keras metric name (``"accuracy"`` picks sparse,
        categorical or binary accuracy from the labels), else a Keras loss
        name. A Keras ``Metric`` instance is cloned per evaluation. A plain
        callable ``(y_true, y_pred) -> float`` needs ``higher_is_better``. For
        a model with several outputs, ``{output_name: metric}`` names the one
        output to measure; a callable receives them all.
        """
        return _resolve(metric, model, y, y_pred, higher_is_better)

    def select(self, y_true: Any, y_pred: Any) -> tuple[Any, Any]:
        """The labels and predictions of the output this metric reads."""
        if self.output is None:
            return y_true, single(y_pred)
        return _pick(y_true, self.output), _pick(y_pred, self.output)

    def weights_of(self, sample_weight: Any) -> Any:
        """The sample weights of the output this metric reads: its own where there is one per output, else all.

        >>> m = Metric("acc", True, None, output=1)
        >>> m.weights_of([np.ones(2), np.zeros(2)]).tolist(), m.weights_of(np.ones(2)).tolist()
        ([0.0, 0.0], [1.0, 1.0])
        """
        if sample_weight is None or not isinstance(sample_weight, (list, tuple, Mapping)):
            return sample_weight
        if self.output is None:
            return single(sample_weight)
        if isinstance(self.output, str) and not isinstance(sample_weight, Mapping):
            raise DataError(
                f"Expected sample weights keyed by output name, as the model's outputs are, to find those of "
                f"{self.output!r}. Received a {type(sample_weight).__name__} of {len(sample_weight)}. Pass "
                f"{{{self.output!r}: weights, ...}}, or one array for every output."
            )
        return _pick(sample_weight, self.output)

    def labels_of(self, y_true: Any) -> Any:
        """The labels of the output this metric reads (all of them for a callable over every output)."""
        return single(y_true) if self.output is None else _pick(y_true, self.output)

    def compute(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
        """The metric over whole arrays, weighted by ``sample_weight`` (all of it; this metric's part is read)."""
        yt, yp = self.select(y_true, y_pred)
        w = self.weights_of(sample_weight)
        try:
            if self.per_sample is not None:
                return float(np.mean(self.values(yt, yp, w)))
            return float(self.fn(yt, yp) if w is None else self.fn(yt, yp, w))
        except (ValueError, TypeError) as exc:
            raise MetricError(
                f"Metric {self.name!r} could not be computed on these labels and outputs: {exc}"
            ) from None

    def values(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> np.ndarray:
        """Per-sample values (NumPy) of an already selected output and its weights."""
        import keras

        if self.per_sample is None:  # callers ask only a metric that is a mean (AUC or a callable is not)
            raise TypeError(f"Expected a metric with per-sample values. Received {self.name!r}, which has none.")
        out = self.per_sample(y_true, y_pred, sample_weight)  # every per_sample takes None for no weights
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64)


def single(y_pred: Any) -> Any:
    """The array itself for a one-output model, even one built with ``outputs=[t]`` (a list of one).

    >>> single([np.zeros(2)]).shape
    (2,)
    """
    if isinstance(y_pred, (list, tuple)) and len(y_pred) == 1:
        return y_pred[0]
    if isinstance(y_pred, dict) and len(y_pred) == 1:
        return next(iter(y_pred.values()))
    return y_pred


def _pick(value: Any, output: int | str) -> Any:
    if isinstance(value, Mapping):
        return value[output] if output in value else list(value.values())[output if isinstance(output, int) else 0]
    return value[output]


def _is_multi(y_pred: Any) -> bool:
    return isinstance(single(y_pred), (list, tuple, dict))


def _resolve(metric: Any, model: Any, y: Any, y_pred: Any, higher_is_better: bool | None) -> Metric:
    import keras

    if metric is None and not _is_multi(y_pred):
        metric = _compiled_metric(model)
    if _is_multi(y_pred) and not callable(metric) or isinstance(metric, Mapping):
        return _per_output(metric, model, y, y_pred, higher_is_better)
    y_pred = single(y_pred)
    if isinstance(metric, keras.metrics.Metric):
        return _keras_metric(metric, higher_is_better)
    if isinstance(metric, str):
        return _named_metric(metric, y, y_pred, higher_is_better)
    if isinstance(metric, keras.losses.Loss):
        return Metric(metric.name, False, metric, per_sample=_per_sample(metric.call), bounds=_loss_bounds(metric.name))
    if callable(metric):
        if higher_is_better is None:
            raise MetricError(
                f"Expected higher_is_better=True or False with a callable metric. Received metric={describe(metric)} "
                "without it; autoprec cannot tell whether a larger value is better."
            )
        return Metric(getattr(metric, "__name__", "metric"), bool(higher_is_better), metric, weighs=False)
    raise MetricError(
        f"Expected metric to be None, a Keras metric name or instance, a Keras loss, or a callable. "
        f"Received: {describe(metric)}."
    )


def _per_output(metric: Any, model: Any, y: Any, y_pred: Any, higher_is_better: bool | None) -> Metric:
    if not _is_multi(y_pred) and isinstance(metric, Mapping) and len(metric) == 1:
        return _resolve(next(iter(metric.values())), model, y, y_pred, higher_is_better)  # one output: just its metric
    names = list(
        getattr(model, "output_names", None) or (list(y_pred) if isinstance(y_pred, dict) else range(len(y_pred)))
    )
    hint = (
        f"Pass metric={{{names[0]!r}: 'accuracy'}} to measure one output, or metric=callable(y_true, y_pred) -> "
        "float with higher_is_better= to combine them (it receives the outputs and labels as lists or dicts)."
    )
    if not isinstance(metric, Mapping) or len(metric) != 1:
        raise MetricError(
            f"Expected one metric for a model with {len(names)} outputs ({names}). Received: "
            f"metric={describe(metric)}. {hint}"
        )
    ((name, inner),) = metric.items()
    if name not in names:
        raise MetricError(f"Expected an output name among {names}. Received metric={{{name!r}: ...}}. {hint}")
    index = names.index(name) if not isinstance(y_pred, dict) else name
    resolved = _resolve(inner, None, _pick(y, index), _pick(y_pred, index), higher_is_better)
    return Metric(
        f"{name}/{resolved.name}",
        resolved.higher_is_better,
        resolved.fn,
        resolved.per_sample,
        resolved.bounds,
        output=index,
        weighs=resolved.weighs,
    )


def _per_sample(fn: Callable, **kwargs: Any) -> Callable:
    """Per-sample values of an element-wise metric function: mean over every axis but the batch.

    With weights, Keras's own reduction (that of its ``Mean`` metrics): ``mean(w * v)`` within each sample, the
    weights broadcast to the values as ``evaluate`` broadcasts them.
    """

    def values(y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        from keras import ops

        out = ops.cast(fn(y_true, y_pred, **kwargs), "float32")
        if sample_weight is not None:
            from keras.src.metrics.reduction_metrics import reduce_to_samplewise_values

            return reduce_to_samplewise_values(out, sample_weight, reduce_fn=ops.mean, dtype="float32")[0]
        return ops.mean(ops.reshape(out, (ops.shape(out)[0], -1)), axis=1) if len(out.shape) > 1 else out

    return values


def _loss_bounds(name: str) -> tuple[float, float] | None:
    return (0.0, math.inf) if any(k in name.lower() for k in _NON_NEGATIVE) else None


def _keras_metric(metric: Any, higher_is_better: bool | None) -> Metric:
    import keras

    config, cls = metric.get_config(), metric.__class__

    def whole(yt: Any, yp: Any, sample_weight: Any = None) -> float:
        m = cls.from_config(config)
        m.update_state(yt, yp, sample_weight=sample_weight)
        return float(keras.ops.convert_to_numpy(m.result()))

    direction = getattr(metric, "_direction", None)
    hib = (
        higher_is_better
        if higher_is_better is not None
        else (direction == "up" if direction else _name_says_up(metric.name))
    )
    per_sample, bounds = None, None
    if isinstance(metric, keras.metrics.MeanMetricWrapper):
        per_sample = _per_sample(metric._fn, **metric._fn_kwargs)
        bounds = (0.0, 1.0) if "accuracy" in type(metric).__name__.lower() else _loss_bounds(metric.name)
    return Metric(metric.name, hib, whole, per_sample, bounds)


def _compiled_metric(model: Any) -> Any:
    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    flat: list[Any] = []
    for metrics in (config.get("metrics"), config.get("weighted_metrics")):  # a model may have only weighted ones
        for value in (
            metrics.values()
            if isinstance(metrics, dict)
            else metrics
            if isinstance(metrics, (list, tuple))
            else [metrics]
        ):
            flat.extend(value if isinstance(value, (list, tuple)) else [value])
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
    return not any(
        k in name for k in ("loss", "error", "entropy", "mse", "mae", "hinge", "divergence", "poisson", "logcosh")
    )


def _named_metric(name: str, y: Any, y_pred: Any, higher_is_better: bool | None) -> Metric:
    import keras

    if name.lower() in ("accuracy", "acc"):
        kind = label_kind(y, y_pred)
        pred = np.asarray(y_pred)
        if pred.shape[-1] == 1 or pred.ndim == 1:
            metric = keras.metrics.BinaryAccuracy(name="accuracy")
        elif kind == "sparse":
            metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        else:
            metric = keras.metrics.CategoricalAccuracy(name="accuracy")
        return _keras_metric(metric, higher_is_better)
    try:
        metric = keras.metrics.get(name)
    except (ValueError, TypeError):
        metric = None
    if isinstance(metric, keras.metrics.Metric):
        return _keras_metric(metric, higher_is_better)
    try:
        fn = keras.losses.get(name)
    except (ValueError, TypeError):
        fn = metric if callable(metric) else None
    if fn is None:
        raise MetricError(
            f"Expected a Keras metric or loss name. Received: metric={name!r}, which Keras does not know."
        )
    hib = higher_is_better if higher_is_better is not None else _name_says_up(name)
    per_sample = _per_sample(fn)

    def whole(yt: Any, yp: Any, w: Any = None) -> float:
        return float(np.mean(keras.ops.convert_to_numpy(per_sample(yt, yp, w))))

    return Metric(
        name,
        hib,
        whole,
        per_sample,
        _loss_bounds(name),
    )


def label_kind(y: Any, y_pred: Any) -> str:
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


def label_reshaper(y: Any, y_pred: Any) -> Any:
    """A function giving labels of shape ``(batch,)`` a trailing axis where their output is ``(batch, 1)``, or None.

    Keras itself accepts ``y`` of shape ``(n,)`` for an output of shape
    ``(n, 1)`` (a regression head, a sigmoid); the per-sample metrics need the
    shapes to agree, or ``(n,)`` against ``(n, 1)`` would broadcast to ``(n, n)``.

    >>> import numpy as np
    >>> label_reshaper(np.zeros(4), np.zeros((4, 1)))(np.zeros(4)).shape
    (4, 1)
    """

    def needs(label: Any, pred: Any) -> bool:
        label, pred = np.asarray(label), np.asarray(pred)
        return pred.ndim >= 2 and pred.shape[-1] == 1 and label.shape == pred.shape[:-1]

    pred = single(y_pred)
    if not isinstance(pred, (list, tuple, dict)):
        label = single(y)
        if isinstance(label, (list, tuple, dict)) or not needs(label, pred):
            return None
        return lambda labels: np.asarray(single(labels))[..., None]
    keys = list(pred) if isinstance(pred, dict) else list(range(len(pred)))
    if not isinstance(y, (list, tuple, dict)) or len(y) != len(keys):
        return None
    fixes = {k for i, k in enumerate(keys) if needs(_pick(y, k if isinstance(y, dict) else i), pred[k])}
    if not fixes:
        return None

    def fix(labels: Any) -> Any:
        if isinstance(labels, dict):
            return {k: (np.asarray(v)[..., None] if k in fixes else v) for k, v in labels.items()}
        return type(labels)(np.asarray(v)[..., None] if keys[i] in fixes else v for i, v in enumerate(labels))

    return fix


def check_labels(model: Any, y: Any, y_pred: Any, *, what: str) -> None:
    """Raise :class:`DataError` when labels cannot fit the outputs or the compiled loss.

    One-hot labels with a sparse loss, class ids with a categorical one, and
    ids out of range are caught here with the fix, not deep inside Keras.
    """
    pairs = _label_pairs(y, y_pred, _loss_names(model))
    for key, (yk, pk, loss) in pairs.items():
        where = f"{what}" + (f" for output {key!r}" if len(pairs) > 1 else "")
        try:
            kind = label_kind(yk, pk)
        except DataError as exc:
            raise DataError(f"{exc} ({where})") from None
        lowered = (loss or "").lower()
        if "sparse" in lowered and kind == "dense" and np.asarray(pk).shape[-1] > 1:
            raise DataError(
                f"Expected class ids with the sparse loss {loss!r}. Received one-hot labels of shape "
                f"{np.shape(yk)} in {where}. Pass y.argmax(-1), or compile with 'categorical_crossentropy'."
            )
        if "categorical" in lowered and "sparse" not in lowered and kind == "sparse":
            raise DataError(
                f"Expected one-hot labels with the loss {loss!r}. Received class ids of shape {np.shape(yk)} "
                f"in {where}. Pass keras.utils.to_categorical(y), or compile with 'sparse_categorical_crossentropy'."
            )


def _label_pairs(y: Any, y_pred: Any, losses: Any) -> dict[Any, tuple[Any, Any, str | None]]:
    y_pred = single(y_pred)
    if not isinstance(y_pred, (list, tuple, dict)):
        return {0: (single(y), y_pred, losses if isinstance(losses, str) else None)}
    keys = list(y_pred) if isinstance(y_pred, dict) else list(range(len(y_pred)))
    if not isinstance(y, (list, tuple, dict)) or len(y) != len(keys):
        raise DataError(
            f"Expected labels for each of the model's {len(keys)} outputs, as a list or dict. "
            f"Received y of type {type(y).__name__}."
        )
    out = {}
    for i, key in enumerate(keys):
        loss = (
            losses.get(key) if isinstance(losses, dict) else losses[i] if isinstance(losses, (list, tuple)) else losses
        )
        out[key] = (_pick(y, key if isinstance(y, dict) else i), y_pred[key], loss if isinstance(loss, str) else None)
    return out


def _loss_names(model: Any) -> Any:
    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    loss = config.get("loss")
    if isinstance(loss, str) or isinstance(loss, (list, tuple, dict)):
        return loss
    return getattr(loss, "name", None)


def resolve_loss(model: Any, metric: Metric, y: Any, y_pred: Any) -> Callable[..., Any]:
    """The batch-mean loss gradients are taken of: the compiled one, else one inferred from labels and outputs.

    A model compiled with one loss per output sums them with their weights;
    an uncompiled multi-output model is differentiated through the metric's output.
    The loss takes the batch's sample weights as a third argument (see :func:`_batch_mean`).
    """
    import keras

    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    loss, weights = config.get("loss"), config.get("loss_weights")
    if isinstance(loss, (list, tuple, dict)):
        keys = list(loss) if isinstance(loss, dict) else list(range(len(loss)))
        fns = {k: keras.losses.get(loss[k]) for k in keys if loss[k] is not None}
        lw = {k: (weights[k] if isinstance(weights, (dict, list, tuple)) else 1.0) for k in fns}
        return lambda yt, yp, w=None: sum(
            lw[k] * _batch_mean(fns[k], _pick(yt, k), _pick(yp, k), _pick(w, k) if _is_multi(w) else w) for k in fns
        )
    if loss is not None:
        fn = keras.losses.get(loss) if isinstance(loss, str) else loss
        if not _is_multi(y_pred):
            return lambda yt, yp, w=None: _batch_mean(fn, single(yt), single(yp), metric.weights_of(w))
    yt, yp = metric.select(y, y_pred) if _is_multi(y_pred) else (y, single(y_pred))
    inferred = _inferred_loss(yt, yp)
    if metric.output is None:
        return lambda t, p, w=None: _batch_mean(inferred, t, single(p), metric.weights_of(w))
    return lambda t, p, w=None: _batch_mean(inferred, *metric.select(t, p), metric.weights_of(w))


def _batch_mean(fn: Callable, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
    """A loss's mean over a batch; under sample weights, Keras's weighted one: ``mean(w * loss)`` within each
    sample, then over the samples (weights kept at a mean of one, as :class:`~autoprec.data.EvalData` has them, so
    that a weighted loss is on the scale of an unweighted one)."""
    import keras
    from keras import ops

    if sample_weight is None:
        return ops.mean(fn(y_true, y_pred))
    from keras.src.metrics.reduction_metrics import reduce_to_samplewise_values

    values = fn.call(y_true, y_pred) if isinstance(fn, keras.losses.Loss) else fn(y_true, y_pred)
    return ops.mean(reduce_to_samplewise_values(values, sample_weight, reduce_fn=ops.mean, dtype="float32")[0])


def _inferred_loss(y: Any, y_pred: Any):
    import keras

    pred = np.asarray(y_pred)
    kind = label_kind(y, pred)
    probabilities = pred.ndim >= 2 and np.allclose(pred.sum(-1), 1.0, atol=1e-3) and pred.min() >= 0
    if kind == "sparse":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    if pred.shape[-1] > 1 and probabilities:
        return keras.losses.CategoricalCrossentropy()
    return keras.losses.MeanSquaredError()


def units_per_sample(y: Any, weights: Any = None) -> float:
    """How many values a per-sample metric averages over in one sample: 1, or the tokens of a sequence label.

    Keras's accuracy and losses on a ``(batch, steps, classes)`` output average
    over every step: integer labels ``(batch, steps)`` hold ``steps`` of them,
    one-hot labels ``(batch, steps, classes)`` too. Under sample weights
    (the metric's own, see :meth:`Metric.weights_of`) only those weighed above
    zero count, on average over the samples: a padding mask's real tokens.

    >>> units_per_sample(np.zeros((8, 128), "int32")), units_per_sample(np.zeros((8, 10), "float32"))
    (128.0, 1.0)
    >>> units_per_sample(np.zeros((2, 4), "int32"), np.array([[1, 1, 1, 0], [1, 1, 0, 0]]))
    2.5
    """
    import keras

    first = np.asarray(keras.tree.flatten(y)[0]) if keras.tree.flatten(y) else np.zeros((0,))
    dims = () if first.ndim <= 1 else first.shape[1:] if np.issubdtype(first.dtype, np.integer) else first.shape[1:-1]
    steps = float(np.prod(dims)) if len(dims) else 1.0
    if weights is None:
        return steps
    w = np.asarray(weights)
    return float(steps * np.count_nonzero(w) / max(w.size, 1))


def sample_scales(weights: Any, n: int) -> np.ndarray:
    """Each sample's share of the metric against an unweighted sample: the mean of its weights (ones without).

    A per-sample value then lies within ``scale`` times the metric's range (see
    :attr:`Metric.bounds`).

    >>> sample_scales(np.array([[2.0, 2.0], [0.0, 0.0]]), 2).tolist(), sample_scales(None, 2).tolist()
    ([2.0, 0.0], [1.0, 1.0])
    """
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, np.float64)
    return w.reshape(len(w), -1).mean(axis=1)
