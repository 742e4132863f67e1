"""Verify the winner for real: Keras policies on the current device, and optionally training.

:func:`verify_eval` applies the policy with :func:`autoprec.apply_policy` and
evaluates it over the full evaluation data. :func:`train_check` fine-tunes
the tuned model and a float32 copy from the same weights, on the same
batches, for ``steps`` steps, with the LossScaleOptimizer when any layer
computes in float16, and records losses, skipped steps and the loss-scale
history. It fails the assignment when the loss scale collapses below 1, when
losses go non-finite and stay so, or when the tuned run stops making the
progress the float32 run makes.

>>> check = train_check(model, policy, (x_train, y_train), steps=50)  # doctest: +SKIP
>>> check.passed, check.skipped_steps                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec.apply import apply_policy
from autoprec.data import as_eval_data
from autoprec.engine import predict_batches
from autoprec.errors import DataError, describe
from autoprec.graph import ModelGraph


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


def verify_eval(model: Any, graph: ModelGraph, names: dict[str, str], ctx: Any) -> tuple[Any, dict[str, float]]:
    """Apply the resolved policy for real and score it on the full evaluation data."""
    real = apply_policy(model, names, graph=graph, inplace=graph.kind == "subclassed")
    return real, ctx.score_outputs(predict_batches(real, ctx.data))


def cycle_batches(train_data: Any, steps: int, batch_size: int) -> list:
    """``steps`` training batches, cycling through ``train_data`` in order."""
    data = as_eval_data(train_data, batch_size=batch_size, what="train_data")
    batches = list(data.batches)
    return [batches[i % len(batches)] for i in range(steps)]


def train_steps(model: Any, batches: list, *, record_scale: bool = False) -> tuple[list[float], list[float]]:
    """Run ``train_on_batch`` over ``batches``; return losses and (if asked) loss-scale history."""
    import keras

    from autoprec.engine import quiet_retracing

    losses, scales = [], []
    for x, y in batches:
        with quiet_retracing():
            out = model.train_on_batch(x, y, return_dict=True)
        losses.append(float(out["loss"]))
        if record_scale and isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            scales.append(float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale)))
    return losses, scales


def train_check(
    model: Any,
    names: dict[str, str],
    train_data: Any,
    *,
    graph: ModelGraph,
    steps: int = 50,
    batch_size: int = 32,
    metric: Any = None,
    eval_data: Any = None,
    progress_ratio: float = 0.5,
) -> TrainCheck:
    """Fine-tune the tuned model and a float32 copy for ``steps`` steps and compare.

    Both start from ``model``'s weights with fresh copies of its optimizer and
    see the same batches in the same order. Needs a compiled model.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise DataError(f"Expected steps to be an integer >= 2. Received: steps={describe(steps)}.")
    if getattr(model, "optimizer", None) is None:
        raise DataError("Expected a compiled model for the training check (its loss and optimizer are used). Compile it first.")
    if graph.kind == "subclassed":
        raise DataError(
            "The training check clones the model twice; a subclassed model cannot be cloned. "
            "Run verify='eval', or rebuild the model functionally."
        )
    batches = cycle_batches(train_data, steps, batch_size)
    reference = apply_policy(model, {}, graph=graph)
    tuned = apply_policy(model, names, graph=graph)
    f32_losses, _ = train_steps(reference, batches)
    tuned_losses, scales = train_steps(tuned, batches, record_scale=True)
    skipped = sum(1 for a, b in zip([2.0**15] + scales, scales) if b < a)
    nonfinite = sum(1 for v in tuned_losses if not math.isfinite(v))
    f32_metric = tuned_metric = math.nan
    if eval_data is not None and metric is not None:
        f32_metric = metric.compute(eval_data.y, predict_batches(reference, eval_data))
        tuned_metric = metric.compute(eval_data.y, predict_batches(tuned, eval_data))
    passed, reason = True, "trains like float32"
    window = max(1, steps // 5)
    finite_tail = [v for v in tuned_losses[-window:] if math.isfinite(v)]
    head32, tail32 = float(np.mean(f32_losses[:window])), float(np.mean(f32_losses[-window:]))
    progress32 = head32 - tail32
    tail16 = float(np.mean(finite_tail)) if finite_tail else math.inf
    progress16 = head32 - tail16  # both runs start from the same weights and batches
    # Rounding makes the two trajectories differ a little; only a tuned run that
    # ends clearly behind float32 has stopped making progress: behind by more
    # than a share of float32's own progress, 10% of its loss, and the spread
    # of float32's own per-batch losses at the end of the run.
    spread = float(np.std(f32_losses[-window:]))
    slack = max((1 - progress_ratio) * max(progress32, 0.0), 0.10 * abs(tail32), spread, 1e-6)
    if scales and min(scales) < 1.0:
        passed, reason = False, f"the loss scale collapsed to {min(scales):g} (< 1): gradients overflow float16 at any scale"
    elif not finite_tail:
        passed, reason = False, f"the last {window} training losses are all non-finite"
    elif math.isfinite(tail32) and tail16 > tail32 + slack:
        passed, reason = False, (
            f"training stopped making progress: its loss ends at {tail16:.4g} against {tail32:.4g} in float32 "
            f"(fell by {progress16:.4g} against {progress32:.4g})"
        )
    return TrainCheck(steps, f32_losses, tuned_losses, scales, skipped, nonfinite, f32_metric, tuned_metric, passed, reason)
