"""The cost model: an estimated speed-up for an assignment, before running it.

Each layer is charged a roofline-style time: its FLOPs at the device's
float32 rate plus the bytes it moves (reading its inputs, writing its
output, and reading its weights once per batch) at the device's bandwidth.
A 16-bit layer divides the compute by the device's speed factor for that
format and moves its activations at half the width. Every precision
boundary, a tensor that crosses from a float32 layer to a 16-bit one or
back, is charged a cast: reading the tensor and writing it at the new width.
The estimate is ``time(all float32) / time(assignment)``.

On a GPU, float16/bfloat16 matmuls and convolutions whose dimensions are not
multiples of 8 miss the tensor cores; such layers get no compute speed-up
and are flagged.

>>> dev = DEVICES["cpu"]
>>> dev.speed["mixed_bfloat16"] > 1 > dev.speed["mixed_float16"]
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoprec.data import COST_BATCH_SIZE
from autoprec.errors import ArgumentError, describe
from autoprec.formats import FLOAT32, FLOAT64, MIXED_BFLOAT16, MIXED_FLOAT16, split
from autoprec.formats import weight_bytes as weight_bytes_of
from autoprec.graph import ModelGraph

_ALIGNED_CLASSES = {
    "Dense",
    "EinsumDense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "SeparableConv1D",
    "SeparableConv2D",
    "MultiHeadAttention",
    "LSTM",
    "GRU",
}


@dataclass(frozen=True)
class Device:
    """Throughput figures for the cost model (ratios matter, not the absolute values)."""

    name: str
    flops_per_s: float
    bytes_per_s: float
    speed: Mapping[str, float] = field(default_factory=dict)
    tensor_cores: bool = False


# Figures: the CPU factors are those measured on this project's oneDNN CPUs
# (bf16 trains 1.6-1.9x faster, float16 1.4-7x slower, DESIGN.md); the GPU
# ones are a conservative tensor-core gain for a datacentre GPU. A TPU's
# matrix units run bfloat16; float16 is not a TPU format (XLA computes it
# through float32), so it is charged no gain there.
DEVICES = {
    "cpu": Device("cpu", 1.0e11, 2.0e10, {MIXED_BFLOAT16: 1.8, MIXED_FLOAT16: 0.3}),
    "cpu_no_bf16": Device("cpu_no_bf16", 1.0e11, 2.0e10, {MIXED_BFLOAT16: 0.8, MIXED_FLOAT16: 0.3}),
    "gpu": Device("gpu", 2.0e13, 2.0e12, {MIXED_BFLOAT16: 4.0, MIXED_FLOAT16: 4.0}, tensor_cores=True),
    "tpu": Device("tpu", 4.0e13, 1.2e12, {MIXED_BFLOAT16: 4.0, MIXED_FLOAT16: 1.0}),
}

#: ``device="this"``: the machine tune runs on (a CUDA GPU if the backend sees one, else this CPU's kind).
THIS = "this"
#: Every spelling of ``device=`` besides a :class:`Device`: the profiles, ``"this"``, and ``None`` for the default.
DEVICE_NAMES = (*DEVICES, THIS)


def local_device() -> str:
    """The profile of the machine this process runs on: ``gpu``, ``cpu`` (fast bf16) or ``cpu_no_bf16``.

    ``AUTOPREC_CPU_FAST_BF16=0/1`` overrides what the CPU's flags say
    (:func:`autoprec.backends.cpu_has_fast_bf16`).
    """
    from autoprec import backends

    if backends.is_cuda_gpu_available():
        return "gpu"
    return "cpu" if backends.cpu_has_fast_bf16() else "cpu_no_bf16"


def resolve_device(device: str | Device | None, *, target: str, target_why: str = "as asked") -> tuple[Device, str]:
    """``(device, why)``: the profile the cost model charges, and why it was chosen.

    The device is where the tuned policy will *run*, not where tune happens
    to run: by default an accelerator (a GPU for float16 and bfloat16), since
    16-bit training is what a GPU or TPU is for, whatever CPU tunes it. Only
    ``device="this"`` (or ``target="auto"``, which reads this machine) uses
    the local machine's profile.

    >>> resolve_device(None, target="mixed_bfloat16")[0].name
    'gpu'
    >>> resolve_device("tpu", target="mixed_bfloat16")
    (Device(name='tpu', ...), 'as asked')
    """
    if isinstance(device, Device):
        return device, "a profile passed in"
    if device is None:
        if target_why != "as asked":
            return DEVICES[local_device()], "target='auto' was resolved on this machine"
        return DEVICES["gpu"], f"the default for {target}: the policy is for GPU training (pass device= to change it)"
    if device == THIS:
        return DEVICES[local_device()], "device='this': the machine tune runs on"
    check_device(device)
    return DEVICES[device], "as asked"


def check_device(device: Any) -> None:
    """Refuse a ``device=`` that :func:`resolve_device` would refuse, without looking at this machine."""
    if device is None or isinstance(device, Device) or device in DEVICE_NAMES:
        return
    raise ArgumentError(
        f"Expected device to be one of {list(DEVICE_NAMES)}, a cost.Device, or None (a GPU). "
        f"Received: device={describe(device)}."
    )


def slower_note(device: Device, target: str) -> str:
    """A sentence when ``device`` runs ``target`` slower than float32, else ``""``."""
    factor = device.speed.get(target, 1.0)
    if factor >= 1.0:
        return ""
    return (
        f"on the {device.name} profile the cost model rates {target} at {factor:g}x float32's compute speed, so "
        "float32 wins wherever the budget leaves a choice; pass device='gpu' (or 'tpu') for the machine the "
        "policy will train on"
    )


def misaligned(info: Any) -> bool:
    """True when a matmul/conv layer has a dimension that is not a multiple of 8."""
    if info.class_name not in _ALIGNED_CLASSES or info.layer is None:
        return False
    dims = []
    for name in ("units", "filters"):
        value = getattr(info.layer, name, None)
        if isinstance(value, int):
            dims.append(value)
    kernel = getattr(info.layer, "kernel", None)
    if kernel is not None and len(kernel.shape) >= 2:
        dims.append(int(kernel.shape[-2]))
    return any(d % 8 for d in dims)


class CostModel:
    """Estimated step time per assignment on one device profile.

    Args:
        graph: the model graph (FLOPs, bytes, producers).
        device: a key of :data:`DEVICES` or a :class:`Device`.
        batch_size: the training batch the weight reads are shared by.

    Example:
        >>> cm = CostModel(graph, device="gpu")                 # doctest: +SKIP
        >>> cm.speedup({"dense": "mixed_float16"})  # doctest: +SKIP
    """

    def __init__(
        self,
        graph: ModelGraph,
        *,
        device: str | Device | None = "cpu",
        batch_size: int = COST_BATCH_SIZE,
        quantized_speed: Mapping[str, float] | None = None,
    ) -> None:
        self.batch_size = batch_size
        # Speed of each quantized mode against float32 on this device: measured, never assumed.
        self.quantized_speed = dict(quantized_speed or {})
        if not isinstance(device, Device):
            device = resolve_device(device, target=MIXED_FLOAT16)[0]
        self.graph, self.device = graph, device
        self._misaligned = {i.path for i in graph.layers if device.tensor_cores and misaligned(i)}
        self._baseline = self.time({})
        self._bytes = self.weight_bytes({})

    @property
    def flagged(self) -> set[str]:
        """Layers whose 16-bit matmuls would miss the tensor cores (dimension not a multiple of 8)."""
        return set(self._misaligned)

    def _layer_time(self, info: Any, name: str, input_bytes: float) -> float:
        d = self.device
        mode, base = split(name)
        # weights are read once per batch, not per sample, at their stored width
        weight_bytes = weight_bytes_of(info.params, name) / self.batch_size
        activations = info.output_bytes + input_bytes
        if mode is not None:
            speed = self.quantized_speed.get(mode, 1.0) * (d.speed.get(base, 1.0) if base != FLOAT32 else 1.0)
            width = 2.0 if base in d.speed else 1.0
            return info.flops / (d.flops_per_s * speed) + (activations / width + weight_bytes) / d.bytes_per_s
        if name in (FLOAT32, FLOAT64) or name not in d.speed:
            factor = 0.5 if name == FLOAT64 else 1.0
            return info.flops / (d.flops_per_s * factor) + (activations + weight_bytes) / d.bytes_per_s
        speed = 1.0 if info.path in self._misaligned else d.speed[name]
        return info.flops / (d.flops_per_s * speed) + (activations / 2.0 + weight_bytes) / d.bytes_per_s

    def time(self, assignment: Mapping[str, str]) -> float:
        """Estimated seconds per sample for a choice per decision (see ``ModelGraph.resolve_nodes``)."""
        names = self.graph.resolve_nodes(assignment)
        total = 0.0
        by_path = {i.path: i for i in self.graph.layers}
        for info in self.graph.layers:
            mine = names[info.path]
            total += self._layer_time(info, mine, sum(by_path[p].output_bytes for p in info.producers))
            for producer in info.producers:
                if split(names[producer])[1] != split(mine)[1]:
                    # A cast at a precision boundary, either way (a float32 island in a
                    # 16-bit stream pays one in and one out): it reads the tensor at one
                    # width and writes it at the other, 1.5x its float32 bytes.
                    total += 1.5 * by_path[producer].output_bytes / self.device.bytes_per_s
        return total

    def speedup(self, assignment: Mapping[str, str]) -> float:
        """``time(all float32) / time(assignment)``."""
        t = self.time(assignment)
        return self._baseline / t if t > 0 else 1.0

    def weight_bytes(self, assignment: Mapping[str, str]) -> float:
        """The model's weight bytes in storage under ``assignment``, every layer (mixed policies keep float32 ones)."""
        names = self.graph.resolve_nodes(assignment)
        return float(sum(weight_bytes_of(i.params, names[i.path]) for i in self.graph.layers if i.is_layer))

    def size_ratio(self, assignment: Mapping[str, str]) -> float:
        """``weight bytes(all float32) / weight bytes(assignment)``: how many times smaller the weights get."""
        size = self.weight_bytes(assignment)
        return self._bytes / size if size > 0 else 1.0
