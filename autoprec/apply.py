"""Emit: put a :class:`PrecisionPolicy` on a model, with the right optimizer.

This module owns every change of a model's policies: cloning with
per-layer policies (:func:`clone_with_policies`), setting them in place
(:func:`set_policies_in_place`), and the public :func:`apply_policy`.

>>> import keras, autoprec
>>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
...                       keras.layers.Dense(2, name="out")])
>>> m.compile(optimizer="adam", loss="mse")
>>> tuned = autoprec.apply_policy(m, autoprec.PrecisionPolicy({"h": "mixed_float16", "out": "float32"}))
>>> tuned.get_layer("h").compute_dtype, type(tuned.optimizer).__name__
('float16', 'LossScaleOptimizer')
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

from autoprec.decisions import Reason
from autoprec.errors import ArgumentError, UnsupportedModelError, describe
from autoprec.formats import FLOAT32, MIXED_FLOAT16, is_quantized, split
from autoprec.graph import SUBCLASSED, ModelGraph, build_graph, keyed_layers, leaf_layers, resolved_policy
from autoprec.policy import PrecisionPolicy
from autoprec.quantize import calibrate_model, quantize_in_place

logger = logging.getLogger("autoprec")


def apply_policy(
    model: Any,
    policy: Any,
    *,
    optimizer: Any = None,
    inplace: bool = False,
    graph: ModelGraph | None = None,
    calibration_data: Any = None,
) -> Any:
    """A model whose layers compute in the precision the policy names.

    Functional and Sequential models (nested ones too) are cloned with a dtype
    policy per layer, and every weight (BatchNormalization statistics too) is
    copied; the input model is left alone. A subclassed model cannot be
    cloned that way: ``inplace=True`` sets ``dtype_policy`` on its layers, and
    after ``load_model`` apply ``policy.json`` again (Keras rebuilds its layers
    with default dtypes). The policy may name layers by autoprec's key, by
    their Keras ``layer.path`` (``seq/dense``), or a nested model by its name.

    The model's outputs, and a softmax or sigmoid that feeds them, stay
    float32. The result is compiled with the input model's loss and metrics,
    its optimizer wrapped in a ``LossScaleOptimizer`` (never twice) when any
    layer computes in float16.

    Args:
        model: a built Keras model.
        policy: a PrecisionPolicy, DTypePolicyMap, dict, or policy JSON path.
        optimizer: optimizer to compile with; default: a fresh copy of the
            model's own (unwrapped from any LossScaleOptimizer first).
        inplace: change ``model`` itself instead of returning a clone.
        graph: a graph of ``model`` already built (saves walking it again).
        calibration_data: data to set float8 layers' scales from (see
            :mod:`autoprec.quantize`); without it they start at Keras's 1.0.

    Returns:
        The model carrying the policy, compiled if ``model`` was (or an
        ``optimizer`` was given).

    Raises:
        ModelMismatchError: the policy names layers this model lacks.
        UnsupportedModelError: a subclassed model without ``inplace=True``.

    Example:
        >>> tuned = apply_policy(model, result.policy)  # doctest: +SKIP
        >>> tuned.fit(x_train, y_train)                   # doctest: +SKIP
    """
    policy = PrecisionPolicy.get(policy)
    if not isinstance(inplace, bool):
        raise ArgumentError(f"Expected inplace to be True or False. Received: inplace={describe(inplace)}.")
    graph = graph or build_graph(model)
    if graph.model is not model:
        raise ArgumentError(
            "Expected graph= to be the graph of the model being changed. Received another model's graph."
        )
    names = _effective_names(graph, policy.for_graph(graph))
    _check_clonable(graph, inplace)
    if inplace:
        target = model
        set_policies_in_place(model, names)
    else:
        target = clone_with_policies(model, names)
    if calibration_data is not None:
        calibrate_model(target, calibration_data)
    compile_like(
        model, target, uses_float16=any(split(n)[1] == MIXED_FLOAT16 for n in names.values()), optimizer=optimizer
    )
    return target


def _check_clonable(graph: ModelGraph, inplace: bool) -> None:
    if graph.kind == SUBCLASSED and not inplace:
        raise UnsupportedModelError(
            f"Expected a Functional or Sequential model to clone. Received the subclassed model {graph.model.name!r}, "
            "which Keras cannot clone layer by layer. Pass inplace=True to set the policies on its layers "
            "in place (the model object itself is changed), or rebuild the model functionally."
        )


def _effective_names(graph: ModelGraph, named: dict[str, str]) -> dict[str, str]:
    # A layer the policy does not name keeps float32, except one that was not
    # float32 to begin with (a float64 layer): that one keeps what it has.
    current = graph.resolve({})
    names = {path: named.get(path, current.get(path, FLOAT32)) for path in graph.all_paths()}
    for info in graph.layers:
        if info.pinned in (Reason.PINNED_OUTPUT, Reason.PINNED_SOFTMAX) and names.get(info.path) != FLOAT32:
            logger.warning(
                "autoprec: keeping %r in float32 (%s): a model's outputs and its final softmax/sigmoid "
                "stay float32, although the policy asks for %s.",
                info.path,
                info.pinned,
                names[info.path],
            )
            names[info.path] = FLOAT32
            for sub in info.sublayers:
                names[sub] = FLOAT32
    return names


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


def strategy_scope(model: Any) -> contextlib.AbstractContextManager:
    """The ``tf.distribute`` strategy scope ``model`` was built in, or a no-op.

    Keras's TensorFlow trainer remembers the strategy active when a model is
    created. A clone or an optimizer made outside its scope gets plain
    variables, not mirrored ones, and ``fit`` then trains one device. Other
    backends have no such strategy (JAX's ``keras.distribution`` is global
    state, which clones follow by themselves).

    Example:
        >>> with strategy_scope(model):  # doctest: +SKIP
        ...     tuned = clone_with_policies(model, names)
    """
    strategy = getattr(model, "_distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def clone_with_policies(model: Any, names: dict[str, str]) -> Any:
    """A Functional/Sequential clone whose layers compute as ``names`` says, with every weight copied.

    Nested models are cloned recursively, in the model's ``tf.distribute``
    strategy scope if it was built in one. The clone is not compiled.

    Example:
        >>> clone = clone_with_policies(model, {"dense": "mixed_bfloat16"})  # doctest: +SKIP
    """
    with strategy_scope(model):
        return _clone_with_policies(model, names)


def _clone_with_policies(model: Any, names: dict[str, str]) -> Any:
    import keras

    if _backbones(model):
        # KerasHub's own way: rebuilt from the constructor config with a DTypePolicyMap, which it serialises.
        return copy_with_policies(model, names)

    keys = {id(layer): key for key, layer in keyed_layers(model).items()}

    def clone_layer(layer):
        config = layer.get_config()
        key = keys.get(id(layer))
        if key in names:
            # A quantized entry is cloned with its float part; Keras's quantize runs once the weights are in.
            config["dtype"] = split(names[key])[1]
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except Exception as exc:  # Keras raises many kinds here: a layer whose get_config cannot rebuild it
        logger.info("autoprec: Keras could not clone %r layer by layer (%s); copying it whole.", model.name, exc)
        return copy_with_policies(model, names, why=f"{type(exc).__name__}: {exc}")
    for layer, twin in _twins(model, clone):
        key = keys.get(id(layer), layer.name)
        base = split(names[key])[1] if key in names else None
        if base is not None and twin.dtype_policy.name != base:
            # Sublayers created inside a custom layer's __init__ do not inherit
            # the parent's dtype; setting it on the built layer does (Keras 3.15).
            twin.dtype_policy = base
        copy_weights(layer, twin, key)
        if key in names and is_quantized(names[key]):
            quantize_in_place(twin, names[key])
    return clone


def copy_with_policies(model: Any, names: dict[str, str], *, why: str = "") -> Any:
    """A copy of ``model`` computing as ``names`` says, for a model Keras cannot clone layer by layer.

    A model holding KerasHub backbones is rebuilt from its own constructor
    config with a ``DTypePolicyMap`` as each backbone's ``dtype``, as KerasHub
    itself does: every layer resolves its ``path`` in the map, a sublayer that
    hard-codes ``dtype="float32"`` keeps it, and the map is serialised, so a
    saved and reloaded copy computes as this one. Any other model is copied
    through a ``.keras`` round trip (``safe_mode`` on) and its built layers
    get their policies in place. The weights are copied either way.

    Raises:
        UnsupportedModelError: the model can be neither rebuilt nor saved and reloaded.

    Example:
        >>> copy = copy_with_policies(model, {"dense": "mixed_bfloat16"})  # doctest: +SKIP
    """
    floats = {key: split(name)[1] for key, name in names.items()}
    try:
        with strategy_scope(model):
            if _backbones(model):
                copy = _rebuild_with_maps(model, floats)
            else:
                copy = _round_trip(model)
                set_policies_in_place(copy, floats)
            copy.set_weights(model.get_weights())
    except Exception as exc:
        raise UnsupportedModelError(
            f"Expected a model Keras can clone, rebuild or save and reload. Received {model.name!r}: the clone failed"
            f"{f' ({why})' if why else ''} and so did a copy ({type(exc).__name__}: {exc}). "
            "Pass inplace=True to set the policies on the model itself."
        ) from exc
    for key, layer in keyed_layers(copy).items():
        if key in names and is_quantized(names[key]):
            quantize_in_place(layer, names[key])
    return copy


def _backbones(model: Any) -> list[Any]:
    """The KerasHub backbones in ``model`` (itself included): models that take and serialise a DTypePolicyMap."""
    return [
        sub
        for sub in model._flatten_layers(include_self=True)
        if any(c.__name__ == "Backbone" and c.__module__.startswith("keras_hub") for c in type(sub).__mro__)
    ]


def _rebuild_with_maps(model: Any, floats: dict[str, str]) -> Any:
    import keras

    by_key = keyed_layers(model)
    named = {by_key[key].path: name for key, name in floats.items() if key in by_key and by_key[key].path}
    pathless = [name for key, name in floats.items() if key not in by_key or not by_key[key].path]
    # A layer that is never built (a block's Dropout, a rotary embedding) has no path, and Keras gives it the
    # map's default: the policy most of them take (their blocks'), else the one most layers take.
    counts = Counter(pathless or named.values())
    default = max(counts, key=lambda name: (counts[name], name != FLOAT32)) if counts else FLOAT32
    policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=default)
    for path, name in named.items():
        policy_map[path] = name
    config = keras.saving.serialize_keras_object(model)
    for backbone in _backbones(model):
        _set_dtype(config, backbone.name, keras.dtype_policies.serialize(policy_map))
    copy = keras.saving.deserialize_keras_object(config, safe_mode=True)
    _pathless_follow_parents(copy, default)
    return copy


def _pathless_follow_parents(model: Any, default: str) -> None:
    """Give each never-built sublayer its parent's policy; warn where a reload would give it the map's default."""
    import keras

    differ = []
    for parent in model._flatten_layers(include_self=False):
        for sub in parent._flatten_layers(include_self=False, recursive=False):
            # Only a sublayer that was handed the map resolves its default; one that hard-codes its dtype
            # (a float32 attention softmax) keeps it.
            if getattr(sub, "path", None) or not isinstance(sub._dtype_policy, keras.dtype_policies.DTypePolicyMap):
                continue
            if parent.compute_dtype == sub.compute_dtype:
                continue
            sub._dtype_policy = keras.dtype_policies.get(resolved_policy(parent))
            if _computes(sub):
                differ.append(f"{parent.path}/{sub.name}")
    if differ:
        logger.warning(
            "autoprec: %d never-built sublayers (%s...) compute in their block's precision, which differs from the "
            "DTypePolicyMap default %s: after save and load_model Keras gives them the default. Keep the blocks "
            "around them in one precision (keep_float32=/force_16bit=) for a model that reloads exactly.",
            len(differ),
            ", ".join(differ[:3]),
            default,
        )


def _computes(layer: Any) -> bool:
    from autoprec.graph import MOVEMENT, _role

    return _role(layer) != MOVEMENT


def _set_dtype(config: Any, name: str, dtype: Any) -> None:
    """Set ``dtype`` in the serialised config of the layer or model called ``name``, wherever it is nested."""
    if isinstance(config, dict):
        inner = config.get("config")
        if isinstance(inner, dict) and inner.get("name") == name and "dtype" in inner:
            inner["dtype"] = dtype
        for value in config.values():
            _set_dtype(value, name, dtype)
    elif isinstance(config, list):
        for value in config:
            _set_dtype(value, name, dtype)


def _round_trip(model: Any) -> Any:
    import os
    import tempfile

    import keras

    with tempfile.TemporaryDirectory(prefix="autoprec-copy-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return keras.saving.load_model(path, compile=False)


def _twins(model: Any, clone: Any) -> list[tuple[Any, Any]]:
    """Each layer of ``model`` with its twin in ``clone``, paired by position, not by path.

    A sublayer a layer builds from its config (Bidirectional's forward and
    backward layers) gets a path without its parent's prefix in the clone
    (Keras 3.15): matched by path it would have no twin, and keep the clone's
    fresh random weights.
    """
    originals, clones = leaf_layers(model), leaf_layers(clone)
    if len(originals) != len(clones) or any(type(a) is not type(b) for a, b in zip(originals, clones, strict=True)):
        raise UnsupportedModelError(
            f"Expected Keras's clone of {model.name!r} to have the same layers in the same order. "
            "Pass inplace=True to set the policies on the model itself."
        )
    return list(zip(originals, clones, strict=True))


def copy_weights(source: Any, target: Any, key: str) -> None:
    """Copy a layer's own variables into its twin (through NumPy)."""
    import keras

    own = [*source._trainable_variables, *source._non_trainable_variables]
    twin_own = [*target._trainable_variables, *target._non_trainable_variables]
    if len(own) != len(twin_own):
        raise UnsupportedModelError(f"Layer {key!r} has {len(own)} weights but its clone has {len(twin_own)}.")
    for src, dst in zip(own, twin_own, strict=True):
        # Through NumPy: on JAX, assigning the same immutable array would share
        # one buffer between the models, and a jitted step that donates it
        # (Keras's JAX trainer does) would delete the original's weights.
        dst.assign(keras.ops.convert_to_numpy(src.value))


