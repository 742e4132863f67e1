"""Verify the winner for real: Keras policies on the current device, and optionally training.

:func:`verify_eval` applies the assignment with real Keras policies and
scores it on the full evaluation data. :func:`train_check` fine-tunes the
tuned model and a float32 copy from the same weights, on the same batches,
for ``steps`` steps, with the LossScaleOptimizer when any layer computes in
float16, and records losses, skipped steps and the loss-scale history. It
fails the assignment when the loss scale collapses below 1, when losses go
non-finite and stay so, or when the tuned run stops making the progress the
float32 run makes. :func:`fall_back` is the one loop both use: while a check
fails, return one decision to float32, chosen by a picker.

>>> check = train_check(model, names, (x_train, y_train), graph=graph, steps=50)  # doctest: +SKIP
>>> check.passed, check.skipped_steps                                              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec.apply import apply_policy, strategy_scope
from autoprec.data import TRAIN_BATCH_SIZE, EvalData
from autoprec.engine import predict_on, predicted, quiet_retracing
from autoprec.errors import ArgumentError, DataError, UnsupportedModelError, check_int
from autoprec.formats import DEFAULT_LOSS_SCALE, FLOAT32, split
from autoprec.graph import SUBCLASSED, ModelGraph


@dataclass(frozen=True)
class TrainCheck:
    """The outcome of a short training run of the tuned model against float32."""

    steps: int
    float32_losses: list[float] = field(repr=False)
    tuned_losses: list[float] = field(repr=False)
    loss_scale: list[float] = field(repr=False)
    skipped_steps: int
    nonfinite_losses: int
    float32_metric: float
    tuned_metric: float
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Fallback:
    """One decision returned to float32 by a failed check, and what failed."""

    key: str
    check: str  # "verify" or "train"
    detail: str


def fall_back(
    assignment: dict[str, str],
    check: Callable[[dict[str, str]], tuple[bool, str]],
    pick: Callable[[dict[str, str]], str | None],
    *,
    kind: str,
    limit: int,
    say: Callable[[str], None] = lambda message: None,
    checked: tuple[bool, str] | None = None,
) -> tuple[dict[str, str], list[Fallback], bool]:
    """While ``check(assignment)`` fails, return ``pick(assignment)`` to float32, at most ``limit`` times.

    ``checked`` is the result of a check of ``assignment`` already made (the
    first check is then not repeated). Returns the final assignment, the
    fallbacks made, and whether the last check passed.
    """
    fallbacks: list[Fallback] = []
    while True:
        passed, detail = checked if checked is not None else check(assignment)
        checked = None
        if passed or len(fallbacks) >= limit:
            return assignment, fallbacks, passed
        key = pick(assignment)
        if key is None:
            return assignment, fallbacks, passed
        say(f"autoprec: {kind} check failed ({detail}); returning {key!r} to float32.")
        fallbacks.append(Fallback(key, kind, detail))
        assignment = {**assignment, key: FLOAT32}


def verify_eval(session: Any, names: dict[str, str]) -> tuple[Any, Any]:
    """Apply the resolved policy for real and score it on the full evaluation data."""
    real = _real_model(session, names)
    return real, session.score_outputs(predict_batches(real, session.data))


def real_check(session: Any, assignment: dict[str, str], *, budget: Any = None) -> Any:
    """``session.evaluate(assignment, budget=budget)`` with real Keras policies: a copy of the model carrying
    them predicts batch by batch, and the pass stops once the drop is certainly over ``budget``.

    Where this check passes and its assignment wins, the verification reuses its model and figures
    (:meth:`autoprec.session.Session.real_model`): tune's first candidate, every layer in 16-bit, is then
    scored once, not once simulated and once real (on MobileNetV2 at 224x224, 2.4 predict passes saved).

    >>> real_check(session, {"dense": "mixed_float16"}).drop  # doctest: +SKIP
    0.0
    """
    real = _real_model(session, session.graph.resolve(assignment))
    result = session.score_batches(assignment, real, functools.partial(predicted, real, session.metric), budget=budget)
    if session.real_model(assignment) is None:  # not kept: free the copy now (its layers hold cycles), not at
        del real  # the collector's leisure; a GPT2 decoder's copy held 0.26 GB through the statistics
        gc.collect()
    return result


def _real_model(session: Any, names: dict[str, str]) -> Any:
    graph = session.graph
    float8 = any(split(name)[0] == "float8" for name in names.values())
    return apply_policy(
        session.model,
        names,
        graph=graph,
        inplace=graph.kind == SUBCLASSED,
        calibration_data=session.data if float8 else None,
    )


def nonfinite_origins(model: Any, x: Any) -> list[str]:
    """Keys of the layers of ``model`` whose outputs on ``x`` hold inf or NaN while their inputs do not, in order.

    Where a real 16-bit model breaks, these are the layers where it broke:
    returning one of them to float32 is the fall-back that can mend it.
    Functional and Sequential models (nested ones included) are walked node
    by node, eagerly; a subclassed model has no graph to walk and gives ``[]``.
    Inside an author-written layer with sublayers (a transformer block) each
    sublayer is checked too (:func:`autoprec.graph.inside`), and comes before
    the block (keyed under it, as :func:`autoprec.graph.sublayer_key` keys it).

    >>> nonfinite_origins(real_model, x[:256])  # doctest: +SKIP
    ['custom']
    """
    import keras
    from keras.src.models.functional import operation_fn as keras_operation_fn

    from autoprec.graph import calls_replaced, container_names, graph_function, inside, layer_key, sublayer_key

    containers = container_names(model)
    found: list[str] = []

    def finite(structure: Any) -> bool:
        return all(
            bool(np.isfinite(keras.ops.convert_to_numpy(t)).all())
            for t in keras.tree.flatten(structure)
            if "float" in str(getattr(t, "dtype", ""))
        )

    def checked(call: Callable, key: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            if finite((args, kwargs)) and not finite(out):
                found.append(key)
            return out

        return run

    def walk(fn: Any, inputs: Any) -> Any:
        def operation(op: Any) -> Callable:
            call = keras_operation_fn(op, training=False)
            inner = graph_function(op) if isinstance(op, keras.Model) else None

            def run(*args: Any, **kwargs: Any) -> Any:
                if inner is not None:
                    return walk(inner, args[0])
                if not isinstance(op, keras.layers.Layer):
                    return call(*args, **kwargs)
                key = layer_key(op, containers)
                subs = inside(op)
                with calls_replaced([(sub, checked(sub.call, sublayer_key(sub, key, containers))) for sub in subs]):
                    return checked(call, key)(*args, **kwargs)  # after its sublayers: they are the nearer origin

            return run

        return fn._run_through_graph(inputs, operation_fn=operation)

    fn = graph_function(model)
    if fn is None:
        return []
    walk(fn, x)
    return found


def predict_batches(model: Any, data: EvalData) -> Any:
    """The model's own predictions over all batches (:func:`autoprec.engine.predict_on`), concatenated (NumPy)."""
    import keras

    with quiet_retracing():
        outs = [predict_on(model, x) for x, _ in data.batches()]
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outs)


