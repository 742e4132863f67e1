"""Evaluate many precision assignments cheaply: one trace, switches in variables.

:class:`SimEngine` runs a Functional or Sequential model's graph layer by
layer inside ONE traced function. Every layer that belongs to a decision
unit reads a switch (per 16-bit format) from a variable that is passed into
the traced function as a tensor. A switched-on layer rounds what the real
Keras mixed policy would round: its floating inputs, its autocast weights as
read (substituted through ``keras.StatelessScope``), and its outputs. Casting
to float16 and back reproduces float16 overflow to inf and flush-to-zero of
values below 2^-24; casting to bfloat16 reproduces its 8-bit mantissa.

What it does not reproduce: rounding *inside* a layer (a Dense's
pre-activation before its activation, or the accumulation order of a real
16-bit matmul). Those differ from float32 by far less than the rounding of
inputs, weights and outputs, which is why the winner is always verified with
the real policies (``verify``), and a test holds the two together.

Changing an assignment is a variable assignment: no rebuild, no retrace.
Subclassed models have no graph to walk; :class:`RealEngine` is the
documented fallback that sets real policies in place and retraces per
assignment (and restores the model afterwards).

>>> engine = make_engine(model, graph, data, formats=("mixed_float16",))  # doctest: +SKIP
>>> engine.set_assignment({"dense_1": "mixed_float16"})                   # doctest: +SKIP
>>> y_pred = engine.predict()                                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoprec import backends
from autoprec.data import EvalData
from autoprec.errors import PolicyError, UnsupportedModelError
from autoprec.graph import SUBCLASSED, ModelGraph, _is_model, graph_function, set_policies_in_place
from autoprec.policy import FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16

DTYPE_OF = {MIXED_FLOAT16: "float16", MIXED_BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class FormatLimits:
    """Range of a 16-bit format, for the statistics and the reports."""

    dtype: str
    max_finite: float
    min_normal: float
    min_subnormal: float


LIMITS = {
    MIXED_FLOAT16: FormatLimits("float16", 65504.0, 2.0**-14, 2.0**-24),
    MIXED_BFLOAT16: FormatLimits("bfloat16", 3.3895313892515355e38, 1.1754943508222875e-38, 9.183549615799121e-41),
}


def round_to(tensor: Any, dtype: str) -> Any:
    """Round a float32 tensor to ``dtype`` and back (inf on overflow, zero on underflow)."""
    from keras import ops

    return ops.cast(ops.cast(tensor, dtype), tensor.dtype)


def _is_float32_tensor(t: Any) -> bool:
    dtype = getattr(t, "dtype", None)
    return dtype is not None and "float32" in str(dtype)


def predict_batches(model: Any, data: EvalData) -> Any:
    """The model's own predictions over all batches, concatenated (NumPy)."""
    import keras

    with quiet_retracing():
        outs = [model.predict_on_batch(x) for x, _ in data.batches]
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outs)


class quiet_retracing:
    """Silence TensorFlow's "N of the last M calls triggered retracing" warning for a block.

    Each candidate model traces its own functions once or twice by design;
    the warning would blame the user's code. The logger level is restored on exit.
    """

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("tensorflow")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


