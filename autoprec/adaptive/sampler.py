"""The sampled statistics pass: one traced float32 forward/backward pass on one batch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from autoprec import backends
from autoprec.apply import set_policies_in_place
from autoprec.formats import FLOAT32, LOW_PRECISION, Format
from autoprec.graph import ModelGraph, keyed_layers
from autoprec.profiling import stats

logger = logging.getLogger("autoprec")


@contextlib.contextmanager
def float32_policies(model: Any) -> Iterator[None]:
    """Inside the block every 16-bit layer of ``model`` computes in float32; the policies come back after.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d", dtype="mixed_bfloat16")])
    >>> with float32_policies(m):
    ...     inside = m.get_layer("d").compute_dtype
    >>> inside, m.get_layer("d").compute_dtype
    ('float32', 'bfloat16')
    """
    saved = {key: layer.dtype_policy.name for key, layer in keyed_layers(model).items()}
    set_policies_in_place(model, {key: FLOAT32 for key, name in saved.items() if name in LOW_PRECISION})
    try:
        yield
    finally:
        set_policies_in_place(model, saved)


class Sampler:
    """One traced float32 forward/backward pass on a batch: statistics of every node's activations and gradients.

    The layers are switched to float32 while the pass is traced (see
    :func:`float32_policies`), so the trace does not depend on the policies
    training runs with and is made once. The loss scale is a tensor argument
    (gradients are multiplied by it before :func:`autoprec.profiling.stats.table`), so a
    new scale does not retrace either.

    Example:
        >>> sampler = Sampler(model, build_graph(model), get_format("mixed_float16"), loss)  # doctest: +SKIP
        >>> rows, loss_value = sampler(x, y, 2.0**15)                                          # doctest: +SKIP
    """

    def __init__(self, model: Any, graph: ModelGraph, fmt: Format, loss: Any) -> None:
        from autoprec.engine import SimEngine

        with float32_policies(model):
            self._engine = SimEngine(model, graph, formats=(fmt.name,))
        self._model, self._fmt, self._loss = model, fmt, loss
        self.names: list[str] = []
        self.traces = 0
        self._fn = backends.compile_function(self._step)

    def _step(self, x: Any, y: Any, scale: Any) -> tuple[Any, Any]:
        from keras import ops

        self.traces += 1  # runs only while tracing
        taken: list[tuple[str, Any]] = []

        def forward(inputs: Any, watch: Any) -> Any:
            taken.clear()  # a backend may call forward more than once; keep the last call's

            def hook(path, op, call, args, kwargs, out):
                # Only a node with one floating output is watched (as in profile).
                if isinstance(out, (list, tuple, dict)) or "float" not in str(getattr(out, "dtype", "")):
                    return None
                taken.append((path, out))
                return watch(out)

            return self._engine.run(inputs, None, hook)

        with float32_policies(self._model):
            _, loss, grads, _ = backends.gradient_pass(forward, self._loss, x, y, [])
        (act,) = stats.table([a for _, a in taken], self._fmt)
        (grad,) = stats.table([g * ops.cast(scale, g.dtype) for g in grads], self._fmt)
        self.names = [p for p, _ in taken]
        return ops.concatenate([act, grad], axis=1), loss

    def __call__(self, x: Any, y: Any, scale: float) -> tuple[dict[str, dict[str, float]], float]:
        """Statistics columns per node path (a shared layer's calls merged), and the batch loss."""
        rows, loss = self._fn(x, y, np.float32(scale))
        merged: dict[str, np.ndarray] = {}
        for path, row in zip(self.names, np.asarray(keras.ops.convert_to_numpy(rows), np.float64), strict=True):
            merged[path] = stats.merge(merged.get(path), row)
        w = stats.WIDTH
        out = {p: {**stats.columns(v[:w], stats.ACT), **stats.columns(v[w:], stats.GRAD)} for p, v in merged.items()}
        return out, float(keras.ops.convert_to_numpy(loss))


# ---------------------------------------------------------------------------
# One training run under the callback