def _rows(batch: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of every array in ``batch``."""
    import keras

    return keras.tree.map_structure(lambda a: a[lo:hi], batch)


def cycle_batches(train_data: Any, steps: int, batch_size: int, *, model: Any = None) -> list:
    """``steps`` training batches of ``batch_size`` samples, cycling through ``train_data`` in order.

    A short last batch is topped up from the start of the data, so that every
    step has one shape: ``fit`` fixes its input signature from the first
    batches it sees. Sample weights in ``train_data`` (a padding mask) come
    with each batch, ``(x, y, sample_weight)``, as ``fit`` weighs its loss by them.
    """
    import keras

    data = EvalData.get(train_data, batch_size=batch_size, what="train_data", model=model)
    batches: list = []
    held, parts = 0, []
    while len(batches) < steps:
        for x, y, w in data.weighted_batches():
            parts.append((x, y) if w is None else (x, y, w))
            held += len(keras.tree.flatten(x)[0])
            while held >= batch_size and len(batches) < steps:
                whole = keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)
                batches.append(_rows(whole, 0, batch_size))
                parts, held = [_rows(whole, batch_size, held)], held - batch_size
            if len(batches) == steps:
                break
    return batches


def train_steps(model: Any, batches: list, *, record_scale: bool = False) -> tuple[list[float], list[float]]:
    """Train one ``fit`` step per batch, in order; return each step's loss and (if asked) the loss-scale history.

    ``fit`` runs under the ``tf.distribute`` strategy the model was built in,
    where each replica takes its share of every batch, and the model's
    metrics are reset before each step, so a recorded loss is that step's.
    """
    recorder = _step_recorder()(record_scale)
    with strategy_scope(model), quiet_retracing():
        model.fit(_batch_list()(batches), epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    return recorder.losses, recorder.scales


@functools.cache
def _batch_list() -> type:
    import keras

    class BatchList(keras.utils.PyDataset):
        """Given batches as a dataset ``fit`` can read more than once: under a strategy, Keras reads one to build."""

        def __init__(self, batches: list) -> None:
            super().__init__()
            self.batches = batches

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, index: int) -> Any:
            return self.batches[index]

    return BatchList


@functools.cache
def _step_recorder() -> type:
    import keras

    class StepRecorder(keras.callbacks.Callback):
        """Each step's loss (metrics reset before it) and the loss scale after it."""

        def __init__(self, record_scale: bool) -> None:
            super().__init__()
            self.record_scale = record_scale
            self.losses: list[float] = []
            self.scales: list[float] = []

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            for metric in self.model.metrics:  # fit logs running means: from zero, the mean is this step's
                metric.reset_state()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.losses.append(float((logs or {}).get("loss", math.nan)))
            if self.record_scale and isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
                self.scales.append(float(keras.ops.convert_to_numpy(self.model.optimizer.dynamic_scale)))

    return StepRecorder


def train_check(
    model: Any,
    names: dict[str, str],
    train_data: Any,
    *,
    graph: ModelGraph,
    steps: int = 50,
    batch_size: int = TRAIN_BATCH_SIZE,
    metric: Any = None,
    eval_data: EvalData | None = None,
    progress_ratio: float = 0.5,
) -> TrainCheck:
    """Fine-tune the tuned model and a float32 copy for ``steps`` steps and compare.

    Both start from ``model``'s weights with fresh copies of its optimizer and
    see the same batches in the same order, trained by ``fit`` in the
    ``tf.distribute`` strategy ``model`` was built in, if any. Needs a
    compiled model.

    Example:
        >>> check = train_check(model, names, (x_train, y_train), graph=graph, steps=50)  # doctest: +SKIP

    Raises:
        ArgumentError: ``steps`` is not an integer >= 2.
        DataError: the model is not compiled.
        UnsupportedModelError: the model is subclassed (it cannot be cloned).
    """
    check_int("steps", steps, 2)
    if getattr(model, "optimizer", None) is None:
        raise DataError(
            "Expected a compiled model for the training check (its loss and optimizer are used). Compile it first."
        )
    if graph.kind == SUBCLASSED:
        raise UnsupportedModelError(
            "The training check clones the model twice; a subclassed model cannot be cloned. "
            "Run verify='eval', or rebuild the model functionally."
        )
    batches = cycle_batches(train_data, steps, batch_size, model=model)
    reference = apply_policy(model, {}, graph=graph)
    tuned = apply_policy(model, names, graph=graph)
    f32_losses, _ = train_steps(reference, batches)
    tuned_losses, scales = train_steps(tuned, batches, record_scale=True)
    f32_metric = tuned_metric = math.nan
    if eval_data is not None and metric is not None:
        f32_metric = metric.compute(eval_data.y, predict_batches(reference, eval_data), eval_data.weights)
        tuned_metric = metric.compute(eval_data.y, predict_batches(tuned, eval_data), eval_data.weights)
    passed, reason = judge_training(f32_losses, tuned_losses, scales, steps=steps, progress_ratio=progress_ratio)
    skipped = sum(1 for a, b in itertools.pairwise([DEFAULT_LOSS_SCALE, *scales]) if b < a)
    nonfinite = sum(1 for v in tuned_losses if not math.isfinite(v))
    return TrainCheck(
        steps, f32_losses, tuned_losses, scales, skipped, nonfinite, f32_metric, tuned_metric, passed, reason
    )


def judge_training(
    f32_losses: list[float], tuned_losses: list[float], scales: list[float], *, steps: int, progress_ratio: float = 0.5
) -> tuple[bool, str]:
    """Pass or fail a tuned training run against float32, with the reason in words.

    Rounding makes the two trajectories differ a little; only a tuned run that
    ends clearly behind float32 has stopped making progress: behind by more
    than a share of float32's own progress, 10% of its loss, and the spread
    of float32's own per-batch losses at the end of the run.

    >>> judge_training([2.0, 1.0], [2.0, float("nan")], [], steps=2)
    (False, 'the last 1 training losses are all non-finite')
    """
    if not 0 < progress_ratio <= 1:
        raise ArgumentError(f"Expected progress_ratio in (0, 1]. Received: {progress_ratio}.")
    window = max(1, steps // 5)
    finite_tail = [v for v in tuned_losses[-window:] if math.isfinite(v)]
    head32, tail32 = float(np.mean(f32_losses[:window])), float(np.mean(f32_losses[-window:]))
    progress32 = head32 - tail32
    tail16 = float(np.mean(finite_tail)) if finite_tail else math.inf
    spread = float(np.std(f32_losses[-window:]))
    slack = max((1 - progress_ratio) * max(progress32, 0.0), 0.10 * abs(tail32), spread, 1e-6)
    if scales and min(scales) < 1.0:
        return False, f"the loss scale collapsed to {min(scales):g} (< 1): gradients overflow float16 at any scale"
    if not finite_tail:
        return False, f"the last {window} training losses are all non-finite"
    if math.isfinite(tail32) and tail16 > tail32 + slack:
        return False, (
            f"training stopped making progress: its loss ends at {tail16:.4g} against {tail32:.4g} in float32 "
            f"(fell by {head32 - tail16:.4g} against {progress32:.4g})"
        )
    return True, "trains like float32"
