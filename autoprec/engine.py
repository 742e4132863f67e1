"""Evaluate many precision assignments cheaply: one trace, the assignment in a tensor.

:class:`SimEngine` runs a Functional or Sequential model's graph node by
node inside ONE traced function. Every node that could compute in 16-bit
reads its format from an integer code vector passed into the traced
function as a tensor (0 = float32, 1.. = the formats). A node with a 16-bit
code rounds what the real Keras mixed policy would round: its floating
inputs, its autocast weights as read (substituted through
``keras.StatelessScope``), and its outputs. Casting to float16 and back
reproduces float16 overflow to inf and flush-to-zero below 2^-24; casting to
bfloat16 reproduces its 8-bit mantissa. The rounding sits in
``keras.ops.switch`` branches, so a float32 node costs nothing extra:
only the branch its code selects runs.

What it does not reproduce: rounding *inside* a Keras layer (a Dense's
pre-activation before its activation, or the accumulation order of a real
16-bit matmul). Those differ from float32 by far less than the rounding of
inputs, weights and outputs, which is why the winner is always verified with
the real policies, and a test holds the two together.

A layer whose ``call`` is not Keras's own (a user's custom layer, a KerasHub
block, a ``Lambda``) may do anything inside: an ``ops.exp`` that overflows
float16, a sum of squares, a softmax over large logits. Rounding its inputs
and outputs would guess; the engine does not guess. Its 16-bit branch calls
the layer itself with its real policy, set for the length of the trace (its
sublayers take the policies the emitted model gives them, read from a twin
built from the layer's config, so a sublayer that fixes its own dtype keeps
it). Simulated and real metrics agree on such layers, at the price of real
16-bit arithmetic for them on this machine.

Changing an assignment changes the code vector: no rebuild, no retrace. The
metric's per-sample values, where the metric has them, are computed in the
same traced call. Subclassed models have no graph to walk; :class:`RealEngine`
is the documented fallback that sets real policies in place and retraces
per assignment (and restores the model afterwards).

>>> engine = make_engine(model, graph, formats=("mixed_float16",))  # doctest: +SKIP
>>> engine.set_assignment({"dense_1": "mixed_float16"})              # doctest: +SKIP
>>> outputs, values = engine.forward(x, y)                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from autoprec import backends
from autoprec.apply import set_policies_in_place
from autoprec.errors import PolicyError, UnsupportedModelError
from autoprec.formats import FLOAT32, LOW_PRECISION, compute_dtype, is_quantized, split
from autoprec.graph import (
    MOVEMENT,
    SUBCLASSED,
    ModelGraph,
    _is_model,
    calls_replaced,
    emitted_policies,
    graph_function,
    opaque,
    policies_set,
)
from autoprec.metrics import Metric


def round_to(tensor: Any, dtype: str) -> Any:
    """Round a float32 tensor to ``dtype`` and back (inf on overflow, zero on underflow)."""
    from keras import ops

    return ops.cast(ops.cast(tensor, dtype), tensor.dtype)


def _pad_rows(a: Any, rows: int) -> Any:
    """``a`` with its last row repeated up to ``rows`` rows (a label or input of a smaller last batch)."""
    a = np.asarray(a)
    if a.ndim == 0 or len(a) >= rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)])


def _is_float32_tensor(t: Any) -> bool:
    dtype = getattr(t, "dtype", None)
    return dtype is not None and "float32" in str(dtype)


def to_numpy(structure: Any) -> Any:
    import keras

    return keras.tree.map_structure(keras.ops.convert_to_numpy, structure)


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


class _PerSample:
    """A metric's per-sample values (NumPy) of a batch's outputs, weighted or not: a small compiled function each."""

    def __init__(self, metric: Metric) -> None:
        per_sample = metric.per_sample
        assert per_sample is not None  # callers build one only for a metric that is a mean
        self._plain = backends.compile_function(lambda y, out: per_sample(*metric.select(y, out)))
        self._weighted = backends.compile_function(
            lambda y, out, w: per_sample(*metric.select(y, out), metric.weights_of(w))
        )

    def __call__(self, y: Any, outputs: Any, w: Any) -> np.ndarray:
        values = self._plain(y, outputs) if w is None else self._weighted(y, outputs, w)
        return np.asarray(to_numpy(values), np.float64)


class SimEngine:
    """Simulated-precision evaluation of a Functional/Sequential model.

    Args:
        model: the float32 model (its layers must compute in float32).
        graph: ``build_graph(model)``.
        formats: the 16-bit policies a node may take (one or both).
        metric: the metric whose per-sample values the traced call returns too.
    """

    kind = "simulated"

    def __init__(
        self, model: Any, graph: ModelGraph, *, formats: tuple[str, ...], metric: Metric | None = None
    ) -> None:
        _check_simulable(graph, formats)
        self.model, self.graph, self.formats, self.metric = model, graph, tuple(formats), metric
        self._index = {info.path: i for i, info in enumerate(graph.layers)}
        self._dtypes = [compute_dtype(split(f)[1]) for f in self.formats]
        self._twins = _quantized_twins(graph, self.formats)
        self._real = _real_policies(graph, self.formats)
        self._blocks = _Blocks(self)
        self.codes = np.zeros(len(graph.layers), np.int32)
        self.traces = 0
        self._rows = 0  # the largest batch traced so far (see forward)
        self._forward = backends.compile_function(self._forward_impl)
        self._values: _PerSample | None = None
        if metric is not None:
            self.use_metric(metric)

    # Assignments ------------------------------------------------------------
    def set_assignment(self, assignment: Mapping[str, str]) -> None:
        """Set each decision's policy (see ``ModelGraph.resolve_nodes``)."""
        unknown = [p for p in assignment if p not in self._index]
        if unknown:
            raise PolicyError(f"Expected layer paths of this model. Received paths it does not have: {unknown[:5]}.")
        for path, name in assignment.items():
            if name != FLOAT32 and name not in self.formats:
                raise PolicyError(
                    f"Expected a policy among float32 and {list(self.formats)} for {path!r}. Received {name!r}."
                )
        names = self.graph.resolve_nodes(assignment)
        code = {FLOAT32: 0, **{f: i + 1 for i, f in enumerate(self.formats)}}
        codes = [code.get(names[info.path], 0) for info in self.graph.layers]
        self._blocks.set_codes(names, codes)
        self.codes = np.array(codes, np.int32)

    def use_metric(self, metric: Metric) -> None:
        """Return ``metric``'s per-sample values with each batch's outputs from now on.

        A small compiled function of their own computes them from the outputs
        of the traced pass, which does not depend on the metric: the metric is
        resolved from the baseline pass's outputs, and knowing it retraces
        nothing (a retrace of MobileNetV2 at 224x224 cost 1.2 predict passes).
        Per-sample values let an evaluation stop early batch by batch.
        """
        self.metric = metric
        self._values = None if metric.per_sample is None else _PerSample(metric)

    def forward(self, x: Any, y: Any, w: Any = None) -> tuple[Any, np.ndarray | None]:
        """Outputs (NumPy) and the metric's per-sample values (or None) for one batch, weighted by ``w``."""
        import keras

        n = len(keras.tree.flatten(x)[0])
        padded = backends.traces_per_batch_size() and 0 < n < self._rows
        if padded:  # a smaller last batch, padded with copies of its last row: no second trace
            x, y, w = (
                t if t is None else keras.tree.map_structure(lambda a: _pad_rows(a, self._rows), t) for t in (x, y, w)
            )
        else:
            self._rows = max(self._rows, n)
        outputs = self._forward(x, self.codes)
        values = None if self._values is None else self._values(y, outputs, w)
        outputs = to_numpy(outputs)
        if padded:
            outputs = keras.tree.map_structure(lambda a: a[:n], outputs)
            values = None if values is None else values[:n]
        return outputs, values

    # Tracing ------------------------------------------------------------------
    def _forward_impl(self, x: Any, codes: Any) -> Any:
        self.traces += 1  # runs only while tracing (or eagerly on backends without tracing)
        return self.run(x, codes)

    def run(self, x: Any, codes: Any = None, hook: Callable | None = None) -> Any:
        """Run the model graph, rounding each node as ``codes`` says (no rounding when None).

        ``hook(path, op, call, args, kwargs, out)`` sees each leaf's output;
        what it returns, if not None, flows on in place of ``out``.
        """
        return self._run_graph(graph_function(self.model), x, codes, hook)

    def _run_graph(self, fn: Any, x: Any, codes: Any, hook: Callable | None) -> Any:
        from keras.src.models.functional import operation_fn as keras_operation_fn

        def operation(op):
            if _is_model(op):
                inner = graph_function(op)
                return lambda inputs, *a, **k: self._run_graph(inner, inputs, codes, hook)
            call = keras_operation_fn(op, training=False)  # Keras's own: passes training only where accepted
            path = self.graph.key(op)
            info = self.graph[path]
            rounds = codes is not None and info.role != MOVEMENT and info.pinned is None
            twins = self._twins.get(path, {})
            blocks = self._blocks
            plain = blocks.with_sublayers(call, path, codes, hook) if path in blocks.inner else call

            def simulated(*args, **kwargs):
                if rounds:
                    # One switch per node, around the whole call: a branch per format is cheaper
                    # to run than a switch per input, weight and output (measured: 30% per trial).
                    more = blocks.mixed(path, plain, args, kwargs)
                    out = self._switch_call(op, call, codes[self._index[path]], twins, args, kwargs, more)
                else:
                    out = plain(*args, **kwargs)
                if hook is not None:
                    replaced = hook(path, op, call, args, kwargs, out)
                    if replaced is not None:  # e.g. the output plus a zero "tap" to differentiate at
                        out = replaced
                return out

            return simulated

        return fn._run_through_graph(x, operation_fn=operation)

    def _switch_call(
        self,
        op: Any,
        call: Callable,
        code: Any,
        twins: dict[int, Any],
        args: tuple,
        kwargs: dict,
        more: Sequence[Callable[[], Any]] = (),
    ) -> Any:
        """The layer in the format ``code`` selects: as it is, rounded float formats, or its quantized twin; codes
        past the formats select the branches ``more``."""
        import keras
        from keras import ops
        from keras.src.models.functional import operation_fn as keras_operation_fn

        def as_float32(out: Any) -> Any:
            return keras.tree.map_structure(lambda t: ops.cast(t, "float32") if "float" in str(t.dtype) else t, out)

        # One factory per kind of branch, so that each branch keeps its own twin or dtype.
        def twin_branch(twin: Any) -> Callable[[], Any]:
            twin_call = keras_operation_fn(twin, training=False)
            return lambda: as_float32(twin_call(*args, **kwargs))

        def sixteen_bit_branch(index: int) -> Callable[[], Any]:
            return lambda: self.call_16bit(op, call, index, args, kwargs)

        branches: list[Callable[[], Any]] = [lambda: call(*args, **kwargs)]
        for index in range(1, len(self.formats) + 1):
            branches.append(twin_branch(twins[index]) if index in twins else sixteen_bit_branch(index))
        return ops.switch(code, [*branches, *more])

    def call_16bit(self, op: Any, call: Callable, index: int, args: tuple, kwargs: dict) -> Any:
        """``op`` called as it computes in ``self.formats[index - 1]``, its outputs in float32.

        Rounded inputs, weights and outputs for a Keras layer; the real policy
        for a layer whose own ``call`` the rounding cannot see into.
        """
        real = self._real.get(self._blocks.keys.get(id(op)) or self.graph.key(op)) if _is_layer_op(op) else None
        # A quantized format's branch of a layer Keras cannot quantize is traced but never taken (its choices are
        # the float ones): it runs the float part's real policy.
        policies = None if real is None else real.get(index, real.get(self._float_index(index)))
        if policies is None:
            return call_rounded(op, call, round_with(self._dtypes[index - 1]), args, kwargs)
        with policies_set(policies):
            out = call(*args, **kwargs)
        return _floats_to_float32(out)

    def _float_index(self, index: int) -> int:
        """The code of the float format that format ``index`` computes in (itself for a float format)."""
        base = split(self.formats[index - 1])[1]
        return self.formats.index(base) + 1 if base in self.formats else index

    def calibrate(self, batches: Any) -> None:
        """Set the float8 twins' scales from the largest inputs each layer sees on ``batches``."""
        from keras import ops

        from autoprec.quantize import calibrate_float8

        float8 = {
            path: [t for i, t in twins.items() if split(self.formats[i - 1])[0] == "float8"]
            for path, twins in self._twins.items()
        }
        float8 = {p: t for p, t in float8.items() if t}
        if not float8:
            return
        amax: dict[str, float] = {}

        def hook(path, op, call, args, kwargs, out):
            if path in float8 and args and hasattr(args[0], "dtype"):
                amax[path] = max(amax.get(path, 0.0), float(ops.convert_to_numpy(ops.max(ops.abs(args[0])))))
            return None

        for x, _ in batches:
            self.run(x, None, hook)
        for path, layers in float8.items():
            for layer in layers:
                calibrate_float8(layer, amax.get(path, 0.0))


