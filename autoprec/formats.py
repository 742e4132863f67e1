"""The precision formats: their names, compute dtypes, ranges and the default loss scale.

This module owns every fact about a format. The policy names are Keras's
own (``keras.DTypePolicy(name)``), the compute dtypes come from Keras, and
the ranges from ``ml_dtypes.finfo`` (the dtype library Keras and JAX use):

>>> get("mixed_float16").max_finite
65504.0
>>> get("mixed_bfloat16").dtype
'bfloat16'
>>> DEFAULT_LOSS_SCALE == 2.0**15
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from autoprec.errors import ArgumentError, PolicyError, describe

FLOAT32 = "float32"
FLOAT64 = "float64"
MIXED_FLOAT16 = "mixed_float16"
MIXED_BFLOAT16 = "mixed_bfloat16"
LOW_PRECISION = (MIXED_FLOAT16, MIXED_BFLOAT16)
TARGETS = LOW_PRECISION
POLICY_NAMES = (FLOAT32, MIXED_FLOAT16, MIXED_BFLOAT16, FLOAT64)
QUANTIZED_MODES = ("int8", "int4", "float8")  # Keras's layer.quantize modes offered as candidates
FLOAT8_MAX = 448.0  # float8_e4m3fn's largest finite value
# Bytes one weight takes in storage. Mixed policies keep float32 variables, and
# float8 layers keep a float32 kernel with their scales: no saving on disk.
BYTES_PER_WEIGHT = {
    FLOAT32: 4.0,
    MIXED_FLOAT16: 4.0,
    MIXED_BFLOAT16: 4.0,
    FLOAT64: 8.0,
    "int8": 1.0,
    "int4": 0.5,
    "float8": 4.0,
}

# keras.optimizers.LossScaleOptimizer(initial_scale=2**15): the scale a
# float16 training run starts at, and the one gradient statistics are judged
# at (a test checks that Keras's default still says so).
DEFAULT_LOSS_SCALE = 2.0**15


@dataclass(frozen=True)
class Format:
    """A 16-bit compute format: policy name, compute dtype and range.

    Example:
        >>> f = get("mixed_float16")
        >>> f.short, f.min_normal == 2.0**-14
        ('float16', True)
    """

    name: str
    dtype: str
    max_finite: float
    min_normal: float
    min_subnormal: float

    @property
    def short(self) -> str:
        """``float16`` or ``bfloat16``: the word used in sentences."""
        return self.dtype


@functools.cache
def get(name: object) -> Format:
    """The :class:`Format` of a 16-bit policy name; raise :class:`PolicyError` for anything else.

    >>> get("mixed_bfloat16").max_finite > 1e38
    True
    """
    if name not in LOW_PRECISION:
        hint = f" Use 'mixed_{name}' instead." if name in ("float16", "bfloat16") else ""
        raise PolicyError(
            f"Expected a 16-bit policy name, one of {list(LOW_PRECISION)}. Received: {describe(name)}.{hint}"
        )
    import ml_dtypes
    import numpy as np

    dtype = compute_dtype(name)
    info = ml_dtypes.finfo(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.finfo(np.dtype(dtype))
    return Format(name, dtype, float(info.max), float(info.tiny), float(info.smallest_subnormal))


@functools.cache
def compute_dtype(name: str) -> str:
    """The dtype a layer with policy ``name`` computes in, as Keras says.

    >>> compute_dtype("mixed_float16"), compute_dtype("float32")
    ('float16', 'float32')
    """
    import keras

    return keras.DTypePolicy(name).compute_dtype


def split(name: str) -> tuple[str | None, str]:
    """``(mode, float policy)`` of a policy name; ``mode`` is None for a float policy.

    >>> split("int8_from_mixed_bfloat16"), split("mixed_bfloat16")
    (('int8', 'mixed_bfloat16'), (None, 'mixed_bfloat16'))
    """
    if "_from_" in name:
        mode, base = name.split("_from_", 1)
        return mode.split("/", 1)[0], base
    return None, name


def leaves_float32(name: str) -> bool:
    """The policy computes in 16-bit or is quantized: a decision that left float32.

    >>> leaves_float32("mixed_bfloat16"), leaves_float32("int4_from_float32"), leaves_float32("float32")
    (True, True, False)
    """
    return name in LOW_PRECISION or split(name)[0] is not None


def _combines(mode: str, base: str) -> bool:
    """Keras quantizes ``mode`` over the float policy ``base``.

    Keras refuses int8 with float16 compute ("doesn't work well with compute_dtype='float16'").
    """
    return mode in QUANTIZED_MODES and base in (FLOAT32, *LOW_PRECISION) and (mode, base) != ("int8", MIXED_FLOAT16)


def quantized_name(mode: str, base: str) -> str:
    """The Keras policy name for ``mode`` on top of the float policy ``base`` (float32 where Keras refuses it).

    >>> quantized_name("int8", "mixed_bfloat16"), quantized_name("int8", "mixed_float16")
    ('int8_from_mixed_bfloat16', 'int8_from_float32')
    """
    if not _combines(mode, base):
        base = FLOAT32
    return f"{mode}_from_{base}"


def is_quantized(name: object) -> bool:
    """A Keras quantized policy name autoprec accepts: ``{int8,int4,float8}_from_{float32,mixed_*}``.

    >>> is_quantized("int8_from_mixed_bfloat16"), is_quantized("int8_from_mixed_float16")
    (True, False)
    """
    if not isinstance(name, str) or "_from_" not in name:
        return False
    mode, base = name.split("_from_", 1)
    return _combines(mode, base)


def weight_bytes(params: int, name: str) -> float:
    """Storage bytes of ``params`` weights under the policy ``name`` (scales excluded: one per output channel).

    >>> weight_bytes(1000, "int4_from_float32"), weight_bytes(1000, "mixed_float16")
    (500.0, 4000.0)
    """
    mode, base = split(name)
    return params * BYTES_PER_WEIGHT[mode or base]


def check_policy_name(name: object, *, what: str = "policy") -> str:
    """Return ``name`` if it is an accepted policy name, else raise :class:`PolicyError`.

    >>> check_policy_name("mixed_bfloat16")
    'mixed_bfloat16'
    """
    if isinstance(name, str) and (name in POLICY_NAMES or is_quantized(name)):
        return name
    hint = ""
    if name in ("float16", "bfloat16"):
        # A pure 16-bit policy set after build does not really compute in 16-bit
        # (Keras 3.15); the mixed policies keep float32 variables and do.
        hint = f" Use 'mixed_{name}' instead: it computes in {name} and keeps float32 weights."
    raise PolicyError(
        f"Expected a {what} name, one of {list(POLICY_NAMES)} or a quantized one such as "
        f"'int8_from_mixed_bfloat16'. Received: {describe(name)}.{hint}"
    )


def resolve_target(target: object) -> tuple[str, str]:
    """``(target, why)``: the 16-bit policy to tune for and, for ``"auto"``, why it was picked.

    ``auto`` picks float16 on a CUDA GPU and bfloat16 on a CPU (fast where
    oneDNN has AVX512_BF16 or AMX; elsewhere it still keeps float32's range,
    while float16 kernels are slow on CPUs).

    >>> resolve_target("mixed_bfloat16")
    ('mixed_bfloat16', 'as asked')
    """
    if target in TARGETS:
        return str(target), "as asked"
    if target != "auto":
        raise ArgumentError(f"Expected target to be one of {[*TARGETS, 'auto']}. Received: target={describe(target)}.")
    from autoprec import backends

    if backends.is_cuda_gpu_available():
        return MIXED_FLOAT16, "a CUDA GPU is visible; its tensor cores run float16"
    if backends.cpu_has_fast_bf16():
        return MIXED_BFLOAT16, "no GPU; this CPU has AVX512_BF16/AMX, which oneDNN runs fast"
    return MIXED_BFLOAT16, "no GPU; bfloat16 keeps float32's range, and float16 kernels are slow on CPUs"