class SimEngine:
    """Simulated-precision evaluation of a Functional/Sequential model.

    Args:
        model: the float32 model (its layers must compute in float32).
        graph: ``build_graph(model)`` with the decision units.
        data: the evaluation batches.
        formats: the 16-bit policies a unit may take (one or both).
    """

    kind = "simulated"

    def __init__(self, model: Any, graph: ModelGraph, data: EvalData, *, formats: tuple[str, ...]) -> None:
        import keras

        if graph.kind == SUBCLASSED:
            raise UnsupportedModelError("SimEngine needs a Functional or Sequential model; use RealEngine.")
        for fmt in formats:
            if fmt not in DTYPE_OF:
                raise PolicyError(f"Expected formats among {list(DTYPE_OF)}. Received {fmt!r}.")
        not_f32 = [i.path for i in graph.units if i.layer.compute_dtype != "float32"]
        if not_f32:
            raise UnsupportedModelError(
                f"Expected a float32 model to tune. Received layers already computing in 16-bit: {not_f32[:5]}. "
                "Apply an all-float32 policy first (autoprec.apply_policy)."
            )
        self.model, self.graph, self.data, self.formats = model, graph, data, tuple(formats)
        self.units = [u.path for u in graph.units]
        index = {p: i for i, p in enumerate(self.units)}
        self._layer_units = {
            path: (tuple(sorted(index[u] for u in members)) if members else None)
            for path, members in graph.unit_sets().items()
        }
        n = len(self.units)
        self.switches = {fmt: keras.Variable(np.zeros(n, "float32"), trainable=False, name=f"switch_{DTYPE_OF[fmt]}") for fmt in self.formats}
        self.traces = 0
        self.passes = 0
        self._forward = backends.compile_function(self._forward_impl)
        self._assignment: dict[str, str] = {}

    # Assignments ------------------------------------------------------------
    def set_assignment(self, assignment: Mapping[str, str]) -> None:
        """Set each unit's policy (missing units: float32). Assigns variables only."""
        unknown = [u for u in assignment if u not in self._layer_units or self._layer_units[u] is None]
        if unknown:
            raise PolicyError(f"Expected decision-unit paths. Received paths that are not units: {unknown[:5]}.")
        for fmt, var in self.switches.items():
            values = np.array([1.0 if assignment.get(u, FLOAT32) == fmt else 0.0 for u in self.units], "float32")
            var.assign(values)
        for u, name in assignment.items():
            if name != FLOAT32 and name not in self.formats:
                raise PolicyError(f"Expected a policy among float32 and {list(self.formats)} for {u!r}. Received {name!r}.")
        self._assignment = dict(assignment)

    def predict(self) -> Any:
        """Outputs over all evaluation batches under the current assignment."""
        import keras

        self.passes += 1
        switch_values = [self.switches[f].value for f in self.formats]
        outs = [keras.tree.map_structure(keras.ops.convert_to_numpy, self._forward(x, *switch_values)) for x, _ in self.data.batches]
        return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outs)

    # Tracing ------------------------------------------------------------------
    def _forward_impl(self, x: Any, *switch_values: Any) -> Any:
        self.traces += 1  # runs only while tracing (or eagerly on backends without tracing)
        return self.run(x, dict(zip(self.formats, switch_values)))

    def layer_switches(self, path: str, switch_values: Mapping[str, Any]) -> list[tuple[str, Any]] | None:
        """``[(dtype, scalar switch)]`` for a layer, or None when it is always float32."""
        from keras import ops

        idx = self._layer_units.get(path)
        if idx is None:
            return None
        out = []
        for fmt, values in switch_values.items():
            s = values[idx[0]] if len(idx) == 1 else ops.min(ops.take(values, list(idx)))
            out.append((DTYPE_OF[fmt], s))
        return out

    def run(self, x: Any, switch_values: Mapping[str, Any], hook: Callable | None = None) -> Any:
        """Run the model graph with rounding per layer.

        ``hook(path, op, call, args, kwargs, out, sw)`` sees each leaf's output;
        what it returns, if not None, flows on in place of ``out``.
        """
        return self._run_graph(graph_function(self.model), x, switch_values, hook)

    def _run_graph(self, fn: Any, x: Any, switch_values: Mapping[str, Any], hook: Callable | None) -> Any:
        from keras.src.models.functional import operation_fn as keras_operation_fn

        def operation(op):
            if _is_model(op):
                inner = graph_function(op)
                return lambda inputs, *a, **k: self._run_graph(inner, inputs, switch_values, hook)
            call = keras_operation_fn(op, training=False)  # Keras's own: passes training only where accepted
            path = self.graph.key(op)

            def simulated(*args, **kwargs):
                sw = self.layer_switches(path, switch_values)
                out = call_rounded(op, call, sw, args, kwargs)
                if hook is not None:
                    replaced = hook(path, op, call, args, kwargs, out, sw)
                    if replaced is not None:  # e.g. the output plus a zero "tap" to differentiate at
                        out = replaced
                return out

            return simulated

        return fn._run_through_graph(x, operation_fn=operation)