def _check_simulable(graph: ModelGraph, formats: tuple[str, ...]) -> None:
    if graph.kind == SUBCLASSED:
        raise UnsupportedModelError("SimEngine needs a Functional or Sequential model; use RealEngine.")
    unknown = [f for f in formats if f not in LOW_PRECISION and not is_quantized(f)]
    if unknown:
        raise PolicyError(
            f"Expected formats among {list(LOW_PRECISION)} or quantized policy names. Received {unknown}."
        )
    not_f32 = [i.path for i in graph.layers if i.is_layer and i.pinned is None and i.layer.compute_dtype != "float32"]
    if not_f32:
        raise UnsupportedModelError(
            f"Expected a float32 model to tune. Received layers already computing in 16-bit: {not_f32[:5]}. "
            "Apply an all-float32 policy first (autoprec.apply_policy)."
        )


class _Blocks:
    """The sublayers decided inside blocks (``graph.BLOCK``), switched inside their block's call.

    ``keys`` maps each such sublayer to its path (one without a ``path`` of
    its own is keyed under its block). A block whose sublayers differ has a
    branch per 16-bit format after the formats' own (:meth:`mixed`).
    """

    def __init__(self, engine: SimEngine) -> None:
        graph = engine.graph
        self.engine = engine
        self.inner = {block: [(graph[p].layer, p) for p in paths] for block, paths in graph.inner.items()}
        self.keys = {id(layer): path for pairs in self.inner.values() for layer, path in pairs}
        self.bypass: set[int] = set()  # sublayers whose whole Keras call runs as it is, for one call
        # A block whose sublayers differ: it and the sublayers it keeps compute in one of these 16-bit formats.
        self.floats = tuple(dict.fromkeys(split(f)[1] for f in engine.formats if split(f)[1] in LOW_PRECISION))
        self.kept = {block: _kept_policies(engine, block, self.floats) for block in graph.inner}

    def set_codes(self, names: Mapping[str, str], codes: list[int]) -> None:
        """Give each block whose sublayers differ the code of its branch (after the formats' own)."""
        engine = self.engine
        for block in self.inner:
            name, mixed = engine.graph.block_state(names, block)
            if mixed:
                codes[engine._index[block]] = len(engine.formats) + 1 + self.floats.index(name)

    def mixed(self, block: str, call: Callable, args: tuple, kwargs: dict) -> list[Callable[[], Any]]:
        """The branches of a block whose sublayers differ, one per 16-bit format (none for another node): the
        block and the sublayers it keeps in that format (their real policies), each decided sublayer switched as
        its code says (``call`` is :meth:`with_sublayers`)."""

        def branch(kept: list[tuple[Any, Any]]) -> Callable[[], Any]:
            def run() -> Any:
                with policies_set(kept):
                    return _floats_to_float32(call(*args, **kwargs))

            return run

        return [branch(kept) for kept in self.kept.get(block, [])]

    def with_sublayers(self, call: Callable, block: str, codes: Any, hook: Callable | None) -> Callable:
        """A block's ``call`` whose decided sublayers each compute as ``codes`` says (and show ``hook`` their outputs).

        Each sublayer's ``call`` is replaced on the instance for the length of
        the block's call (a trace), as :func:`autoprec.graph.build_graph`
        records calls. Their 16-bit outputs come back in float32, so the
        block's own ops that read them compute in float32 here where Keras
        would compute those reading two 16-bit tensors in 16-bit (a cast to
        the block's own dtype is as Keras has it). Where every sublayer shares
        one format the block runs its real policies instead (its other
        branches), and the verification has real policies throughout.
        """

        def run(*args: Any, **kwargs: Any) -> Any:
            calls = [(sub, self._sublayer_call(sub, path, codes, hook)) for sub, path in self.inner[block]]
            with calls_replaced(calls):
                return call(*args, **kwargs)

        return run

    def _sublayer_call(self, sub: Any, path: str, codes: Any, hook: Callable | None) -> Callable:
        engine, original = self.engine, sub.call
        rounds = codes is not None and engine.graph[path].pinned is None
        twins = engine._twins.get(path, {})

        def whole(*args: Any, **kwargs: Any) -> Any:  # the sublayer's whole Keras call, its policy's casts included
            self.bypass.add(id(sub))
            try:
                return sub(*args, **kwargs)
            finally:
                self.bypass.discard(id(sub))

        def replaced(*args: Any, **kwargs: Any) -> Any:
            if id(sub) in self.bypass:
                return original(*args, **kwargs)
            if rounds:
                out = engine._switch_call(sub, whole, codes[engine._index[path]], twins, args, kwargs)
            else:
                out = original(*args, **kwargs)
            if hook is not None:
                tapped = hook(path, sub, whole, args, kwargs, out)
                if tapped is not None:
                    out = tapped
            return out

        return replaced


