"""The few pieces that need a backend's own machinery, chosen by ``keras.backend.backend()``.

Everything else in autoprec is written against Keras itself. A backend that
lacks a piece raises :class:`autoprec.errors.BackendError` naming it.

>>> from autoprec import backends
>>> callable(backends.compile_function)
True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from autoprec.errors import BackendError


def name() -> str:
    import keras

    return keras.backend.backend()


def compile_function(fn: Callable, *, optimize: bool = True) -> Callable:
    """Trace ``fn`` once: ``tf.function`` on TensorFlow, ``jax.jit`` on JAX.

    Arguments that change between calls (the precision codes) must be passed
    as tensors, never closed over, so that changing them never retraces. On
    TensorFlow the first call fixes a signature whose leading dimensions are
    unknown, so a smaller last batch reuses the same trace. ``optimize=False``
    skips TensorFlow's graph optimizer (grappler) for a large graph that runs
    a few times: the statistics step of MobileNetV2 at 224x224 spent 8 s
    (1.5 predict passes) in it, more than its runs gained.
    """
    backend = name()
    if backend == "tensorflow":
        return _GenericTFFunction(fn, optimize=optimize)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn  # torch / numpy: eager, one "trace" per call is not counted as a retrace


def traces_per_batch_size() -> bool:
    """True where a compiled function traces again for every new batch size (``jax.jit``).

    The engine then pads a smaller last batch to the traced size: one trace of a
    large model costs seconds, and a padded batch costs only its extra rows.
    """
    return name() == "jax"


class _GenericTFFunction:
    """A ``tf.function`` whose input signature is the first call's with the leading dimensions unknown."""

    def __init__(self, fn: Callable, *, optimize: bool = True) -> None:
        self._fn = fn
        self._compiled: Callable | None = None
        self._optimize = optimize

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            import keras
            import tensorflow as tf

            def spec(a: Any) -> Any:
                t = tf.convert_to_tensor(a)
                return tf.TensorSpec((None, *t.shape[1:]) if t.shape.rank else (), t.dtype)

            signature = [keras.tree.map_structure(spec, a) for a in args]
            # autograph=False: the traced code has no Python control flow on tensors, and
            # converting Keras and autoprec code costs seconds of tracing on large graphs.
            self._compiled = tf.function(self._fn, input_signature=signature, autograph=False)
        if not self._optimize:
            # Every call: TensorFlow instantiates (and optimizes) a function again for each configuration it
            # is called under.
            from autoprec.backends.tensorflow import without_graph_optimizer

            with without_graph_optimizer():
                return self._compiled(*args)
        return self._compiled(*args)


def gradient_pass(forward: Callable, loss_fn: Callable, x: Any, y: Any, variables: list) -> tuple:
    """Differentiate the loss at layer outputs; return (predictions, loss, output grads, variable grads).

    ``forward(x, watch)`` returns the predictions and calls ``t = watch(t)`` on
    every layer output it wants a gradient for, letting the returned tensor
    flow on. TensorFlow watches ``t`` on a tape; JAX adds a zero "tap" to it
    and differentiates with respect to the taps; PyTorch differentiates the outputs with autograd.
    """
    backend = name()
    if backend == "tensorflow":
        from autoprec.backends import tensorflow as tf_backend

        return tf_backend.gradient_pass(forward, loss_fn, x, y, variables)
    if backend == "jax":
        from autoprec.backends import jax as jax_backend

        return jax_backend.gradient_pass(forward, loss_fn, x, y, variables)
    if backend == "torch":
        from autoprec.backends import torch as torch_backend

        return torch_backend.gradient_pass(forward, loss_fn, x, y, variables)
    raise BackendError(
        f"Gradient statistics at layer outputs need the TensorFlow, JAX or PyTorch backend. Received "
        f"KERAS_BACKEND={backend!r}. Use profile(..., method='ablation') for ablation only, or run with "
        "KERAS_BACKEND=tensorflow, jax or torch."
    )


def is_cuda_gpu_available() -> bool:
    """True when the active backend sees a CUDA GPU."""
    backend = name()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # a broken driver means no usable GPU, not a crash
        return False
    return False


#: Environment variable that overrides what :func:`cpu_has_fast_bf16` reads off the CPU: ``"0"`` runs
#: autoprec (and its test suite) as on a CPU without AVX512_BF16/AMX, ``"1"`` as on one with it.
FAST_BF16_ENV = "AUTOPREC_CPU_FAST_BF16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AVX512_BF16 or AMX (oneDNN then runs bfloat16 fast).

    ``AUTOPREC_CPU_FAST_BF16=0`` (or ``1``) overrides the CPU's own flags, so that the
    local device profile of the other kind of machine can be tried, and tested, anywhere.
    """
    import os

    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GiB (NaN where it cannot be read, as on Windows).

    >>> peak_rss_gb() > 0  # doctest: +SKIP
    True
    """
    try:
        import resource
    except ImportError:
        return float("nan")
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # macOS reports bytes, Linux KiB


def device_description() -> str:
    """Where this process computes, in words: the backend, the accelerator or the CPU and its bfloat16 kind.

    Every measured figure (``cost="measured"``, ``autoprec measure``) carries it,
    so that a step time is never read as another machine's.

    >>> device_description()  # doctest: +SKIP
    'jax on gpu: NVIDIA H200'
    """
    import platform

    backend = name()
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform != "cpu":
                return f"jax on {device.platform}: {device.device_kind}"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"torch on cuda: {torch.cuda.get_device_name(0)}"
        elif backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                details = tf.config.experimental.get_device_details(gpus[0])
                return f"tensorflow on gpu: {details.get('device_name', gpus[0].name)}"
    except Exception:  # a broken driver: the figures are the CPU's, and say so
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    kind = "with AVX512_BF16/AMX" if cpu_has_fast_bf16() else "without fast bfloat16"
    return f"{backend} on cpu: {cpu}, {os.cpu_count()} cores, {kind}"
