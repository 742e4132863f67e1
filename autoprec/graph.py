"""The model graph: which layers exist, what they cost, and which are decisions.

:func:`build_graph` walks any Keras model (Functional, Sequential, nested
models, subclassed models and layers with sublayers) and lists each *leaf*
layer, the unit a precision is chosen for, with its ``layer.path``, class,
parameters, FLOPs and output bytes per sample, its producers, whether it is a
decision unit, and whether it is pinned to float32 and why.

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
...                           keras.layers.Dense(2, name="out")])
>>> graph = build_graph(model)
>>> [(i.path, i.is_unit, i.pinned) for i in graph.layers]
[('h', True, None), ('out', False, 'PINNED_OUTPUT')]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoprec import reasons
from autoprec.errors import PathCollisionError, PolicyError, UnsupportedModelError, describe
from autoprec.flops import sample_elements, weights_of, layer_flops

FUNCTIONAL = "functional"
SEQUENTIAL = "sequential"
SUBCLASSED = "subclassed"

_ATTENTION = {"MultiHeadAttention", "GroupedQueryAttention", "Attention", "AdditiveAttention"}
_SOFTMAX_LIKE = {"softmax", "sigmoid", "log_softmax"}
# Layers that neither compute nor hold weights: they pass a tensor on, and a
# softmax behind them still feeds the output directly.
_PASSTHROUGH = {"Activation", "Dropout", "Flatten", "Reshape", "Identity", "Permute", "Cropping1D",
                "Cropping2D", "Cropping3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
                "GaussianNoise", "GaussianDropout", "AlphaDropout", "SpatialDropout1D",
                "SpatialDropout2D", "SpatialDropout3D", "ActivityRegularization", "Softmax"}


@dataclass(frozen=True)
class LayerInfo:
    """One leaf layer of the graph. ``layer`` is the Keras layer (not compared)."""

    path: str
    class_name: str
    params: int
    flops: float
    output_bytes: float
    order: int
    is_unit: bool
    pinned: str | None
    producers: tuple[str, ...]
    parent: str | None
    policy: str
    sublayers: tuple[str, ...] = ()
    sublayer_classes: tuple[str, ...] = ()
    is_layer: bool = True
    layer: Any = field(default=None, compare=False, repr=False)

    @property
    def follows(self) -> bool:
        """A layer without weights that takes the precision of its producers."""
        return not self.is_unit and self.pinned is None


@dataclass(frozen=True)
class ModelGraph:
    """All leaf layers of a model in execution order, with the model's kind.

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

    def key(self, layer: Any) -> str:
        """The key of ``layer`` (a layer of this model) as used in this graph."""
        return layer_key(layer, self.containers)

    def __contains__(self, path: object) -> bool:
        return path in self._by_path  # type: ignore[attr-defined]

    @property
    def units(self) -> tuple[LayerInfo, ...]:
        """Decision units that are not pinned, in execution order."""
        return tuple(i for i in self.layers if i.is_unit and i.pinned is None)

    @property
    def total_flops(self) -> float:
        return float(sum(i.flops for i in self.layers))

    def unit_sets(self) -> dict[str, frozenset[str] | None]:
        """For each layer, the decision units whose precision it takes.

        A unit takes its own; a pinned layer none (``None``: always float32); a
        follower the units behind its producers, and it runs in 16-bit only
        when all of them do, as Keras's type promotion would have it. A
        follower fed only by model inputs stays float32.
        """
        sets: dict[str, frozenset[str] | None] = {}
        for info in self.layers:  # execution order: producers come first
            if info.pinned is not None:
                sets[info.path] = None
            elif info.is_unit:
                sets[info.path] = frozenset([info.path])
            else:
                members: set[str] = set()
                blocked = False
                for producer in info.producers:
                    got = sets.get(producer)
                    if got is None:
                        blocked = True
                        break
                    members |= got
                sets[info.path] = None if blocked or not members else frozenset(members)
        return sets

    def resolve(self, assignment: dict[str, str]) -> dict[str, str]:
        """Policy name per covered path from a choice per decision unit.

        Units missing from ``assignment`` stay float32; followers take their
        units' common policy (float32 when they disagree); sublayers take their
        leaf's policy; a ``PINNED_DTYPE`` layer keeps the policy it has.

        >>> import keras
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
        ...                       keras.layers.ReLU(name="r"), keras.layers.Dense(2, name="out")])
        >>> build_graph(m).resolve({"h": "mixed_bfloat16"})
        {'h': 'mixed_bfloat16', 'r': 'mixed_bfloat16', 'out': 'float32'}
        """
        sets = self.unit_sets()
        out: dict[str, str] = {}
        for info in self.layers:
            if not info.is_layer:
                continue
            if info.pinned == reasons.PINNED_DTYPE:
                name = info.policy
            else:
                members = sets[info.path]
                chosen = {assignment.get(u, "float32") for u in members} if members else {"float32"}
                name = chosen.pop() if len(chosen) == 1 else "float32"
            out[info.path] = name
            for sub in info.sublayers:
                out[sub] = name
        return out

    def all_paths(self) -> list[str]:
        """Every path a policy covers: leaf layers and the sublayers inside them."""
        out = []
        for info in self.layers:
            if not info.is_layer:
                continue
            out.append(info.path)
            out.extend(info.sublayers)
        return out

    def fingerprint(self) -> list[tuple[str, str]]:
        """``[(path, class)]`` of every layer a policy covers, sorted."""
        rows = []
        for info in self.layers:
            if not info.is_layer:
                continue
            rows.append((info.path, info.class_name))
            rows.extend(zip(info.sublayers, info.sublayer_classes))
        return sorted(rows)

    def layer_facts(self) -> dict[str, dict[str, Any]]:
        """Facts per covered path, for ``PrecisionPolicy(layers=...)``."""
        facts: dict[str, dict[str, Any]] = {}
        for info in self.layers:
            if not info.is_layer:
                continue
            facts[info.path] = {"class": info.class_name, "params": int(info.params), "flops": float(info.flops)}
            for sub, cls in zip(info.sublayers, info.sublayer_classes):
                facts[sub] = {"class": cls, "params": 0, "flops": 0.0}
        return facts

    def to_frame(self):
        """A pandas DataFrame with one row per leaf layer."""
        import pandas as pd

        total = self.total_flops or 1.0
        return pd.DataFrame(
            [
                {
                    "path": i.path,
                    "class": i.class_name,
                    "params": i.params,
                    "flops": i.flops,
                    "flops_share": i.flops / total,
                    "output_bytes": i.output_bytes,
                    "decision_unit": i.is_unit,
                    "pinned": i.pinned or "",
                    "policy": i.policy,
                }
                for i in self.layers
            ]
        )