def _quantized_twins(graph: ModelGraph, formats: tuple[str, ...]) -> dict[str, dict[int, Any]]:
    """For each quantizable layer, a quantized twin per quantized format (keyed by the format's code)."""
    from autoprec.quantize import quantized_twin

    wanted = [(index, fmt) for index, fmt in enumerate(formats, start=1) if is_quantized(fmt)]
    if not wanted:
        return {}
    return {
        info.path: {index: quantized_twin(info.layer, fmt) for index, fmt in wanted}
        for info in graph.layers
        if info.quantizable and info.pinned is None
    }


def _is_layer_op(op: Any) -> bool:
    import keras

    return isinstance(op, keras.layers.Layer)


def _real_policies(graph: ModelGraph, formats: tuple[str, ...]) -> dict[str, dict[int, list[tuple[Any, Any]]]]:
    """For each opaque layer that may compute in 16-bit: per float format's code, the policy of it and each sublayer."""
    out: dict[str, dict[int, list[tuple[Any, Any]]]] = {}
    for info in graph.layers:
        if not info.is_layer or info.pinned is not None or info.role == MOVEMENT or not opaque(info.layer):
            continue
        out[info.path] = {
            index: emitted_policies(info.layer, split(fmt)[1])
            for index, fmt in enumerate(formats, start=1)
            if not is_quantized(fmt)
        }
    return out