def compile_like(source: Any, target: Any, *, uses_float16: bool, optimizer: Any = None) -> None:
    """Compile ``target`` with ``source``'s loss and metrics, and a LossScaleOptimizer when float16 is used.

    The optimizer and its variables are made in ``target``'s ``tf.distribute``
    strategy scope if it has one, so that its loss scale is one mirrored
    variable: the same on every replica.

    Example:
        >>> compile_like(model, clone, uses_float16=True)  # doctest: +SKIP
    """
    with strategy_scope(target):
        _compile_like(source, target, uses_float16=uses_float16, optimizer=optimizer)


def _compile_like(source: Any, target: Any, *, uses_float16: bool, optimizer: Any = None) -> None:
    import keras

    compiled = getattr(source, "compiled", False) and getattr(source, "optimizer", None) is not None
    if not compiled and optimizer is None:
        target.train_function = target.test_function = target.predict_function = None
        if uses_float16:
            logger.warning(
                "autoprec: the model is not compiled, so no LossScaleOptimizer was added although layers "
                "compute in float16. Compile it with keras.optimizers.LossScaleOptimizer(your_optimizer)."
            )
        return
    config = source._compile_config.config if compiled else {}
    if optimizer is None:
        inner = source.optimizer
        if isinstance(inner, keras.optimizers.LossScaleOptimizer):
            inner = inner.inner_optimizer
        optimizer = inner.__class__.from_config(inner.get_config())
    else:
        optimizer = keras.optimizers.get(optimizer)
    if uses_float16 and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    target.compile(
        optimizer=optimizer,
        loss=config.get("loss"),
        loss_weights=config.get("loss_weights"),
        metrics=config.get("metrics"),
        weighted_metrics=config.get("weighted_metrics"),
        jit_compile=config.get("jit_compile", "auto"),
    )
    # Build the optimizer's slots now, so that a model saved before its first
    # step reloads them without Keras's "skipping variable loading" warning.
    target.optimizer.build(target.trainable_variables)
