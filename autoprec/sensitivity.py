"""Per-layer sensitivity to 16-bit: :func:`profile` returns one DataFrame row per layer.

Three measures, cheapest first:

- **Range statistics** for each layer's output activations, the gradient at
  each output, and each layer's weight gradients: the largest magnitude, and
  the shares that would overflow the format (> 65504 for float16), flush to
  zero (< 2^-24) or turn subnormal (< 2^-14), unscaled and, for gradients,
  at the default loss scale 2^15; plus non-finite counts.
- A **first-order score** for every unit from the same forward/backward
  pass: the sum over the data of ``(dL/dy * (round(y) - y))^2`` at the unit's
  output ``y``, the squared change in loss that rounding ``y`` would cause to
  first order. It ranks all units at once; it is infinite where ``y``
  overflows the format.
- **Ablation** (``method="full"`` or ``"ablation"``): for each unit alone in
  the target format, the metric drop and the output error (relative L2 of
  the model outputs against float32). Exact, one pass per unit.

The SQNR column is the layer's *own* signal-to-quantisation-noise ratio:
float32 inputs into the layer run with its inputs, weights and output
rounded, against the same layer in float32, in dB.

>>> frame = autoprec.profile(model, (x_val, y_val), target="mixed_float16")  # doctest: +SKIP
>>> frame[["path", "metric_drop", "score"]].head()                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec import backends
from autoprec.data import (EvalData, Metric, as_eval_data, check_inputs_fit, label_kind, resolve_loss, resolve_metric,
                           single_output)
from autoprec.engine import LIMITS, FormatLimits, SimEngine, call_rounded, make_engine, round_to
from autoprec.errors import DataError, PolicyError, describe
from autoprec.graph import SUBCLASSED, ModelGraph, build_graph, clone_with_policies
from autoprec.policy import MIXED_BFLOAT16, MIXED_FLOAT16, TARGETS

logger = logging.getLogger("autoprec")

METHODS = ("full", "fast", "ablation")
DEFAULT_LOSS_SCALE = 2.0**15
_STAT_FIELDS = ("absmax", "total", "nonzero", "overflow", "flush", "below_normal", "nonfinite")


def resolve_target(target: str) -> str:
    """``mixed_float16``, ``mixed_bfloat16``, or for ``"auto"`` the one this device runs fast.

    ``auto`` picks float16 on a CUDA GPU and bfloat16 on a CPU whose oneDNN
    has fast bf16 (AVX512_BF16 or AMX), and logs why.

    >>> resolve_target("mixed_bfloat16")
    'mixed_bfloat16'
    """
    return explain_target(target)[0]


def explain_target(target: str) -> tuple[str, str]:
    """``(target, why)``: the resolved target and, for ``"auto"``, the reason it was picked."""
    if target in TARGETS:
        return target, "as asked"
    if target != "auto":
        raise PolicyError(f"Expected target to be one of {[*TARGETS, 'auto']}. Received: target={describe(target)}.")
    if backends.is_cuda_gpu_available():
        choice, why = MIXED_FLOAT16, "a CUDA GPU is visible; its tensor cores run float16"
    elif backends.cpu_has_fast_bf16():
        choice, why = MIXED_BFLOAT16, "no GPU; this CPU has AVX512_BF16/AMX, which oneDNN runs fast"
    else:
        choice, why = MIXED_BFLOAT16, "no GPU; bfloat16 keeps float32's range, and float16 kernels are slow on CPUs"
    logger.info("autoprec: target=auto -> %s (%s).", choice, why)
    return choice, why


@dataclass
class Context:
    """Everything later stages share: graph, data, metric, engine and the float32 baseline."""

    model: Any
    graph: ModelGraph
    data: EvalData
    target: str
    formats: tuple[str, ...]
    metric: Metric
    engine: Any
    baseline: float
    baseline_outputs: Any
    y: np.ndarray = field(repr=False)

    def evaluate(self, assignment: dict[str, str]) -> dict[str, float]:
        """Metric, drop, output error and non-finite outputs of one assignment (one pass)."""
        self.engine.set_assignment(assignment)
        outputs = self.engine.predict()
        return self.score_outputs(outputs)

    def score_outputs(self, outputs: Any) -> dict[str, float]:
        import keras

        flat = [np.asarray(o, dtype=np.float64) for o in keras.tree.flatten(outputs)]
        base = [np.asarray(o, dtype=np.float64) for o in keras.tree.flatten(self.baseline_outputs)]
        nonfinite = int(sum(np.size(o) - np.count_nonzero(np.isfinite(o)) for o in flat))
        with np.errstate(all="ignore"):
            num = math.sqrt(sum(float(np.sum((o - b) ** 2)) for o, b in zip(flat, base)))
            den = math.sqrt(sum(float(np.sum(b**2)) for b in base)) or 1.0
        error = math.inf if nonfinite or not math.isfinite(num) else num / den
        value = self.metric.compute(self.y, outputs)
        drop = self.metric.drop(self.baseline, value)
        if nonfinite or not math.isfinite(value):
            drop = math.inf  # a model whose outputs go non-finite has no usable metric
        return {"metric": value, "drop": drop, "output_error": error, "nonfinite_outputs": nonfinite}


def prepare(
    model: Any,
    data: Any,
    *,
    target: str,
    formats: tuple[str, ...] | None = None,
    metric: Any = None,
    higher_is_better: bool | None = None,
    batch_size: int = 256,
    keep_float32=(),
    force_16bit=(),
) -> Context:
    """Validate inputs, build the graph and engine, and measure the float32 baseline."""
    target = resolve_target(target)
    ev = as_eval_data(data, batch_size=batch_size)
    check_inputs_fit(model, ev)
    graph = build_graph(model, keep_float32=keep_float32, force_16bit=force_16bit, sample=ev.x_sample())
    if graph.kind != SUBCLASSED and any(i.layer.compute_dtype != "float32" for i in graph.units):
        # A model built under a mixed global policy: the baseline and the
        # search need float32, so they run on a float32 copy with the same weights.
        logger.info("autoprec: %r already computes partly in 16-bit; measuring a float32 copy with the same weights.", model.name)
        model = clone_with_policies(model, graph.resolve({}))
        graph = build_graph(model, keep_float32=keep_float32, force_16bit=force_16bit, sample=ev.x_sample())
    formats = tuple(formats or (target,))
    engine = make_engine(model, graph, ev, formats=formats)
    engine.set_assignment({})
    outputs = engine.predict()
    y = ev.y
    import keras

    flat = keras.tree.flatten(outputs)  # a one-output model built with outputs=[t] gives a list of one
    if not all(np.all(np.isfinite(o)) for o in flat):
        raise DataError(
            "Expected finite float32 outputs on the evaluation data. Received NaN or inf from the float32 model "
            "itself: the model or the data is broken before any 16-bit question arises. Check the inputs for "
            "NaN/inf and the weights for divergence."
        )
    if len(flat) == 1 and not callable(metric) or isinstance(metric, str):
        label_kind(y, flat[0])  # labels that cannot fit the output fail here, with the shapes in the message
    resolved = resolve_metric(metric, model=model, y=y, y_pred=outputs, higher_is_better=higher_is_better)
    baseline = resolved.compute(y, outputs)
    if not math.isfinite(baseline):
        raise DataError(f"Expected a finite float32 baseline metric. Received {resolved.name}={baseline}.")
    return Context(model, graph, ev, target, formats, resolved, engine, baseline, outputs, y)


def profile(
    model: Any,
    data: Any,
    *,
    target: str = MIXED_FLOAT16,
    method: str = "full",
    metric: Any = None,
    higher_is_better: bool | None = None,
    batch_size: int = 256,
    loss_scale: float = DEFAULT_LOSS_SCALE,
    verbose: int = 1,
    context: Context | None = None,
):
    """Measure each layer's sensitivity to computing in ``target``.

    Args:
        model: a float32 Keras model (Functional, Sequential, nested or subclassed).
        data: evaluation data, ``(x, y)`` arrays, a ``tf.data.Dataset`` or a ``PyDataset``.
        target: ``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"auto"``.
        method: ``"full"`` (statistics, score and ablation), ``"fast"``
            (statistics and score only: two passes), or ``"ablation"`` (no gradients).
        metric: a Keras metric name or instance, or a callable with ``higher_is_better``;
            default: the model's first compiled metric, else its loss.
        loss_scale: the loss scale for the scaled gradient statistics.
        verbose: 0 silences the progress bar.

    Returns:
        A DataFrame, one row per layer, units sorted most sensitive first;
        ``frame.attrs`` holds the baseline metric, metric name, target, and the
        number of passes and traces.

    Example:
        >>> frame = profile(model, (x, y), target="mixed_bfloat16", method="fast")  # doctest: +SKIP
    """
    import pandas as pd

    if method not in METHODS:
        raise PolicyError(f"Expected method to be one of {list(METHODS)}. Received: method={describe(method)}.")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not loss_scale >= 1:
        raise PolicyError(f"Expected loss_scale to be a number >= 1. Received: loss_scale={describe(loss_scale)}.")
    ctx = context or prepare(model, data, target=target, metric=metric, higher_is_better=higher_is_better, batch_size=batch_size)
    rows = {info.path: _graph_row(info, ctx.graph.total_flops) for info in ctx.graph.layers}
    if method in ("full", "fast"):
        if isinstance(ctx.engine, SimEngine):
            for path, stats in gradient_statistics(ctx, loss_scale=loss_scale).items():
                rows[path].update(stats)
        else:
            logger.info("autoprec: subclassed model: range statistics need a graph; only ablation is measured.")
    if method in ("full", "ablation"):
        for path, result in ablation(ctx, verbose=verbose).items():
            rows[path].update(result)
    frame = pd.DataFrame(list(rows.values()))
    frame = sort_by_sensitivity(frame)
    frame.attrs.update(
        baseline_metric=ctx.baseline, metric_name=ctx.metric.name, higher_is_better=ctx.metric.higher_is_better,
        target=ctx.target, passes=ctx.engine.passes, traces=ctx.engine.traces, engine=ctx.engine.kind,
    )
    return frame


def _graph_row(info: Any, total_flops: float) -> dict[str, Any]:
    return {
        "order": info.order, "path": info.path, "class": info.class_name, "params": info.params, "flops": info.flops,
        "flops_share": info.flops / total_flops if total_flops else 0.0, "decision_unit": info.is_unit,
        "pinned": info.pinned or "", "follows": info.follows,
    }


def sort_by_sensitivity(frame):
    """Unpinned units first, most sensitive first: by metric drop, output error, then score."""
    keys, ascending = ["_rank"], [True]
    frame = frame.assign(_rank=np.where(frame["decision_unit"] & (frame["pinned"] == ""), 0, 1))
    for column in ("metric_drop", "output_error", "score"):
        if column in frame:
            keys.append(column)
            ascending.append(False)
    return frame.sort_values(keys, ascending=ascending, na_position="last", kind="stable").drop(columns="_rank").reset_index(drop=True)


def ablation(ctx: Context, *, verbose: int = 1) -> dict[str, dict[str, float]]:
    """One unit at a time in the target format: metric drop and output error per unit."""
    import keras

    units = [u.path for u in ctx.graph.units]
    bar = keras.utils.Progbar(len(units), verbose=1 if verbose else 0, unit_name="unit") if units else None
    out = {}
    for i, path in enumerate(units):
        result = ctx.evaluate({path: ctx.target})
        out[path] = {
            "metric": result["metric"], "metric_drop": result["drop"], "output_error": result["output_error"],
            "nonfinite_outputs": result["nonfinite_outputs"],
        }
        if bar is not None:
            bar.update(i + 1)
    ctx.engine.set_assignment({})
    return out


def _tensor_stats(t: Any, limits: FormatLimits, scale: float = 1.0) -> Any:
    from keras import ops

    t = ops.cast(t, "float32")
    if scale != 1.0:
        t = t * scale
    a = ops.abs(t)
    finite = ops.isfinite(t)
    safe = ops.where(finite, a, ops.zeros_like(a))
    nonzero = ops.logical_and(safe > 0, finite)
    count = lambda mask: ops.sum(ops.cast(mask, "float32"))  # noqa: E731
    return ops.stack([
        ops.max(safe),
        ops.cast(ops.size(t), "float32"),
        count(nonzero),
        count(ops.logical_and(finite, a > limits.max_finite)),
        count(ops.logical_and(nonzero, a < limits.min_subnormal)),
        count(ops.logical_and(nonzero, a < limits.min_normal)),
        count(ops.logical_not(finite)),
    ])


def gradient_statistics(ctx: Context, *, loss_scale: float = DEFAULT_LOSS_SCALE) -> dict[str, dict[str, float]]:
    """Activation, output-gradient and weight-gradient statistics, score and SQNR, in one pass."""
    import keras
    from keras import ops

    engine: SimEngine = ctx.engine
    limits = LIMITS[ctx.target]
    dtype = limits.dtype
    units = {u.path for u in ctx.graph.units}
    unit_vars = [(u.path, v) for u in ctx.graph.units for v in u.layer.trainable_variables]
    variables = [v for _, v in unit_vars]
    loss = resolve_loss(ctx.model, ctx.y, ctx.baseline_outputs)

    def loss_fn(y_true, y_pred):
        # The batch mean, as Keras trains on: a loss resolved from a name is per
        # sample, and differentiating its sum would scale every gradient by the batch size.
        return ops.mean(loss(y_true, single_output(y_pred)))
    zeros = {fmt: ops.zeros((len(engine.units),), "float32") for fmt in ctx.formats}

    def step(x, y):
        taken: list[tuple[str, Any]] = []
        own: dict[str, Any] = {}

        def forward(inputs, watch):
            # A backend may call forward more than once (JAX: to size its taps,
            # to differentiate, and a last concrete pass); keep the last call's.
            taken.clear()
            own.clear()

            def hook(path, op, call, args, kwargs, out, sw):
                # Only a layer with a single floating output is watched (a layer
                # returning states as well, e.g. LSTM(return_state=True), is not).
                if isinstance(out, (list, tuple, dict)) or "float" not in str(getattr(out, "dtype", "")):
                    return None
                taken.append((path, out))
                if path in units and path not in own:
                    rounded = call_rounded(op, call, [(dtype, ops.ones(()))], args, kwargs)
                    r = keras.tree.flatten(rounded)[0]
                    own[path] = ops.stack([ops.sum(ops.square(out)), ops.sum(ops.square(out - r))])
                return watch(out)

            return engine.run(inputs, zeros, hook)

        _, _, out_grads, var_grads = backends.gradient_pass(forward, loss_fn, x, y, variables)
        result = {}
        for (path, act), grad in zip(taken, out_grads):
            with_scale = _tensor_stats(grad, limits, loss_scale)
            err = round_to(act, dtype) - act
            contrib = ops.where(ops.isfinite(err), ops.square(grad * err), ops.where(ops.abs(grad) > 0, np.inf, 0.0))
            result.setdefault(path, []).append(
                ops.concatenate([_tensor_stats(act, limits), _tensor_stats(grad, limits), with_scale, ops.reshape(ops.sum(contrib), (1,))])
            )
        wstats = {}
        for (path, _), grad in zip(unit_vars, var_grads):
            flat = ops.reshape(grad, (-1,))
            wstats.setdefault(path, []).append(flat)
        for path, parts in wstats.items():
            flat = ops.concatenate(parts)
            result[path + "\x00w"] = [ops.concatenate([_tensor_stats(flat, limits), _tensor_stats(flat, limits, loss_scale)])]
        for path, value in own.items():
            result[path + "\x00q"] = [value]
        return {k: ops.sum(ops.stack(v), axis=0) if len(v) > 1 else v[0] for k, v in result.items()}

    # One pass runs once: tracing it would cost more than it saves (a 50-layer
    # graph traces in ~20 s on 2 cores and runs eagerly in under one), so only
    # the evaluation function, run once per assignment, is traced.
    totals: dict[str, np.ndarray] = {}
    engine.passes += 1
    for x, y in ctx.data.batches:
        for key, value in step(x, y).items():
            value = np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)
            if key in totals:
                previous = totals[key]
                merged = previous + value
                # absmax fields are maxima, not sums (index 0 of every 7-field block)
                for start in range(0, len(value) - 1, len(_STAT_FIELDS)):
                    if key.endswith("\x00q"):
                        break
                    merged[start] = max(previous[start], value[start])
                totals[key] = merged
            else:
                totals[key] = value
    return _stats_columns(totals)


def _block(values: np.ndarray, prefix: str, *, scaled: bool = False) -> dict[str, float]:
    absmax, total, nonzero, overflow, flush, below_normal, nonfinite = values
    nz = nonzero or 1.0
    if scaled:
        return {f"{prefix}_overflow": overflow / (total or 1.0), f"{prefix}_flush": flush / nz, f"{prefix}_subnormal": (below_normal - flush) / nz}
    return {
        f"{prefix}_absmax": absmax,
        f"{prefix}_overflow": overflow / (total or 1.0),
        f"{prefix}_flush": flush / nz,
        f"{prefix}_subnormal": (below_normal - flush) / nz,
        f"{prefix}_nonfinite": int(nonfinite),
    }


def _stats_columns(totals: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    n = len(_STAT_FIELDS)
    out: dict[str, dict[str, float]] = {}
    for key, v in totals.items():
        path, _, kind = key.partition("\x00")
        row = out.setdefault(path, {})
        if kind == "":
            row.update(_block(v[0:n], "act"))
            row.update(_block(v[n : 2 * n], "grad"))
            row.update(_block(v[2 * n : 3 * n], "grad_scaled", scaled=True))
            row["score"] = float(v[3 * n])
        elif kind == "w":
            row.update(_block(v[0:n], "wgrad"))
            row.update(_block(v[n : 2 * n], "wgrad_scaled", scaled=True))
        elif kind == "q":
            signal, noise = v
            row["sqnr_db"] = math.inf if noise == 0 else (10 * math.log10(signal / noise) if math.isfinite(noise) else -math.inf)
    return out