def _kept_policies(engine: SimEngine, block: str, floats: tuple[str, ...]) -> list[list[tuple[Any, Any]]]:
    """Per 16-bit format, the real policies of a block and the sublayers it keeps (not those decided inside it,
    nor theirs): what they compute in where its decided sublayers differ (``ModelGraph.block_state``). Read from
    the block's own real policies where the engine has them for that format."""
    graph, real = engine.graph, engine._real.get(block, {})
    decided = {
        id(layer)
        for path in graph.inner[block]
        for layer in (graph[path].layer, *graph[path].layer._flatten_layers(include_self=False))
    }
    out = []
    for name in floats:
        policies = real.get(engine.formats.index(name) + 1) if name in engine.formats else None
        policies = policies if policies is not None else emitted_policies(graph[block].layer, name)
        out.append([(mine, p) for mine, p in policies if id(mine) not in decided])
    return out


def _floats_to_float32(structure: Any) -> Any:
    """Every floating tensor of ``structure`` cast to float32, keeping a Keras mask that rides on it."""
    import keras
    from keras import ops
    from keras.src.backend.common.masking import get_keras_mask, set_keras_mask

    def cast(t: Any) -> Any:
        if "float" not in str(getattr(t, "dtype", "")) or _is_float32_tensor(t):
            return t
        out = ops.cast(t, "float32")
        mask = get_keras_mask(t)
        if mask is not None:
            set_keras_mask(out, mask)
        return out

    return keras.tree.map_structure(cast, structure)