def layer_key(layer: Any, containers: Iterable[str] = ()) -> str:
    """The key of a layer everywhere in autoprec: its Keras ``layer.path``.

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

    return frozenset([model.name] + [l.name for l in model._flatten_layers() if isinstance(l, keras.Model)])


def keyed_layers(model: Any) -> dict[str, Any]:
    """Every layer of ``model`` (models excluded) by its autoprec key.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> list(keyed_layers(m))
    ['d']
    """
    import keras

    containers = container_names(model)
    return {
        layer_key(l, containers): l
        for l in model._flatten_layers(include_self=False)
        if not isinstance(l, keras.Model) and type(l).__name__ != "InputLayer"
    }


def set_policies_in_place(model: Any, names: dict[str, str]) -> bool:
    """Set ``dtype_policy`` on each layer of ``model`` that ``names`` changes; True if any changed.

    Keras 3.15 honours a policy set on a built layer and keeps its weights, but
    the model's traced functions keep the old dtypes: callers reset or recompile.
    """
    changed = False
    for key, layer in keyed_layers(model).items():
        if key in names and layer.dtype_policy.name != names[key]:
            layer.dtype_policy = names[key]
            changed = True
    return changed


def clone_with_policies(model: Any, names: dict[str, str]) -> Any:
    """A Functional/Sequential clone whose layers compute as ``names`` says, with every weight copied.

    Nested models are cloned recursively. The clone is not compiled.
    """
    import keras

    keys = {id(layer): key for key, layer in keyed_layers(model).items()}

    def clone_layer(layer):
        config = layer.get_config()
        key = keys.get(id(layer))
        if key in names:
            config["dtype"] = names[key]
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except Exception as exc:  # Keras raises many kinds here; name the step that failed.
        raise UnsupportedModelError(
            f"Keras could not clone model {model.name!r} with per-layer policies ({type(exc).__name__}: {exc}). "
            "Pass inplace=True to set the policies on the model itself."
        ) from exc
    new_layers = keyed_layers(clone)
    for key, layer in keyed_layers(model).items():
        twin = new_layers.get(key)
        if twin is None:
            continue
        if key in names and twin.dtype_policy.name != names[key]:
            # Sublayers created inside a custom layer's __init__ do not inherit
            # the parent's dtype; setting it on the built layer does (Keras 3.15).
            twin.dtype_policy = names[key]
        own = [v for v in layer._trainable_variables + layer._non_trainable_variables]
        twin_own = [v for v in twin._trainable_variables + twin._non_trainable_variables]
        if len(own) != len(twin_own):
            raise UnsupportedModelError(f"Layer {key!r} has {len(own)} weights but its clone has {len(twin_own)}.")
        for src, dst in zip(own, twin_own):
            # Through NumPy: on JAX, assigning the same immutable array would share
            # one buffer between the models, and a jitted step that donates it
            # (Keras's JAX trainer does) would delete the original's weights.
            dst.assign(keras.ops.convert_to_numpy(src.value))
    return clone


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
    model: Any,
    *,
    keep_float32: Iterable[str] = (),
    force_16bit: Iterable[str] = (),
    sample: Any = None,
) -> ModelGraph:
    """Walk ``model`` and describe every leaf layer.

    Args:
        model: any built Keras model.
        keep_float32: user pins: exact layer paths or regexes (Keras's rule:
            exact match first, then full regex match).
        force_16bit: paths or regexes that must not be pinned (only checked
            for conflicts with the automatic pins here).
        sample: a batch of inputs, used for subclassed models to record the
            execution order and shapes (their FLOPs are estimated without it).

    Raises:
        PathCollisionError: two distinct layers share one ``layer.path``.
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
        walker.walk_functional(graph_function(model), parent=None, input_map={})
        fn = graph_function(model)
        walker.outputs = [p for t in fn.outputs for p in walker.producers_of(t)]
    _check_collisions(walker.records)
    pins = _auto_pins(walker)
    user = set(match_paths(keep_float32, [r["path"] for r in walker.records], what="keep_float32"))
    forced = set(match_paths(force_16bit, [r["path"] for r in walker.records], what="force_16bit"))
    clash = sorted(user & forced)
    if clash:
        raise PolicyError(
            f"Expected each layer in at most one of keep_float32 and force_16bit. Received both for: {clash}."
        )
    layers = []
    for order, rec in enumerate(walker.records):
        path = rec["path"]
        pinned = None
        if path in user:
            pinned = reasons.PINNED_USER
        elif rec["is_layer"] and rec["policy"] not in ("float32", "mixed_float16", "mixed_bfloat16"):
            pinned = reasons.PINNED_DTYPE
        elif path in pins and path not in forced:
            pinned = pins[path]
        layers.append(
            LayerInfo(
                path=path,
                class_name=rec["class"],
                params=rec["params"],
                flops=float(rec["flops"]),
                output_bytes=float(rec["bytes"]),
                order=order,
                is_unit=rec["is_unit"],
                pinned=pinned,
                producers=tuple(dict.fromkeys(rec["producers"])),
                parent=rec["parent"],
                policy=rec["policy"],
                sublayers=tuple(key for key, _ in rec["sublayers"]),
                sublayer_classes=tuple(cls for _, cls in rec["sublayers"]),
                is_layer=rec["is_layer"],
                layer=rec["layer"],
            )
        )
    return ModelGraph(
        model=model, kind=kind, layers=tuple(layers), outputs=tuple(dict.fromkeys(walker.outputs)),
        containers=walker.containers, forced=frozenset(forced),
    )


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
            raise PolicyError(f"Expected {what} entry {pattern!r} to be a layer path or a valid regex ({exc}).") from None
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
        self.consumers: dict[str, list[str]] = {}

    def producers_of(self, tensor: Any) -> tuple[str, ...]:
        return self.tensor_producers.get(id(tensor), ())

    def walk_functional(self, fn: Any, *, parent: str | None, input_map: dict[int, tuple[str, ...]]) -> None:
        for tensor in fn.inputs:
            self.tensor_producers[id(tensor)] = input_map.get(id(tensor), ())
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for node in fn._nodes_by_depth[depth]:
                op = node.operation
                if node.is_input or op is None:
                    continue
                inputs = list(node.input_tensors)
                producers = tuple(p for t in inputs for p in self.producers_of(t))
                inner = graph_function(op) if _is_model(op) else None
                if inner is not None:
                    inner_map = {id(it): self.producers_of(ot) for it, ot in zip(inner.inputs, inputs)}
                    if id(op) not in self.by_id:
                        self.by_id[id(op)] = {"container": True}
                        self.walk_functional(inner, parent=op.name, input_map=inner_map)
                    for out, inner_out in zip(node.outputs, inner.outputs):
                        self.tensor_producers[id(out)] = self.producers_of(inner_out)
                    continue
                if _is_model(op):  # a subclassed model nested in a functional one
                    raise UnsupportedModelError(
                        f"Expected nested models to be Functional or Sequential. Received a subclassed model "
                        f"{op.name!r} inside a functional model; its inner layers cannot be tuned separately. "
                        "Rebuild it functionally, or wrap it in a keras.layers.Layer subclass so it is one unit."
                    )
                rec = self._record(op, parent, [t.shape for t in inputs], [t.shape for t in node.outputs], producers)
                for out in node.outputs:
                    self.tensor_producers[id(out)] = (rec["path"],)

    def walk_subclassed(self, model: Any, sample: Any) -> None:
        import keras

        leaves = list(_subclassed_leaves(model))
        shapes: dict[int, tuple[list, list]] = {}
        order: list[Any] = []
        if sample is not None:
            # Record the real execution order and shapes by wrapping each leaf's
            # `call` on the instance for one eager call; restored in `finally`.
            originals = {}
            try:
                for layer in leaves:
                    originals[id(layer)] = layer.__dict__.get("call")

                    def recorder(*args, __layer=layer, __call=layer.call, **kwargs):
                        out = __call(*args, **kwargs)
                        ins = [t.shape for t in keras.tree.flatten(args) if hasattr(t, "shape")]
                        outs = [t.shape for t in keras.tree.flatten(out) if hasattr(t, "shape")]
                        if id(__layer) not in shapes:
                            order.append(__layer)
                            shapes[id(__layer)] = (ins, outs)
                        return out

                    object.__setattr__(layer, "call", recorder)
                model(sample, training=False)
            finally:
                for layer in leaves:
                    if originals.get(id(layer)) is None:
                        layer.__dict__.pop("call", None)
                    else:
                        object.__setattr__(layer, "call", originals[id(layer)])
        seen = {id(layer) for layer in order}
        order += [layer for layer in leaves if id(layer) not in seen]
        previous: tuple[str, ...] = ()
        for layer in order:
            ins, outs = shapes.get(id(layer), ([], []))
            rec = self._record(layer, None, ins, outs, previous)
            previous = (rec["path"],)
        if order:
            # Without a graph, the last layer called is taken to produce the output.
            self.outputs = [layer_key(order[-1] if shapes else leaves[-1], self.containers)]

    def _record(self, layer: Any, parent: str | None, in_shapes: list, out_shapes: list, producers: tuple) -> dict:
        existing = self.by_id.get(id(layer))
        flops = layer_flops(layer, in_shapes, out_shapes)
        nbytes = 4.0 * sum(sample_elements(s) for s in out_shapes)
        if existing is not None:  # a shared layer called at several nodes: costs add up
            existing["flops"] += flops
            existing["bytes"] += nbytes
            existing["producers"] += list(producers)
            return existing
        path = layer_key(layer, self.containers)
        is_layer = _is_layer(layer)
        # Raw Keras operations in a functional graph (`x * y`, `ops.add`) have no
        # dtype policy: they compute in their inputs' dtype, so they follow.
        policy = layer.dtype_policy if is_layer else None
        rec = {
            "path": path,
            "class": type(layer).__name__,
            "is_layer": is_layer,
            "params": int(sum(math.prod(v.shape) for v in weights_of(layer))),
            "flops": flops,
            "bytes": nbytes,
            "producers": list(producers),
            "parent": parent,
            "policy": getattr(policy, "name", "float32"),
            "is_unit": is_layer and _is_decision_unit(layer),
            "sublayers": [(layer_key(s, self.containers), type(s).__name__) for s in layer._flatten_layers(include_self=False)]
            if is_layer else [],
            "layer": layer,
            "activation": _activation_name(layer),
        }
        self.by_id[id(layer)] = rec
        self.records.append(rec)
        return rec


