"""The model graph: which layers exist, what they cost, and what role each plays.

:func:`build_graph` walks any Keras model (Functional, Sequential, nested
models, subclassed models and layers with sublayers) and lists each *leaf*
node with its key, its Keras ``layer.path``, class, parameters, FLOPs and
output bytes per sample, its producers, its role, and whether it is pinned
to float32 and why. The graph is read-only: cloning and setting policies
live in :mod:`autoprec.apply`.

Roles:

- ``weighted``: a layer with float weights (or an attention layer): a decision unit.
- ``compute``: a weightless layer that computes (activations, ``Softmax``,
  ``Rescaling``, ``Lambda``, merges, average pooling, weightless
  normalization, custom weightless layers). It may carry its own policy; by
  default it joins its producers' decision (see :mod:`autoprec.search.space`).
- ``movement``: pure data movement (``Reshape``, ``Flatten``, ``Dropout``,
  cropping, padding, max pooling): it always follows its input.
- ``op``: a ``keras.ops`` call on symbolic tensors. It is not a layer and has
  no policy: it computes in its inputs' dtype.
- ``block``: a layer whose author-written ``call`` runs sublayers (a KerasHub
  transformer block). Where the evaluation sample shows which sublayers it
  calls, each that computes is a node of its own, listed just before the
  block in call order (``LayerInfo.block`` names the block): the attention
  projections, the norms, the feed-forward layers. The block itself is not a
  decision: with every decided sublayer in float32 it is float32; else the
  block and the sublayers it keeps (its attention layer, a softmax without a
  ``path``) compute in the 16-bit format, and only the float32 sublayers do
  not (see :meth:`ModelGraph.block_state`).

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
...                           keras.layers.Dense(2, name="out")])
>>> graph = build_graph(model)
>>> [(i.path, i.role, i.pinned) for i in graph.layers]
[('h', 'weighted', None), ('out', 'weighted', 'PINNED_OUTPUT')]
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoprec.decisions import Reason
from autoprec.errors import PathCollisionError, PolicyError, UnsupportedModelError, describe
from autoprec.formats import FLOAT32, LOW_PRECISION, split
from autoprec.profiling.flops import composite_flops, inner_bytes, layer_flops, sample_elements, weights_of

FUNCTIONAL = "functional"
SEQUENTIAL = "sequential"
SUBCLASSED = "subclassed"

WEIGHTED, COMPUTE, MOVEMENT, OP, BLOCK = "weighted", "compute", "movement", "op", "block"

_ATTENTION = {"MultiHeadAttention", "GroupedQueryAttention", "Attention", "AdditiveAttention"}
_SOFTMAX_LIKE = {"softmax", "sigmoid", "log_softmax"}
# Layers that only move or select values: their output equals some of their
# inputs, so their precision is their input's. Everything else weightless computes.
_MOVEMENT = {
    "Dropout",
    "Flatten",
    "Reshape",
    "Identity",
    "Permute",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "ActivityRegularization",
    "RepeatVector",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "Masking",
    "InputLayer",
}
# Walking back from an output through these finds a softmax that still feeds it directly.
_PASSTHROUGH = _MOVEMENT | {"Activation", "Softmax"}


@dataclass(frozen=True)
class LayerInfo:
    """One leaf node of the graph. ``layer`` is the Keras layer or operation (not compared)."""

    path: str
    class_name: str
    params: int
    flops: float
    output_bytes: float
    order: int
    role: str
    pinned: str | None
    producers: tuple[str, ...]
    parent: str | None
    policy: str
    keras_path: str = ""
    containers: tuple[str, ...] = ()
    sublayers: tuple[str, ...] = ()
    sublayer_classes: tuple[str, ...] = ()
    sublayer_keras_paths: tuple[str, ...] = ()
    quantizable: bool = False  # Keras can quantize it (Dense, EinsumDense, Embedding): int8/int4/float8 candidates
    inner_bytes: float = 0.0  # per sample, the activations inside a block (a gradient tape holds them too)
    block: str | None = None  # for a sublayer decided inside a block: the block's path
    layer: Any = field(default=None, compare=False, repr=False)

    @property
    def is_layer(self) -> bool:
        """False for ``keras.ops`` nodes, which carry no policy."""
        return self.role != OP

    @property
    def is_unit(self) -> bool:
        """A layer with float weights (or attention): always a decision of its own."""
        return self.role == WEIGHTED

    @property
    def eligible(self) -> bool:
        """May carry a policy of its own: a weighted or computing layer that is not pinned."""
        return self.role in (WEIGHTED, COMPUTE) and self.pinned is None

    @property
    def follows(self) -> bool:
        """Takes its producers' precision unless the decision space makes it a decision."""
        return self.role != WEIGHTED and self.pinned is None