def round_with(dtype: str) -> Callable[[Any], Any]:
    """A function that rounds float32 tensors to ``dtype`` and back, keeping a Keras mask that rides on them."""

    def rnd(t: Any) -> Any:
        if not _is_float32_tensor(t):
            return t
        from keras.src.backend.common.masking import get_keras_mask, set_keras_mask

        out = round_to(t, dtype)
        # Functional graphs pass masks as node arguments; a mask that rides only
        # on the tensor (set by an eager layer) must survive the rounding too.
        mask = get_keras_mask(t)
        if mask is not None:
            set_keras_mask(out, mask)
        return out

    return rnd


def call_rounded(op: Any, call: Callable, rnd: Callable[[Any], Any], args: tuple, kwargs: dict) -> Any:
    """Call ``op`` with inputs, autocast weights and outputs passed through ``rnd``."""
    import keras

    if getattr(op, "autocast", True):
        # Keras casts a layer's floating inputs to its compute dtype, except where the
        # layer opts out (LayerNormalization, GroupNormalization: they read float32 inputs as they come).
        args = keras.tree.map_structure(rnd, args)
        kwargs = keras.tree.map_structure(rnd, kwargs)
    # Only variables Keras would autocast under a mixed policy are read in
    # 16-bit; BatchNormalization and friends keep theirs in float32.
    mapping = [
        (v, rnd(v.value))
        for v in getattr(op, "variables", [])
        if getattr(v, "_autocast", True) and "float32" in str(v.dtype)
    ]
    if _rounds_before_bias(op):
        return _matmul_bias_activation(op, call, rnd, args, kwargs, mapping)
    if mapping:
        with keras.StatelessScope(state_mapping=mapping):
            out = call(*args, **kwargs)
    else:
        out = call(*args, **kwargs)
    return keras.tree.map_structure(rnd, out)