def rounder(sw: list[tuple[str, Any]] | None) -> Callable[[Any], Any]:
    """A function that rounds float32 tensors as the switches say (identity when ``sw`` is None)."""
    from keras import ops

    if not sw:
        return lambda t: t

    from keras.src.backend.common.masking import get_keras_mask, set_keras_mask

    def rnd(t):
        if not _is_float32_tensor(t):
            return t
        out = t
        for dtype, s in sw:
            # where(), not t + s * (r - t): the latter turns inf into NaN when s == 0.
            out = ops.where(s > 0.5, round_to(t, dtype), out)
        # Functional graphs pass masks as node arguments; a mask that rides only
        # on the tensor (set by an eager layer) must survive the rounding too.
        mask = get_keras_mask(t)
        if mask is not None:
            set_keras_mask(out, mask)
        return out

    return rnd


def call_rounded(op: Any, call: Callable, sw: list | None, args: tuple, kwargs: dict) -> Any:
    """Call ``op`` with inputs, autocast weights and outputs rounded per ``sw``."""
    import keras

    if not sw:
        return call(*args, **kwargs)
    rnd = rounder(sw)
    args = keras.tree.map_structure(rnd, args)
    kwargs = keras.tree.map_structure(rnd, kwargs)
    # Only variables Keras would autocast under a mixed policy are read in
    # 16-bit; BatchNormalization and friends keep theirs in float32.
    mapping = [
        (v, rnd(v.value))
        for v in getattr(op, "variables", [])
        if getattr(v, "_autocast", True) and "float32" in str(v.dtype)
    ]
    if mapping:
        with keras.StatelessScope(state_mapping=mapping):
            out = call(*args, **kwargs)
    else:
        out = call(*args, **kwargs)
    return keras.tree.map_structure(rnd, out)


class RealEngine:
    """Fallback for subclassed models: real Keras policies set in place, one retrace per assignment.

    The model's original policies are restored by :meth:`close` (and on exit
    when used as a context manager).
    """

    kind = "real"

    def __init__(self, model: Any, graph: ModelGraph, data: EvalData, *, formats: tuple[str, ...]) -> None:
        self.model, self.graph, self.data, self.formats = model, graph, data, tuple(formats)
        self.units = [u.path for u in graph.units]
        self._original = {id(l): l.dtype_policy for l in model._flatten_layers(include_self=False)}
        self.traces = 0
        self.passes = 0

    def set_assignment(self, assignment: Mapping[str, str]) -> None:
        changed = set_policies_in_place(self.model, self.graph.resolve(dict(assignment)))
        if changed or self.model.predict_function is None:
            self.model.predict_function = None  # stale traced functions keep the old dtypes
            self.traces += 1

    def predict(self) -> Any:
        self.passes += 1
        return predict_batches(self.model, self.data)

    def close(self) -> None:
        for layer in self.model._flatten_layers(include_self=False):
            original = self._original.get(id(layer))
            if original is not None and layer.dtype_policy.name != original.name:
                layer.dtype_policy = original
        self.model.predict_function = None

    def __enter__(self) -> "RealEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_engine(model: Any, graph: ModelGraph, data: EvalData, *, formats: tuple[str, ...]):
    """The simulated engine where the model has a graph, else the real-policy fallback."""
    cls = RealEngine if graph.kind == SUBCLASSED else SimEngine
    return cls(model, graph, data, formats=formats)