@dataclass(frozen=True)
class ModelGraph:
    """All leaf nodes of a model in execution order, with the model's kind.

    Example:
        >>> import keras
        >>> g = build_graph(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
        >>> g.kind
        'sequential'
    """

    model: Any = field(repr=False, compare=False)
    kind: str
    layers: tuple[LayerInfo, ...]
    outputs: tuple[str, ...]
    containers: frozenset[str] = frozenset()
    forced: frozenset[str] = frozenset()  # paths matched by force_16bit

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_path", {info.path: info for info in self.layers})

    def __getitem__(self, path: str) -> LayerInfo:
        return self._by_path[path]  # type: ignore[attr-defined]

    def __contains__(self, path: object) -> bool:
        return path in self._by_path  # type: ignore[attr-defined]

    def key(self, layer: Any) -> str:
        """The key of ``layer`` (a layer of this model) as used in this graph."""
        return layer_key(layer, self.containers)

    @functools.cached_property
    def consumers(self) -> dict[str, list[str]]:
        """``{path: [paths of the nodes that read its output]}``, the reverse of each node's ``producers``."""
        out: dict[str, list[str]] = {}
        for info in self.layers:
            for p in info.producers:
                out.setdefault(p, []).append(info.path)
        return out

    @functools.cached_property
    def inner(self) -> dict[str, tuple[str, ...]]:
        """``{block path: the paths of the sublayers decided inside it, in call order}`` (see ``BLOCK``)."""
        out: dict[str, list[str]] = {}
        for info in self.layers:
            if info.block is not None:
                out.setdefault(info.block, []).append(info.path)
        return {block: tuple(paths) for block, paths in out.items()}

    @property
    def units(self) -> tuple[LayerInfo, ...]:
        """Weighted layers that are not pinned, in execution order."""
        return tuple(i for i in self.layers if i.is_unit and i.pinned is None)

    @property
    def eligible(self) -> tuple[LayerInfo, ...]:
        """Every layer that may carry its own policy (weighted or computing, not pinned)."""
        return tuple(i for i in self.layers if i.eligible)

    @property
    def total_flops(self) -> float:
        return float(sum(i.flops for i in self.layers))

    def resolve_nodes(self, assignment: Mapping[str, str]) -> dict[str, str]:
        """Policy name per node (``keras.ops`` nodes included) from a choice per decision.

        A node named in ``assignment`` takes that policy; a pinned one float32
        (a ``PINNED_DTYPE`` layer keeps its own); a weighted layer not named
        float32; a block as :meth:`block_state` says; any other node follows its producers: their common 16-bit
        policy, else float32, as Keras's autocast and type promotion would have
        it (a node fed only by the model's inputs stays float32).
        """
        out: dict[str, str] = {}
        for info in self.layers:  # execution order: producers come first, a block's sublayers before it
            if info.pinned == Reason.PINNED_DTYPE:
                name = info.policy
            elif info.pinned is not None:
                name = FLOAT32
            elif info.role == BLOCK:
                name = self.block_state(out, info.path)[0]
            elif info.path in assignment:
                name = assignment[info.path]
            elif info.role == WEIGHTED:
                name = FLOAT32
            else:
                # A quantized producer hands on its float part (int8_from_mixed_bfloat16 outputs bfloat16).
                chosen = {split(out.get(p, FLOAT32))[1] for p in info.producers} or {FLOAT32}
                name = chosen.pop() if len(chosen) == 1 else FLOAT32
                name = name if name in LOW_PRECISION else FLOAT32
            out[info.path] = name
        return out

    def block_state(self, names: Mapping[str, str], block: str) -> tuple[str, bool]:
        """The policy a block computes in, and whether its decided sublayers differ, from their ``names``.

        Float32 where every decided sublayer is float32; else the 16-bit
        format most of its 16-bit sublayers use, so that the sublayers it
        keeps compute in it too: a sublayer without a ``path`` takes a
        ``DTypePolicyMap``'s default after a reload, which is the 16-bit
        format wherever most of the model computes in it.

        >>> import keras
        >>> g = build_graph(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")]))
        >>> g.block_state({}, "d")
        ('float32', False)
        """
        # A pinned sublayer is float32 whatever ``names`` says: the block runs the mixed branch around it.
        return _block_state([FLOAT32 if self[p].pinned else names.get(p, FLOAT32) for p in self.inner.get(block, ())])

    def resolve(self, assignment: Mapping[str, str]) -> dict[str, str]:
        """Policy name per covered path (layers and their sublayers) from a choice per decision.

        See :meth:`resolve_nodes` for the rule; ``keras.ops`` nodes carry no
        policy and are left out.

        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
        ...                       keras.layers.ReLU(name="r"), keras.layers.Dense(2, name="out")])
        >>> build_graph(m).resolve({"h": "mixed_bfloat16"})
        {'h': 'mixed_bfloat16', 'r': 'mixed_bfloat16', 'out': 'float32'}
        """
        nodes = self.resolve_nodes(assignment)
        out: dict[str, str] = {}
        for info in self.layers:
            if info.is_layer:
                out[info.path] = nodes[info.path]
                for sub in info.sublayers:
                    out[sub] = nodes[info.path]
        return out

    def deciders(self, path: str) -> list[str]:
        """The nearest layers upstream of ``path`` that compute with a policy (through movement and ops nodes).

        They decide the precision a ``keras.ops`` node computes in.
        """
        out, frontier, seen = [], list(self[path].producers), set()
        while frontier:
            node = frontier.pop()
            if node in seen or node not in self:
                continue
            seen.add(node)
            info = self[node]
            if info.is_layer and info.role != MOVEMENT:
                out.append(node)
            else:
                frontier.extend(info.producers)
        return out

    def all_paths(self) -> list[str]:
        """Every path a policy covers: leaf layers and the sublayers inside them."""
        return [p for info in self.layers if info.is_layer for p in (info.path, *info.sublayers)]

    def fingerprint(self) -> list[tuple[str, str]]:
        """``[(path, class)]`` of every layer a policy covers, sorted."""
        rows = []
        for info in self.layers:
            if info.is_layer:
                rows.append((info.path, info.class_name))
                rows.extend(zip(info.sublayers, info.sublayer_classes, strict=True))
        return sorted(rows)

    def layer_facts(self) -> dict[str, dict[str, Any]]:
        """Facts per covered path, for ``PrecisionPolicy(layers=...)``: class, params, FLOPs, Keras path."""
        facts: dict[str, dict[str, Any]] = {}
        for info in self.layers:
            if not info.is_layer:
                continue
            facts[info.path] = {
                "class": info.class_name,
                "params": int(info.params),
                "flops": float(info.flops),
                "keras_path": info.keras_path,
            }
            for sub, cls, kpath in zip(info.sublayers, info.sublayer_classes, info.sublayer_keras_paths, strict=True):
                facts[sub] = {"class": cls, "params": 0, "flops": 0.0, "keras_path": kpath}
        return facts

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Every name a policy may use for layers of this model, and the keys it means.

        A layer answers to its key and to its Keras ``layer.path`` (``seq/dense``
        for a Sequential named ``seq``); a nested model's name means all its
        layers, and so does the model's own name.

        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")], name="seq")
        >>> build_graph(m).aliases()["seq"]
        ('d',)
        """
        table: dict[str, list[str]] = {}
        for info in self.layers:
            if not info.is_layer:
                continue
            for key, kpath in zip(
                (info.path, *info.sublayers), (info.keras_path, *info.sublayer_keras_paths), strict=True
            ):
                for alias in {key, kpath} - {""}:
                    table.setdefault(alias, []).append(key)
                for container in (getattr(self.model, "name", None), *info.containers):
                    if container and container not in (key, kpath):
                        table.setdefault(container, []).append(key)
        return {alias: tuple(dict.fromkeys(keys)) for alias, keys in table.items()}

    def to_frame(self):
        """A pandas DataFrame with one row per leaf node."""
        return _graph_frame(self)


def _block_state(mine: list[str]) -> tuple[str, bool]:
    low = [split(n)[1] for n in mine if split(n)[1] in LOW_PRECISION]
    if not low:
        return FLOAT32, False
    name = max(dict.fromkeys(low), key=low.count)
    return name, len(set(mine)) > 1 or mine[0] != name


def _graph_frame(graph: ModelGraph):
    import pandas as pd

    total = graph.total_flops or 1.0
    return pd.DataFrame(
        [
            {
                "path": i.path,
                "class": i.class_name,
                "role": i.role,
                "params": i.params,
                "flops": i.flops,
                "flops_share": i.flops / total,
                "output_bytes": i.output_bytes,
                "decision_unit": i.is_unit,
                "pinned": i.pinned or "",
                "policy": i.policy,
            }
            for i in graph.layers
        ]
    )


def sublayer_key(sublayer: Any, parent_key: str, containers: Iterable[str] = ()) -> str:
    """The key of a layer inside a custom or KerasHub layer.

    A sublayer that was never built (a ``Dropout`` in every transformer block
    of a KerasHub backbone) has no ``path``, and its name repeats from block to
    block: it is keyed under its parent (``transformer_layer_0/self_attention_dropout``),
    unique and stable. Keras resolves no policy for it by path; it follows its parent.

    >>> import keras
    >>> sublayer_key(keras.layers.Dropout(0.1, name="drop"), "block_0")
    'block_0/drop'
    """
    if getattr(sublayer, "path", None):
        return layer_key(sublayer, containers)
    return f"{parent_key}/{sublayer.name}"


def sublayer_frame(model: Any):
    """One row per layer inside a block (a transformer block's projections, norms, softmax), with its real precision.

    ``computes`` is the policy Keras really computes the sublayer in, read
    from the model (a ``DTypePolicyMap`` resolved at the sublayer's path).
    ``pinned`` is True where the sublayer stays float32 inside a 16-bit block
    because its own code fixes its dtype (KerasHub's attention softmax, a
    norm built with ``dtype="float32"``): autoprec never claims to lower those.

    >>> import keras
    >>> x = keras.Input((3, 4))
    >>> m = keras.Model(x, keras.layers.MultiHeadAttention(2, 2, name="mha")(x, x))
    >>> sorted(sublayer_frame(m)["path"])[-2:]
    ['mha/softmax', 'mha/value']
    """
    import pandas as pd

    containers = container_names(model)
    fn = graph_function(model)
    units = _functional_leaves(fn) if fn is not None else _subclassed_leaves(model)
    rows: list[dict[str, Any]] = []
    for unit in dict.fromkeys(units):
        _sublayer_rows(unit, layer_key(unit, containers), resolved_policy(unit), containers, rows)
    return pd.DataFrame(rows, columns=["block", "path", "class", "computes", "pinned"])


def _sublayer_rows(parent: Any, block: str, block_policy: str, containers: frozenset[str], rows: list) -> None:
    parent_key = layer_key(parent, containers)
    for sub in parent._flatten_layers(include_self=False, recursive=False):
        key = sublayer_key(sub, parent_key, containers)
        computes = resolved_policy(sub)
        pinned = computes == FLOAT32 and block_policy != FLOAT32 and _role(sub) != MOVEMENT
        rows.append({"block": block, "path": key, "class": type(sub).__name__, "computes": computes, "pinned": pinned})
        _sublayer_rows(sub, block, block_policy, containers, rows)


def opaque(layer: Any) -> bool:
    """True where a layer's arithmetic is its author's: its ``call`` is not Keras's own, or it is a ``Lambda``.

    >>> import keras
    >>> opaque(keras.layers.Dense(2)), opaque(keras.layers.Lambda(lambda t: t))
    (False, True)
    """
    call = getattr(type(layer), "call", None)
    module = getattr(call, "__module__", None) or ""
    return type(layer).__name__ == "Lambda" or not module.startswith("keras.")


def emitted_policies(layer: Any, name: str) -> list[tuple[Any, Any]]:
    """``[(layer or sublayer, policy)]`` as a copy of ``layer`` built with ``dtype=name`` has them.

    The copy is built from the layer's config (as the emitted model is) and
    dropped at once; only the policies are kept. A sublayer that fixes its own
    dtype (KerasHub's attention softmax) keeps it. One built without a dtype
    (a user's block that does not hand its own on) takes ``name``, as
    :func:`autoprec.apply.apply_policy` sets it: the copy is built under
    ``name`` as the global policy. A layer that cannot be rebuilt from its
    config gives every one of its layers ``name``.
    """
    import keras

    policy = keras.dtype_policies.get(name)
    own = [layer, *layer._flatten_layers(include_self=False)]
    if len(own) == 1:
        return [(layer, policy)]
    try:
        config, build = layer.get_config(), layer.get_build_config()
    except Exception:  # KerasHub 0.32's LlamaTransformerDecoder.get_config raises: no copy can be built
        return [(mine, policy) for mine in own]
    try:  # the blocks of a model are mostly alike: one copy per class, config and policy (a GPT2 decoder: one)
        alike = {k: v for k, v in config.items() if k != "name"}  # a block's name changes no dtype
        key = json.dumps([type(layer).__module__, type(layer).__qualname__, alike, build, name], sort_keys=True)
    except (TypeError, ValueError):  # a config JSON cannot hold: built every time
        key = None
    names = _EMITTED.get(key) if key is not None else None
    if names is None:
        names = _emitted_names(type(layer), config, build, name)
        if key is not None:
            _EMITTED[key] = names
    if len(names) != len(own):
        return [(mine, policy) for mine in own]
    return [(mine, keras.dtype_policies.get(n)) for mine, n in zip(own, names, strict=True)]


_EMITTED: dict[str, list[str]] = {}  # emitted_policies' names, by the layer's class, config, build and policy


def _emitted_names(cls: Any, config: dict, build: Any, name: str) -> list[str]:
    """The policy names of a copy of a ``cls`` layer built from ``config`` under ``name``, itself first; [] where
    it cannot be built."""
    import keras

    before = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(name)
        copy = cls.from_config({**config, "dtype": name})
        if build:
            copy.build_from_config(build)
        return [resolved_policy(c) for c in (copy, *copy._flatten_layers(include_self=False))]
    except Exception:  # a config that does not round-trip: the emitted model could not be built this way either
        return []
    finally:
        keras.config.set_dtype_policy(before)


def resolved_policy(layer: Any) -> str:
    """The name of the policy ``layer`` computes in (a ``DTypePolicyMap`` resolved at its path).

    >>> import keras
    >>> resolved_policy(keras.layers.Dense(2, dtype="mixed_float16"))
    'mixed_float16'
    """
    import keras

    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path] if layer.path else policy.default_policy
    return policy.name


def layer_key(layer: Any, containers: Iterable[str] = ()) -> str:
    """The key of a layer everywhere in autoprec: its Keras ``layer.path``, without container models.

    Two Keras 3.15 facts shape it. ``path`` is set when a layer's own
    ``build`` runs, so a weightless layer with the default build (``Softmax``,
    ``Activation``...) has none and is keyed by its name. And a layer built
    inside a model's name scope carries the model's name in front
    (``seq/dense`` after cloning a Sequential, ``dense`` after loading it), so
    leading components that name a containing model are dropped; a custom
    layer's sublayers keep their parent (``block/dense``).

    >>> import keras
    >>> layer_key(keras.layers.Dense(2, name="d"))
    'd'
    """
    path = getattr(layer, "path", None) or layer.name
    parts = path.split("/")
    while len(parts) > 1 and parts[0] in containers:
        parts = parts[1:]
    return "/".join(parts)


def container_names(model: Any) -> frozenset[str]:
    """Names of ``model`` and every model nested in it."""
    import keras

    return frozenset([model.name] + [layer.name for layer in model._flatten_layers() if isinstance(layer, keras.Model)])


def keyed_layers(model: Any) -> dict[str, Any]:
    """Every layer of ``model`` (models excluded) by its autoprec key.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> list(keyed_layers(m))
    ['d']
    """
    containers = container_names(model)
    fn = graph_function(model)
    out: dict[str, Any] = {}
    for unit in dict.fromkeys(_functional_leaves(fn) if fn is not None else _subclassed_leaves(model)):
        # A sublayer without a path is keyed under the layer the graph walks (see sublayer_key), as policies name it.
        key = layer_key(unit, containers)
        out[key] = unit
        for sub in unit._flatten_layers(include_self=False):
            out.setdefault(sublayer_key(sub, key, containers), sub)
    for layer in leaf_layers(model):
        out.setdefault(layer_key(layer, containers), layer)
    return out


def leaf_layers(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' and sublayers included (models and inputs excluded), in Keras's order.

    >>> import keras
    >>> [l.name for l in leaf_layers(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")]))]
    ['d']
    """
    import keras

    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if not isinstance(layer, keras.Model) and type(layer).__name__ != "InputLayer"
    ]


def model_kind(model: Any) -> str:
    """``'functional'``, ``'sequential'`` or ``'subclassed'``; raise for non-models."""
    import keras

    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Expected a keras.Model. Received: model={describe(model)}.")
    if isinstance(model, keras.Sequential):
        return SEQUENTIAL if getattr(model, "_functional", None) is not None else SUBCLASSED
    if _is_graph_network(model):
        return FUNCTIONAL
    return SUBCLASSED


def _is_graph_network(obj: Any) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(obj, Functional)


def graph_function(model: Any):
    """The Functional graph behind a Functional or built Sequential model, else None."""
    import keras

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if _is_graph_network(model):
        return model
    return None


def build_graph(
    model: Any, *, keep_float32: Iterable[str] = (), force_16bit: Iterable[str] = (), sample: Any = None
) -> ModelGraph:
    """Walk ``model`` and describe every leaf node.

    Args:
        model: any built Keras model.
        keep_float32: user pins: exact layer paths or regexes (Keras's rule:
            exact match first, then full regex match).
        force_16bit: paths or regexes that must not be pinned; a model output
            cannot be forced (outputs stay float32).
        sample: a batch of inputs, used for subclassed models to record the
            execution order and shapes (their FLOPs are estimated without it).

    Raises:
        PathCollisionError: two distinct layers share one ``layer.path``.
        PolicyError: a pin matches no layer, or a layer is in both lists, or an output is forced.
        UnsupportedModelError: ``model`` is not a built Keras model.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
        >>> build_graph(m)["d"].flops
        24.0
    """
    kind = model_kind(model)
    if not model.built:
        raise UnsupportedModelError(
            "Expected a built model (its weights exist). Received an unbuilt model. "
            "Call it on a batch, or build it with `model.build(input_shape)`, first."
        )
    walker = _Walker(container_names(model))
    if kind == SUBCLASSED:
        walker.walk_subclassed(model, sample)
    else:
        fn = graph_function(model)
        leaves = list(_functional_leaves(fn))
        inner = _inner_layers(leaves)
        order: list = []
        if sample is not None and (inner or _has_unknown_dims(fn)):
            # Variable-length inputs (keras.Input((None,))) hold None where the cost lives, and a block's
            # sublayers have no symbolic shapes at all: one eager call on the sample gives each its real ones.
            calls, order, walker.block_args = _record_calls(model, leaves + inner, sample)
            walker.use_calls(calls)
        walker.walk_functional(fn, parents=(), input_map={})
        walker.outputs = [p for t in fn.outputs for p in walker.producers_of(t)]
        if order:
            walker.expand_blocks(order)
    _check_collisions(walker.records)
    pins, forced = _pins(walker, keep_float32, force_16bit)
    layers = tuple(_info(order, rec, pins.get(rec["path"])) for order, rec in enumerate(walker.records))
    return ModelGraph(
        model=model,
        kind=kind,
        layers=layers,
        outputs=tuple(dict.fromkeys(walker.outputs)),
        containers=walker.containers,
        forced=frozenset(forced),
    )


def _info(order: int, rec: dict[str, Any], pinned: str | None) -> LayerInfo:
    return LayerInfo(
        path=rec["path"],
        class_name=rec["class"],
        params=rec["params"],
        flops=float(rec["flops"]),
        output_bytes=float(rec["bytes"]),
        inner_bytes=float(rec["inner_bytes"]),
        order=order,
        role=rec["role"],
        pinned=pinned,
        producers=tuple(dict.fromkeys(rec["producers"])),
        parent=rec.get("block") or (rec["containers"][-1] if rec["containers"] else None),
        policy=rec["policy"],
        keras_path=rec["keras_path"],
        containers=rec["containers"],
        sublayers=tuple(s[0] for s in rec["sublayers"]),
        sublayer_classes=tuple(s[1] for s in rec["sublayers"]),
        sublayer_keras_paths=tuple(s[2] for s in rec["sublayers"]),
        quantizable=rec["quantizable"],
        block=rec.get("block"),
        layer=rec["layer"],
    )


def _pins(walker: _Walker, keep_float32: Iterable[str], force_16bit: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """Pin reason per pinned path, and the paths force_16bit matched."""
    paths = [r["path"] for r in walker.records]
    user = set(match_paths(keep_float32, paths, what="keep_float32"))
    forced = set(match_paths(force_16bit, paths, what="force_16bit"))
    within: dict[str, list[str]] = {}
    for rec in walker.records:
        if rec.get("block"):
            within.setdefault(rec["block"], []).append(rec["path"])
    # A block named by either list means the sublayers decided inside it.
    user |= {p for block in list(user) for p in within.get(block, ())}
    forced |= {p for block in list(forced) for p in within.get(block, ())}
    clash = sorted(user & forced)
    if clash:
        raise PolicyError(
            f"Expected each layer in at most one of keep_float32 and force_16bit. Received both for: {clash}."
        )
    auto = _auto_pins(walker)
    outputs = sorted(p for p in forced if p in auto)
    if outputs:
        produce = any(auto[p] == Reason.PINNED_OUTPUT for p in outputs)
        raise PolicyError(
            f"Expected force_16bit to name layers inside the model. Received {outputs}, which "
            f"{'produce a model output' if produce else 'feed the output as its softmax/sigmoid'}: outputs stay "
            "float32 in every model autoprec emits, so forcing them could not be honoured. Remove them from "
            "force_16bit."
        )
    pins: dict[str, str] = {}
    for rec in walker.records:
        path = rec["path"]
        if path in user:
            pins[path] = str(Reason.PINNED_USER)
        elif rec["role"] != OP and rec["policy"] not in (FLOAT32, *LOW_PRECISION):
            pins[path] = str(Reason.PINNED_DTYPE)
        elif path in auto:
            pins[path] = str(auto[path])
    for rec in walker.records:
        # A block's sublayers share its pin (keep_float32 on a block, a block that produces an output).
        block = rec.get("block")
        if block in pins and rec["path"] not in pins and pins[block] != Reason.PINNED_DTYPE:
            pins[rec["path"]] = pins[block]
    return pins, forced


def match_paths(patterns: Iterable[str], paths: Sequence[str], *, what: str) -> list[str]:
    """Resolve user patterns against layer paths with Keras's DTypePolicyMap rule.

    A pattern that equals a path matches it; otherwise it is a regex that must
    fully match. A pattern that matches nothing is an error, so a typo is never
    silently ignored.

    >>> match_paths(["block1/.*"], ["block1/dense", "block2/dense"], what="keep_float32")
    ['block1/dense']
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise PolicyError(
            f"Expected {what} as a list of layer paths or regexes. Received: {describe(patterns)}."
        ) from None
    out: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError(f"Expected {what} entries as layer paths or regexes. Received: {describe(pattern)}.")
        if pattern in paths:
            out.append(pattern)
            continue
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise PolicyError(
                f"Expected {what} entry {pattern!r} to be a layer path or a valid regex ({exc})."
            ) from None
        hits = [p for p in paths if rx.fullmatch(p)]
        if not hits:
            close = [p for p in paths if pattern.split("/")[0].rstrip(".*") in p][:5]
            raise PolicyError(
                f"Expected each {what} entry to match a layer path. Received: {pattern!r}, which matches none."
                + (f" Similar paths: {close}." if close else " Run `autoprec layers MODEL` to list the paths.")
            )
        out.extend(hits)
    return list(dict.fromkeys(out))


class _Walker:
    def __init__(self, containers: frozenset[str]) -> None:
        self.containers = containers
        self.records: list[dict[str, Any]] = []
        self.by_id: dict[int, dict[str, Any]] = {}
        self.tensor_producers: dict[int, tuple[str, ...]] = {}
        self.outputs: list[str] = []
        self.real_shapes: dict[int, tuple[list, list]] = {}  # id(layer) -> shapes of its first real call
        self.real_calls: dict[int, list[tuple[list, list]]] = {}
        self.nodes_seen: dict[int, int] = {}
        self.block_args: dict[int, tuple[tuple, dict]] = {}  # id(block) -> the arguments of its first real call

    def producers_of(self, tensor: Any) -> tuple[str, ...]:
        return self.tensor_producers.get(id(tensor), ())

    def walk_functional(self, fn: Any, *, parents: tuple[str, ...], input_map: dict[int, tuple[str, ...]]) -> None:
        for tensor in fn.inputs:
            self.tensor_producers[id(tensor)] = input_map.get(id(tensor), ())
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for node in fn._nodes_by_depth[depth]:
                op = node.operation
                if node.is_input or op is None:
                    continue
                inputs = list(node.input_tensors)
                if _is_model(op):
                    self._walk_nested(op, node, inputs, parents)
                    continue
                producers = tuple(p for t in inputs for p in self.producers_of(t))
                rec = self._record(op, parents, [t.shape for t in inputs], [t.shape for t in node.outputs], producers)
                for out in node.outputs:
                    self.tensor_producers[id(out)] = (rec["path"],)

    def _walk_nested(self, op: Any, node: Any, inputs: list, parents: tuple[str, ...]) -> None:
        inner = graph_function(op)
        if inner is None:  # a subclassed model nested in a functional one
            raise UnsupportedModelError(
                f"Expected nested models to be Functional or Sequential. Received a subclassed model "
                f"{op.name!r} inside a functional model; its inner layers cannot be tuned separately. "
                "Rebuild it functionally, or wrap it in a keras.layers.Layer subclass so it is one unit."
            )
        inner_map = {id(it): self.producers_of(ot) for it, ot in zip(inner.inputs, inputs, strict=True)}
        if id(op) not in self.by_id:
            self.by_id[id(op)] = {"container": True}
            self.walk_functional(inner, parents=(*parents, op.name), input_map=inner_map)
        for out, inner_out in zip(node.outputs, inner.outputs, strict=True):
            self.tensor_producers[id(out)] = self.producers_of(inner_out)

    def walk_subclassed(self, model: Any, sample: Any) -> None:
        leaves = list(_subclassed_leaves(model))
        calls, order, _ = (
            _record_calls(model, leaves + _inner_layers(leaves), sample) if sample is not None else ({}, [], {})
        )
        self.use_calls(calls)
        leaf_ids = {id(layer) for layer in leaves}
        order = [layer for layer in order if id(layer) in leaf_ids]
        seen = {id(layer) for layer in order}
        order += [layer for layer in leaves if id(layer) not in seen]
        previous: tuple[str, ...] = ()
        for layer in order:
            ins, outs = self.real_shapes.get(id(layer), ([], []))
            rec = self._record(layer, (), ins, outs, previous)
            previous = (rec["path"],)
        if order:
            # Without a graph, the last layer called is taken to produce the output.
            self.outputs = [layer_key(order[-1] if calls else leaves[-1], self.containers)]

    def use_calls(self, calls: dict[int, list[tuple[list, list]]]) -> None:
        """Shapes of real calls, per layer in call order: a shared layer's n-th node is its n-th call."""
        self.real_calls = calls
        self.real_shapes = {key: seen[0] for key, seen in calls.items()}

    def _keyed_sublayers(self, layer: Any, block: str) -> list[tuple[str, str, str]]:
        """``[(key, class, Keras path)]`` of every sublayer of ``layer``, keyed under ``block`` (see sublayer_key)."""
        return [
            (sublayer_key(s, block, self.containers), type(s).__name__, getattr(s, "path", None) or "")
            for s in layer._flatten_layers(include_self=False)
        ]

    def expand_blocks(self, order: list) -> None:
        """Put the sublayers decided inside each block (:func:`_decided_inside`) just before it, in call order."""
        position = {id(layer): i for i, layer in enumerate(order)}
        records: list[dict[str, Any]] = []
        for rec in self.records:
            if rec["role"] == WEIGHTED and _is_layer(rec["layer"]):
                subs = _decided_inside(rec["layer"], position)
                subs = _mixing(rec["layer"], subs, self.block_args.get(id(rec["layer"]))) if subs else []
                records.extend(self._inner_records(rec, subs))
            records.append(rec)
        self.records = records

    def _inner_records(self, rec: dict[str, Any], subs: list) -> list[dict[str, Any]]:
        """Records of ``subs`` (decided inside the block of ``rec``), costed from their recorded calls; the block
        keeps the rest: the ops between them and the sublayers they do not cover."""
        block, out, covered = rec["path"], [], set()
        producers = list(rec["producers"])
        for sub in subs:
            key = sublayer_key(sub, block, self.containers)
            flops = nbytes = held = 0.0
            composite = composite_flops(sub, self.real_shapes)
            for ins, outs in self.real_calls[id(sub)]:
                ins, outs = ([(None, *tuple(sh)[1:]) for sh in shapes] for shapes in (ins, outs))
                flops += layer_flops(sub, ins, outs) if composite is None else composite
                nbytes += 4.0 * sum(map(sample_elements, outs))
                held += inner_bytes(sub, self.real_shapes) if composite is not None else 0.0
            descendants = self._keyed_sublayers(sub, block)
            covered.update([key, *(d[0] for d in descendants)])
            record = _new_record(sub, key, rec["containers"], producers, (flops, nbytes, held), descendants)
            out.append({**record, "block": block})
            producers = [key]  # a weightless sublayer takes the precision of the one called before it
        if out:
            rec["role"] = BLOCK
            rec["flops"] = max(0.0, rec["flops"] - sum(r["flops"] for r in out))
            rec["params"] = max(0, rec["params"] - sum(r["params"] for r in out))  # the weights are theirs
            rec["inner_bytes"] = max(0.0, rec["inner_bytes"] - sum(r["bytes"] + r["inner_bytes"] for r in out))
            rec["sublayers"] = [s for s in rec["sublayers"] if s[0] not in covered]
        return out

    def _record(
        self, layer: Any, parents: tuple[str, ...], in_shapes: list, out_shapes: list, producers: tuple
    ) -> dict:
        seen = self.real_calls.get(id(layer), [])
        nth = self.nodes_seen.get(id(layer), 0)
        self.nodes_seen[id(layer)] = nth + 1
        real = seen[min(nth, len(seen) - 1)] if seen else None
        if real is not None and any(_unknown(sh) for sh in (*in_shapes, *out_shapes)):
            in_shapes, out_shapes = (
                [(None, *tuple(sh)[1:]) for sh in real[0]],
                [(None, *tuple(sh)[1:]) for sh in real[1]],
            )
        existing = self.by_id.get(id(layer))
        inner = composite_flops(layer, self.real_shapes) if _is_layer(layer) else None
        # A block costs its sublayers' work plus one FLOP per output element of its own (residual adds).
        flops = (
            layer_flops(layer, in_shapes, out_shapes)
            if inner is None
            else inner + sum(map(sample_elements, out_shapes))
        )
        nbytes = 4.0 * sum(sample_elements(s) for s in out_shapes)
        held = inner_bytes(layer, self.real_shapes) if inner is not None else 0.0
        if existing is not None:  # a shared layer called at several nodes: costs add up
            existing["flops"] += flops
            existing["bytes"] += nbytes
            existing["inner_bytes"] += held
            existing["producers"] += list(producers)
            return existing
        key = layer_key(layer, self.containers)
        sublayers = self._keyed_sublayers(layer, key) if _is_layer(layer) else []
        rec = _new_record(layer, key, parents, list(producers), (flops, nbytes, held), sublayers)
        self.by_id[id(layer)] = rec
        self.records.append(rec)
        return rec


def _new_record(
    layer: Any, key: str, containers: tuple, producers: list, cost: tuple[float, float, float], sublayers: list
) -> dict[str, Any]:
    """A node's record: ``cost`` is its FLOPs, output bytes and inner bytes per sample."""
    is_layer = _is_layer(layer)
    flops, nbytes, held = cost
    return {
        "path": key,
        "class": type(layer).__name__,
        "role": _role(layer),
        "params": int(sum(math.prod(v.shape) for v in weights_of(layer))),
        "flops": flops,
        "bytes": nbytes,
        "inner_bytes": held,
        "producers": producers,
        "containers": containers,
        # Raw Keras operations in a functional graph (`x * y`, `ops.exp`) have no dtype policy: they compute in
        # their inputs' dtype, so they follow. A DTypePolicyMap is resolved at the layer's path.
        "policy": resolved_policy(layer) if is_layer else FLOAT32,
        "keras_path": (getattr(layer, "path", None) or "") if is_layer else "",
        "sublayers": sublayers,
        "layer": layer,
        "activation": _activation_name(layer),
        "quantizable": is_layer and _quantizable(layer),
    }


def _unknown(shape: Any) -> bool:
    """A shape with an unknown dimension past the batch."""
    try:
        return any(d is None for d in list(shape)[1:])
    except TypeError:
        return False


def _has_unknown_dims(fn: Any) -> bool:
    import keras

    return any(_unknown(t.shape) for t in keras.tree.flatten(fn.inputs))


def _record_calls(
    model: Any, leaves: list, sample: Any
) -> tuple[dict[int, list[tuple[list, list]]], list, dict[int, tuple[tuple, dict]]]:
    """Run ``model`` once on ``sample`` and record each leaf's call order and the shapes of each of its calls, and
    the arguments of the first call of each author-written layer with sublayers (see :func:`_mixes`).

    Each leaf's ``call`` is wrapped on the instance for one eager call and
    restored in ``finally``.
    """
    import keras

    shapes: dict[int, list[tuple[list, list]]] = {}
    order: list[Any] = []
    arguments: dict[int, tuple[tuple, dict]] = {}

    def recorder(layer: Any) -> Callable:
        original = layer.call
        block = opaque(layer) and bool(layer._flatten_layers(include_self=False, recursive=False))

        def record(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if id(layer) not in shapes:
                order.append(layer)
                if block:
                    arguments[id(layer)] = (args, kwargs)
            shapes.setdefault(id(layer), []).append(
                (
                    [t.shape for t in keras.tree.flatten(args) if hasattr(t, "shape")],
                    [t.shape for t in keras.tree.flatten(out) if hasattr(t, "shape")],
                )
            )
            return out

        return record

    with calls_replaced([(layer, recorder(layer)) for layer in leaves]):
        model(sample, training=False)
    return shapes, order, arguments


def _decided_inside(layer: Any, position: Mapping[int, int]) -> list:
    """The sublayers of an author-written block that are decisions of their own, in call order (see ``BLOCK``).

    Each called sublayer that computes, found through author-written sublayers
    without weights of their own (KerasHub's attention layer); a sublayer of
    Keras's own with sublayers (``MultiHeadAttention``) is one. Left to the
    block: sublayers that fix their own dtype (they stay float32 in a 16-bit
    copy, as KerasHub's attention softmax), data movement, sublayers never
    called, and sublayers without a ``path`` (a weightless one with Keras's
    default ``build``): a ``DTypePolicyMap`` cannot address them, so they take
    their parent's policy, in a reloaded model too. None where the layer is
    Keras's own or holds weights of its own.
    """
    if not opaque(layer) or _own_weights(layer):
        return []
    fixed = {id(sub) for sub, policy in emitted_policies(layer, "mixed_float16")[1:] if policy.compute_dtype == FLOAT32}
    found: list = []

    def visit(parent: Any) -> None:
        for sub in parent._flatten_layers(include_self=False, recursive=False):
            if id(sub) in fixed:
                continue
            if opaque(sub) and sub._flatten_layers(include_self=False, recursive=False) and not _own_weights(sub):
                visit(sub)
            elif id(sub) in position and _role(sub) != MOVEMENT and getattr(sub, "path", None):
                found.append(sub)

    visit(layer)
    unique = {id(sub): sub for sub in found}  # a sublayer two parents hold is one node
    return sorted(unique.values(), key=lambda sub: position[id(sub)])


def _mixing(layer: Any, subs: list, arguments: tuple[tuple, dict] | None) -> list:
    """Those of the sublayers ``subs`` that ``layer`` runs with in float32 among 16-bit ones, tried on its recorded
    call: the ones that may be decisions of their own ([] where none may).

    Its author's ops between them must accept a float16 and a float32 tensor
    together: ``keras.ops`` promote, but TensorFlow's own ``x + y`` fails
    (KerasHub's post-norm blocks add a norm's output so). The layer and
    everything in it compute in float16, as they do where its sublayers differ
    (:meth:`ModelGraph.block_state`), but one sublayer in float32, each in
    turn; then all that passed in float32 at once. A sublayer that fails
    stays with its block. Blocks of one class and config are tried once.
    """
    if arguments is None:
        return []
    relative = [sub.path.removeprefix(layer.path or "") for sub in subs]  # the same in every block of a model
    try:
        config = repr(sorted((k, v) for k, v in layer.get_config().items() if k not in ("name", "dtype")))
    except Exception:  # a layer without a usable config: tried each time
        config = str(id(layer))
    structure = (type(layer), config, tuple(relative))
    if structure not in _MIXING:
        base = emitted_policies(layer, "mixed_float16")  # the block and everything in it in float16
        passed = [i for i, sub in enumerate(subs) if _runs_mixed(layer, base, [sub], arguments)]
        together = len(passed) > 1 and not _runs_mixed(layer, base, [subs[i] for i in passed], arguments)
        _MIXING[structure] = frozenset() if together else frozenset(relative[i] for i in passed)
    return [sub for sub, name in zip(subs, relative, strict=True) if name in _MIXING[structure]]


def _runs_mixed(layer: Any, base: list[tuple[Any, Any]], in_float32: list, arguments: tuple[tuple, dict]) -> bool:
    """Whether ``layer`` runs its recorded call with ``in_float32`` in float32 and the rest as ``base`` has it."""
    import keras

    float32 = keras.dtype_policies.get(FLOAT32)
    parts = [(part, float32) for sub in in_float32 for part in (sub, *sub._flatten_layers(include_self=False))]
    try:
        with policies_set(base + parts):
            layer(*arguments[0], **arguments[1])
    except Exception:  # any error the author's code raises on mixed dtypes
        return False
    return True


# Per block class, config and called sublayers (paths below the block): those that may differ (see _mixing).
_MIXING: dict[tuple, frozenset[str]] = {}


def inside(layer: Any) -> list:
    """The sublayers of ``layer`` reached through author-written parents only: the layers of Keras's own (an RNN,
    an attention layer) are reached, not what they hold (a cell that runs inside a scan).

    >>> import keras
    >>> inside(keras.layers.Dense(2))
    []
    """
    out: list = []

    def visit(parent: Any) -> None:
        for sub in parent._flatten_layers(include_self=False, recursive=False):
            out.append(sub)
            if opaque(sub):
                visit(sub)

    if opaque(layer):
        visit(layer)
    return out


class policies_set:
    """Give layers the policies ``[(layer, policy)]`` for a block (a trace), then their own back.

    The policy object is swapped directly: the ``dtype_policy`` setter would
    edit a ``DTypePolicyMap`` the layer shares with its model.
    """

    def __init__(self, policies: list[tuple[Any, Any]]) -> None:
        self.policies = policies
        self.saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> policies_set:
        self.saved = [(layer, layer._dtype_policy) for layer, _ in self.policies]
        for layer, policy in self.policies:
            layer._dtype_policy = policy
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, policy in reversed(self.saved):  # a layer named twice gets its own back last
            layer._dtype_policy = policy


def _own_weights(layer: Any) -> bool:
    """Whether ``layer`` holds float weights outside its sublayers."""
    mine = {id(v) for v in layer.weights if "float" in str(v.dtype)}
    theirs = {id(v) for sub in layer._flatten_layers(include_self=False) for v in sub.weights}
    return bool(mine - theirs)


@contextlib.contextmanager
def calls_replaced(calls: list[tuple[Any, Callable]]) -> Iterator[None]:
    """Replace each layer's ``call`` on the instance with its function for a call or a trace; then restore it."""
    saved = [(layer, layer.__dict__.get("call")) for layer, _ in calls]
    try:
        for layer, fn in calls:
            object.__setattr__(layer, "call", fn)
        yield
    finally:
        for layer, old in saved:
            if old is None:
                layer.__dict__.pop("call", None)
            else:
                object.__setattr__(layer, "call", old)


def _inner_layers(leaves: list) -> list:
    """Every sublayer of the given leaf layers (a transformer block's projections, norms, softmax)."""
    return [s for layer in leaves if _is_layer(layer) for s in layer._flatten_layers(include_self=False)]


def _quantizable(layer: Any) -> bool:
    from autoprec.quantize import is_quantizable

    return is_quantizable(layer)


def _is_layer(op: Any) -> bool:
    import keras

    return isinstance(op, keras.layers.Layer)


def _is_model(op: Any) -> bool:
    import keras

    return isinstance(op, keras.Model)


def _role(layer: Any) -> str:
    if not _is_layer(layer):
        return OP
    if any("float" in str(v.dtype) for v in layer.weights) or type(layer).__name__ in _ATTENTION:
        return WEIGHTED
    name = type(layer).__name__
    if name in _MOVEMENT or (name.startswith("UpSampling") and getattr(layer, "interpolation", "nearest") == "nearest"):
        return MOVEMENT
    return COMPUTE


def _subclassed_leaves(model: Any):
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if _is_model(layer) and graph_function(layer) is None:
            yield from _subclassed_leaves(layer)
        elif _is_model(layer):
            yield from _functional_leaves(graph_function(layer))
        else:
            yield layer


def _functional_leaves(fn: Any):
    for layer in fn.layers:
        if _is_model(layer):
            inner = graph_function(layer)
            yield from (_functional_leaves(inner) if inner is not None else _subclassed_leaves(layer))
        elif type(layer).__name__ != "InputLayer":
            yield layer


def _activation_name(layer: Any) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act or "")).lower()


def _auto_pins(walker: _Walker) -> dict[str, Reason]:
    """Outputs stay float32, and so does a softmax/sigmoid that feeds an output."""
    pins = {p: Reason.PINNED_OUTPUT for p in walker.outputs}
    by_path = {r["path"]: r for r in walker.records}
    frontier = list(walker.outputs)
    seen = set()
    while frontier:
        path = frontier.pop()
        if path in seen or path not in by_path:
            continue
        seen.add(path)
        rec = by_path[path]
        is_softmax = rec["class"] == "Softmax" or rec["activation"] in _SOFTMAX_LIKE
        if is_softmax and path not in pins:
            pins[path] = Reason.PINNED_SOFTMAX
        # Walk back through layers that only pass the tensor on, and through
        # the output layer itself, to find a softmax just before the output.
        if rec["class"] in _PASSTHROUGH or path in walker.outputs:
            frontier.extend(rec["producers"])
    return pins


def _container(rec: dict[str, Any]) -> str:
    """The innermost model that holds the layer of ``rec``."""
    return rec["containers"][-1] if rec["containers"] else "the top model"


def _check_collisions(records: list[dict[str, Any]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        for path in [rec["path"], *(s[0] for s in rec["sublayers"])]:
            other = seen.get(path)
            if other is not None and other is not rec:
                raise PathCollisionError(
                    f"Expected every layer to have a unique layer.path. Received two different layers with "
                    f"path {path!r} (one in {_container(other)!r}, one in {_container(rec)!r}). A DTypePolicyMap could "
                    "not tell them apart, so autoprec refuses to merge them. Give the layers distinct names when "
                    "building the nested models, e.g. `keras.layers.Dense(8, name='encoder_dense')`."
                )
            seen[path] = rec