_MATMUL_BIAS = {"Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D"}


def _rounds_before_bias(op: Any) -> bool:
    """A matmul or convolution layer that adds its bias as a separate 16-bit op (every backend does, measured).

    A real 16-bit Dense rounds its matmul, then adds the rounded bias and
    rounds again, then applies its activation. Where the matmul's output is
    large (inputs near 2048, where float16 steps by 2), the two roundings move
    the result by a whole step: the engine reproduces them. Quantized or LoRA
    layers and channels-first convolutions keep the one rounding.
    """
    return (
        type(op).__name__ in _MATMUL_BIAS
        and getattr(op, "bias", None) is not None
        and not getattr(op, "lora_enabled", False)
        and getattr(op, "quantization_mode", None) is None
        and getattr(op, "data_format", "channels_last") == "channels_last"
    )


def _matmul_bias_activation(op: Any, call: Callable, rnd: Callable, args: tuple, kwargs: dict, mapping: list) -> Any:
    """``op``'s call as Keras runs it in 16-bit: round(matmul), round(+ bias), round(activation)."""
    import keras
    from keras import ops

    bias = op.bias
    linear = keras.activations.get("linear")
    zero_bias = [(v, value) for v, value in mapping if v is not bias] + [(bias, ops.zeros_like(bias.value))]
    activation, op.activation = op.activation, linear  # for the length of this trace only
    try:
        with keras.StatelessScope(state_mapping=zero_bias):
            out = rnd(call(*args, **kwargs))
    finally:
        op.activation = activation
    out = rnd(ops.add(out, rnd(bias.value)))
    return rnd(activation(out)) if activation is not None and activation is not linear else out