def _is_layer(op: Any) -> bool:
    import keras

    return isinstance(op, keras.layers.Layer)


def _is_model(op: Any) -> bool:
    import keras

    return isinstance(op, keras.Model)


def _subclassed_leaves(model: Any):
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if _is_model(layer) and graph_function(layer) is None:
            yield from _subclassed_leaves(layer)
        elif _is_model(layer):
            yield from (sub for sub in _functional_leaves(graph_function(layer)))
        else:
            yield layer


def _functional_leaves(fn: Any):
    for layer in fn.layers:
        if _is_model(layer):
            inner = graph_function(layer)
            yield from (_functional_leaves(inner) if inner is not None else _subclassed_leaves(layer))
        elif type(layer).__name__ != "InputLayer":
            yield layer


def _is_decision_unit(layer: Any) -> bool:
    has_float_weights = any("float" in str(v.dtype) for v in layer.weights)
    return has_float_weights or type(layer).__name__ in _ATTENTION


def _activation_name(layer: Any) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act or "")).lower()


def _auto_pins(walker: _Walker) -> dict[str, str]:
    """Outputs stay float32, and so does a softmax/sigmoid that feeds an output."""
    pins = {p: reasons.PINNED_OUTPUT for p in walker.outputs}
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
            pins[path] = reasons.PINNED_SOFTMAX
        # Walk back through layers that only pass the tensor on, and through
        # the output layer itself, to find a softmax just before the output.
        if rec["class"] in _PASSTHROUGH or path in walker.outputs:
            frontier.extend(rec["producers"])
    return pins


def _check_collisions(records: list[dict[str, Any]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        for path in [rec["path"], *(key for key, _ in rec["sublayers"])]:
            other = seen.get(path)
            if other is not None and other is not rec:
                raise PathCollisionError(
                    f"Expected every layer to have a unique layer.path. Received two different layers with "
                    f"path {path!r} (one in {other['parent'] or 'the top model'!r}, one in "
                    f"{rec['parent'] or 'the top model'!r}). A DTypePolicyMap could not tell them apart, "
                    "so autoprec refuses to merge them. Give the layers distinct names when building the "
                    "nested models, e.g. `keras.layers.Dense(8, name='encoder_dense')`."
                )
            seen[path] = rec
