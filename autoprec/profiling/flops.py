"""FLOPs per sample for Keras layers, from their kind and shapes.

A multiply-add counts 2. Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv,
SeparableConv, ConvTranspose, MultiHeadAttention, LSTM/GRU/SimpleRNN and
Embedding are counted from their kernels; any other layer costs one FLOP per
output element. A layer that computes with sublayers (a KerasHub transformer
block, a user's custom block) costs what its sublayers cost, counted from the
shapes of one real call (:func:`composite_flops`), plus its attention's
score and value einsums, which are ``keras.ops`` calls and not sublayers.

>>> import keras
>>> d = keras.layers.Dense(4); d.build((None, 3))
>>> layer_flops(d, [(None, 3)], [(None, 4)])
24.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def weights_of(op: Any) -> list:
    return list(getattr(op, "weights", []))


def sample_elements(shape: Any) -> float:
    dims = list(shape)[1:] if shape is not None else []
    if any(d is None for d in dims):
        return 0.0
    return float(math.prod(int(d) for d in dims)) if dims else 1.0


def _kernel(layer: Any, name: str = "kernel"):
    k = getattr(layer, name, None)
    return None if k is None else tuple(int(d) for d in k.shape)


def layer_flops(layer: Any, in_shapes: Sequence, out_shapes: Sequence) -> float:
    """FLOPs per sample (a multiply-add counts 2) from a layer's kind and shapes.

    Heavy layers are counted exactly; any other layer costs one FLOP per output
    element. Without shapes (a subclassed model profiled with no sample), the
    count falls back to two FLOPs per parameter.

    >>> import keras
    >>> d = keras.layers.Dense(4); d.build((None, 3))
    >>> layer_flops(d, [(None, 3)], [(None, 4)])
    24.0
    """
    cls = type(layer).__name__
    out_elems = sum(sample_elements(s) for s in out_shapes)
    params = float(sum(math.prod(v.shape) for v in weights_of(layer)))
    if not out_shapes:
        return 2.0 * params
    in_elems = sample_elements(in_shapes[0]) if in_shapes else 0.0
    if cls == "Dense":
        kin, kout = _kernel(layer)[-2:]
        return 2.0 * kin * out_elems
    if cls == "EinsumDense":
        return 2.0 * out_elems * _einsum_contracted(layer)
    if cls in ("Conv1D", "Conv2D", "Conv3D"):
        k = _kernel(layer)
        return 2.0 * math.prod(k[:-1]) * out_elems
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
        k = _kernel(layer, "kernel")
        return 2.0 * math.prod(k[:-2]) * out_elems
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        dk = _kernel(layer, "depthwise_kernel")
        pk = _kernel(layer, "pointwise_kernel")
        spatial = out_elems / pk[-1]
        return 2.0 * spatial * (math.prod(dk) + math.prod(pk))
    if cls in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        k = _kernel(layer)
        in_spatial = in_elems / k[-1] if k[-1] else 0.0
        return 2.0 * in_spatial * math.prod(k)
    if cls in ("MultiHeadAttention", "GroupedQueryAttention") or _is_attention(layer):
        return _attention_flops(layer, in_shapes, out_elems)
    if cls in ("LSTM", "GRU", "SimpleRNN"):
        cell = getattr(layer, "cell", layer)
        k, rk = _kernel(cell), _kernel(cell, "recurrent_kernel")
        steps = int(in_shapes[0][1]) if in_shapes and len(in_shapes[0]) > 2 and in_shapes[0][1] else 1
        return 2.0 * steps * (math.prod(k) + math.prod(rk))
    if cls in ("Embedding", "ReversibleEmbedding"):
        return _embedding_flops(layer, in_shapes, in_elems, out_elems)
    return out_elems


def _embedding_flops(layer: Any, in_shapes: Sequence, in_elems: float, out_elems: float) -> float:
    table = _kernel(layer, "embeddings") or (0, 0)
    vocab, width = table[0], table[-1]
    if type(layer).__name__ == "ReversibleEmbedding" and in_shapes and list(in_shapes[0])[-1:] == [width]:
        # Called in reverse (a language model's head): hidden states times the transposed table.
        return 2.0 * in_elems * vocab
    return out_elems  # a gather: one read per output element


def _is_attention(layer: Any) -> bool:
    """A subclass of Keras's attention layers (KerasHub's ``CachedMultiHeadAttention``)."""
    import keras

    return isinstance(layer, (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention))


def _einsum_contracted(layer: Any) -> float:
    equation = getattr(layer, "equation", "")
    kernel = _kernel(layer)
    try:
        ins, out = equation.split("->")
        _, k_sub = ins.split(",")
    except ValueError:
        return float(math.prod(kernel)) if kernel else 0.0
    # Not strict: the count is an estimate, and an equation whose kernel subscripts do not match the kernel's
    # rank (an ellipsis) should cost a rough figure, not stop the tuning.
    return float(math.prod(d for c, d in zip(k_sub, kernel, strict=False) if c not in out))


def _attention_flops(layer: Any, in_shapes: Sequence, out_elems: float) -> float:
    flops = 0.0
    # A sequence length unknown here (keras.Input((None, d)) and no sample to resolve it) counts as 1.
    tq = int(in_shapes[0][1] or 1) if in_shapes and len(in_shapes[0]) > 2 else 1
    tk = int(in_shapes[1][1] or 1) if len(in_shapes) > 1 and len(in_shapes[1]) > 2 else tq
    for name, steps in (("_query_dense", tq), ("_key_dense", tk), ("_value_dense", tk), ("_output_dense", tq)):
        sub = getattr(layer, name, None)
        if sub is not None and getattr(sub, "kernel", None) is not None:
            flops += 2.0 * steps * math.prod(sub.kernel.shape)
    heads = getattr(layer, "num_heads", getattr(layer, "num_query_heads", 1)) or 1
    key_dim = getattr(layer, "key_dim", None) or getattr(layer, "head_dim", None) or 1
    value_dim = getattr(layer, "value_dim", None) or key_dim
    flops += 2.0 * tq * tk * heads * (key_dim + value_dim)
    return flops or out_elems


def composite_flops(layer: Any, shapes: Mapping[int, tuple[Sequence, Sequence]]) -> float | None:
    """FLOPs per sample of a layer that computes with sublayers, from their recorded calls; None for a leaf.

    ``shapes`` maps ``id(sublayer)`` to the input and output shapes of one
    real call (:func:`autoprec.graph.build_graph` records them on the
    evaluation sample). Each called sublayer is counted by its kind,
    recursively; a ``Softmax`` sublayer marks attention, whose score and
    value products (``2 * scores * head_dim`` each) run as ``keras.ops.einsum``
    inside the parent's ``call``. Without any recorded sublayer call, None.

    >>> import keras
    >>> composite_flops(keras.layers.Dense(2), {}) is None
    True
    """
    subs = layer._flatten_layers(include_self=False, recursive=False)
    called = [s for s in subs if id(s) in shapes]
    if not called:
        return None
    total, scores = 0.0, 0.0
    for sub in called:
        ins, outs = shapes[id(sub)]
        inner = composite_flops(sub, shapes)
        total += inner if inner is not None else layer_flops(sub, ins, outs)
        if type(sub).__name__ == "Softmax" and ins:
            scores += sample_elements(ins[0])
    if _is_attention(layer):
        # Keras's attention may take the fused dot_product_attention path and never call its Softmax.
        return total + _attention_core(layer, shapes)
    return total + 4.0 * scores * head_dim(layer)


def inner_bytes(layer: Any, shapes: Mapping[int, tuple[Sequence, Sequence]]) -> float:
    """Bytes per sample of the float32 activations computed inside a layer that calls sublayers (0 for a leaf).

    A gradient tape holds them until the backward pass, though only the
    layer's own output is a node of the graph: in a transformer block the
    projections, the attention scores and the feed-forward's wide hidden
    layer are ten to twenty times its output. Counted from the sublayers'
    recorded calls, recursively; an attention layer whose ``Softmax`` was
    not called (Keras's fused path) adds its scores and their softmax.

    >>> import keras
    >>> inner_bytes(keras.layers.Dense(2), {})
    0.0
    """
    total, softmax = 0.0, False
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        if id(sub) in shapes:
            total += 4.0 * sum(map(sample_elements, shapes[id(sub)][1])) + inner_bytes(sub, shapes)
            softmax = softmax or type(sub).__name__ == "Softmax"
    if _is_attention(layer) and not softmax:
        total += 2 * 4.0 * _attention_scores(layer, shapes)
    return total


def _attention_scores(layer: Any, shapes: Mapping[int, tuple[Sequence, Sequence]]) -> float:
    """Score elements per sample (``query steps * key steps * heads``) of a Keras attention layer, 0 if unknown."""
    outs = _projections(layer, shapes)
    return 0.0 if outs is None else float(outs[0][1] * outs[1][1] * outs[0][2])


def _projections(layer: Any, shapes: Mapping[int, tuple[Sequence, Sequence]]) -> list[tuple] | None:
    """The real output shapes ``(batch, steps, heads, dim)`` of an attention layer's query, key and value."""
    outs = []
    for name in ("_query_dense", "_key_dense", "_value_dense"):
        sub = getattr(layer, name, None)
        recorded = shapes.get(id(sub)) if sub is not None else None
        if not recorded or not recorded[1] or len(recorded[1][0]) < 4:
            return None
        outs.append(tuple(recorded[1][0]))
    return outs


def _attention_core(layer: Any, shapes: Mapping[int, tuple[Sequence, Sequence]]) -> float:
    """Scores and weighted sum of a Keras attention layer, from its projections' real output shapes."""
    outs = _projections(layer, shapes)
    if outs is None:
        return 0.0
    (_, tq, heads, dk), (_, tk, _, _), (_, _, _, dv) = outs
    return 2.0 * tq * tk * heads * (dk + dv)


def head_dim(layer: Any) -> float:
    """The per-head width of an attention layer: its own attribute, else its query projection's last kernel dim.

    >>> import keras
    >>> head_dim(keras.layers.MultiHeadAttention(num_heads=2, key_dim=4))
    4.0
    """
    for name in ("key_dim", "head_dim", "_key_dim", "_head_dim"):
        value = getattr(layer, name, None)
        if isinstance(value, int) and value > 0:
            return float(value)
    for sub in layer._flatten_layers(include_self=False):
        kernel = getattr(sub, "kernel", None)
        if type(sub).__name__ in ("EinsumDense", "Dense") and kernel is not None:
            return float(kernel.shape[-1])
    return 1.0
