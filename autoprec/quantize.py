"""Quantized candidates through Keras's own quantization: int8, int4 (weight-only) and float8.

Keras 3.15 quantizes ``Dense``, ``EinsumDense`` and ``Embedding`` (and
keras-hub's ``ReversibleEmbedding``) with ``layer.quantize(mode)``; a
subclass of one is not quantized (Keras checks the exact type). A quantized
layer keeps a float policy for the rest of its computation, named the way
Keras names it: ``int8_from_mixed_bfloat16``. Keras refuses int8 with
float16 compute, so there the float part is float32.

What each mode does at inference, as Keras implements it:

- ``int8``: the kernel per output channel (abs-max to [-127, 127]), and the
  inputs per row, quantized on the fly (abs-max along the last axis);
- ``int4``: the kernel per output channel to [-8, 7], packed two to a byte;
  the inputs stay in the float format (weight-only);
- ``float8``: inputs and kernel quantized to ``float8_e4m3fn`` with scales
  that delayed scaling learns during training. After ``quantize`` every scale
  is 1, so values above 448 clip: :func:`calibrate_float8` sets the scales
  from the largest inputs and weights of calibration data.

The engine evaluates a quantized candidate by calling a quantized *twin* of
the layer (:func:`quantized_twin`), built once per mode, never per trial:
the same numerics as the emitted model, which goes through the same
``quantize``.

Policy names are built and parsed in :mod:`autoprec.formats`:

>>> quantized_name("int8", "mixed_float16")
'int8_from_float32'
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from autoprec.formats import FLOAT8_MAX, FLOAT32, quantized_name, split

logger = logging.getLogger("autoprec")

QUANTIZABLE = ("Dense", "EinsumDense", "Embedding", "ReversibleEmbedding")


def is_quantizable(layer: Any) -> bool:
    """Keras can quantize this layer: one of :data:`QUANTIZABLE`, exactly (not a subclass), and built."""
    cls = type(layer)
    return cls.__name__ in QUANTIZABLE and cls.__module__.startswith(("keras.", "keras_hub.")) and layer.built


def quantized_twin(layer: Any, name: str) -> Any:
    """A copy of ``layer`` (same config and weights) that went through Keras's ``quantize`` for the policy ``name``."""
    mode, base = split(name)
    twin = layer.__class__.from_config({**layer.get_config(), "dtype": base})
    twin.build_from_config(layer.get_build_config())
    twin.set_weights(layer.get_weights())
    twin.quantize(mode)
    return twin


def quantize_in_place(layer: Any, name: str) -> None:
    """Give ``layer`` the float part of ``name``, then quantize it with Keras (its weights change for good)."""
    mode, base = split(name)
    if layer.dtype_policy.name != base:
        layer.dtype_policy = base
    layer.quantize(mode)


def calibrate_float8(layer: Any, inputs_absmax: float) -> None:
    """Set a float8 layer's scales from the largest input and weight it will see (both ``amax / 448``).

    Keras's float8 scales are learned by delayed scaling during training and
    start at 1, which clips anything above 448; post-training they are set
    once from calibration data instead.
    """
    import numpy as np

    kernel = getattr(layer, "_kernel", None)
    if kernel is None or getattr(layer, "inputs_scale", None) is None:
        return
    kernel_max = float(np.max(np.abs(np.asarray(kernel.value))))
    for scale, amax in ((layer.inputs_scale, inputs_absmax), (layer.kernel_scale, kernel_max)):
        if amax > 0 and np.isfinite(amax):
            scale.assign(np.asarray(amax / FLOAT8_MAX, dtype=scale.dtype))


@functools.cache
def measured_speed(mode: str, base: str = FLOAT32, *, width: int = 1024, batch: int = 64, repeats: int = 20) -> float:
    """This device's speed of a ``mode`` Dense against float32, measured once per process (float32 time / mode time).

    A 1024x1024 Dense on a batch of 64, its traced predict timed interleaved
    with a float32 twin. On a CPU without int8 kernels it is below 1: there
    the honest gain of integer formats is size.
    """
    import keras
    import numpy as np

    dense = keras.layers.Dense(width)
    dense.build((None, width))
    quantized = quantized_twin(dense, quantized_name(mode, base))
    x = np.random.default_rng(0).normal(size=(batch, width)).astype("float32")
    calls = {
        "float32": keras.Sequential([keras.Input((width,)), dense]),
        mode: keras.Sequential([keras.Input((width,)), quantized]),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for m in calls.values():
        m.predict_on_batch(x)  # trace
    for _ in range(repeats):
        for k, m in calls.items():
            t = time.perf_counter()
            m.predict_on_batch(x)
            times[k].append(time.perf_counter() - t)
    ratio = float(np.median(times["float32"]) / np.median(times[mode]))
    logger.info("autoprec: measured %s Dense speed on this device: %.2fx float32.", mode, ratio)
    return ratio


def calibrate_model(model: Any, data: Any) -> int:
    """Calibrate every float8 layer of a Functional/Sequential ``model`` on ``data``; returns how many.

    Each layer's largest input over the data comes from a probe model that
    ends at that layer's input; the scales follow :func:`calibrate_float8`.
    """
    import keras
    import numpy as np

    from autoprec.data import DEFAULT_BATCH_SIZE, EvalData

    layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if getattr(layer, "quantization_mode", None) == "float8"
    ]
    if not layers:
        return 0
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    amax = np.zeros(len(layers))
    for x, _ in EvalData.get(data, batch_size=DEFAULT_BATCH_SIZE, what="calibration_data", model=model).batches():
        outs = probe.predict_on_batch(x)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        amax = np.maximum(amax, [float(np.max(np.abs(o))) for o in outs])
    for layer, value in zip(layers, amax, strict=True):
        calibrate_float8(layer, float(value))
    return len(layers)