class RealEngine:
    """Fallback for subclassed models: real Keras policies set in place, one retrace per assignment.

    The model's original policies are restored by :meth:`close` (and on exit
    when used as a context manager).
    """

    kind = "real"

    def __init__(
        self, model: Any, graph: ModelGraph, *, formats: tuple[str, ...], metric: Metric | None = None
    ) -> None:
        self.model, self.graph, self.formats, self.metric = model, graph, tuple(formats), metric
        self._original = {id(layer): layer.dtype_policy for layer in model._flatten_layers(include_self=False)}
        self.traces = 0

    def set_assignment(self, assignment: Mapping[str, str]) -> None:
        changed = set_policies_in_place(self.model, self.graph.resolve(dict(assignment)))
        if changed or self.model.predict_function is None:
            self.model.predict_function = None  # stale traced functions keep the old dtypes
            self.traces += 1

    def use_metric(self, metric: Metric) -> None:
        """Return ``metric``'s per-sample values with the outputs from now on."""
        self.metric = metric

    def forward(self, x: Any, y: Any, w: Any = None) -> tuple[Any, np.ndarray | None]:
        return predicted(self.model, self.metric, x, y, w)

    def close(self) -> None:
        for layer in self.model._flatten_layers(include_self=False):
            original = self._original.get(id(layer))
            if original is not None and layer.dtype_policy.name != original.name:
                layer.dtype_policy = original
        self.model.predict_function = None

    def __enter__(self) -> RealEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def predicted(model: Any, metric: Metric | None, x: Any, y: Any, w: Any = None) -> tuple[Any, np.ndarray | None]:
    """A real model's own float32 outputs for the batch ``x`` and ``metric``'s per-sample values (or None),
    weighted by ``w``: an engine's ``forward`` where real Keras policies compute."""
    import keras

    with quiet_retracing():
        outputs = predict_on(model, x)
    outputs = keras.tree.map_structure(lambda a: np.asarray(a, np.float32), outputs)
    if metric is None or metric.per_sample is None:
        return outputs, None
    return outputs, metric.values(*metric.select(y, outputs), metric.weights_of(w))


def output_masks(model: Any, x: Any) -> list[np.ndarray | None]:
    """The Keras mask of each of the model's outputs on the batch ``x`` (None where an output has none).

    Keras computes masks only as a model is called, not in ``predict``: this is one eager call.
    """
    import keras
    from keras.src.backend.common.masking import get_keras_mask

    outputs = keras.tree.flatten(model(x, training=False))
    masks = [get_keras_mask(t) for t in outputs]
    return [None if m is None else np.asarray(keras.ops.convert_to_numpy(m)) for m in masks]


def predict_on(model: Any, x: Any) -> Any:
    """The model's predictions of one batch.

    A model built in a ``tf.distribute`` strategy predicts through ``predict``: there Keras 3.15's
    ``predict_on_batch`` hands every replica the whole batch and returns all their outputs, stacked (twice the
    rows on two replicas).
    """
    import keras

    if getattr(model, "_distribute_strategy", None) is not None:
        return model.predict(x, batch_size=len(keras.tree.flatten(x)[0]), verbose=0)
    return model.predict_on_batch(x)


def make_engine(model: Any, graph: ModelGraph, *, formats: tuple[str, ...], metric: Metric | None = None):
    """The simulated engine where the model has a graph, else the real-policy fallback."""
    cls = RealEngine if graph.kind == SUBCLASSED else SimEngine
    return cls(model, graph, formats=formats, metric=metric)
