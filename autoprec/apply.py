"""Emit: put a :class:`PrecisionPolicy` on a model, with the right optimizer.

>>> import keras, autoprec
>>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"),
...                       keras.layers.Dense(2, name="out")])
>>> m.compile(optimizer="adam", loss="mse")
>>> tuned = autoprec.apply_policy(m, autoprec.PrecisionPolicy({"h": "mixed_float16", "out": "float32"}))
>>> tuned.get_layer("h").compute_dtype, type(tuned.optimizer).__name__
('float16', 'LossScaleOptimizer')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from autoprec import reasons
from autoprec.errors import PolicyError, UnsupportedModelError, describe
from autoprec.graph import SUBCLASSED, ModelGraph, build_graph, clone_with_policies, set_policies_in_place
from autoprec.policy import FLOAT32, MIXED_FLOAT16, PrecisionPolicy

logger = logging.getLogger("autoprec")


def as_policy(policy: Any) -> PrecisionPolicy:
    """Accept a PrecisionPolicy, a DTypePolicyMap, a ``{path: name}`` dict or a JSON path.

    >>> as_policy({"d": "mixed_bfloat16"})["d"]
    'mixed_bfloat16'
    """
    if isinstance(policy, PrecisionPolicy):
        return policy
    if isinstance(policy, (str, os.PathLike)):
        return PrecisionPolicy.load(policy)
    if isinstance(policy, Mapping) and not hasattr(policy, "default_policy"):
        return PrecisionPolicy(policy)
    try:
        return PrecisionPolicy.from_keras(policy)
    except PolicyError:
        raise PolicyError(
            "Expected policy to be an autoprec.PrecisionPolicy, a keras DTypePolicyMap, a dict of "
            f"layer path to policy name, or the path of a policy JSON file. Received: {describe(policy)}."
        ) from None


def apply_policy(
    model: Any,
    policy: Any,
    *,
    optimizer: Any = None,
    inplace: bool = False,
    graph: ModelGraph | None = None,
) -> Any:
    """A model whose layers compute in the precision the policy names.

    Functional and Sequential models (nested ones too) are cloned with a dtype
    policy per layer, and every weight, BatchNormalization statistics
    included, is copied; the input model is left alone. A subclassed model
    cannot be cloned that way: pass ``inplace=True`` to set ``dtype_policy`` on
    its layers in place.

    Keras rebuilds a subclassed model's layers in its ``__init__`` when it
    loads one, with their default dtype, so its per-layer policies do not
    survive ``model.save``/``load_model``: save the policy too and apply it
    again after loading (``apply_policy(loaded, "policy.json", inplace=True)``).

    The model's outputs, and a softmax or sigmoid that feeds them, stay
    float32 whatever the policy says. The result is compiled with the input
    model's loss and metrics; when any layer computes in float16 its optimizer
    is wrapped in ``keras.optimizers.LossScaleOptimizer`` (never twice). A
    bfloat16-only model needs no loss scale and gets none.

    Args:
        model: a built Keras model.
        policy: a PrecisionPolicy, DTypePolicyMap, dict, or policy JSON path.
        optimizer: optimizer to compile with; default: a fresh copy of the
            model's own (unwrapped from any LossScaleOptimizer first).
        inplace: change ``model`` itself instead of returning a clone.
        graph: a graph of ``model`` already built (saves walking it again).

    Returns:
        The model carrying the policy, compiled if ``model`` was (or an
        ``optimizer`` was given).

    Raises:
        ModelMismatchError: the policy was made for another model.
        UnsupportedModelError: a subclassed model without ``inplace=True``.

    Example:
        >>> tuned = apply_policy(model, result.policy)  # doctest: +SKIP
        >>> tuned.fit(x_train, y_train)                   # doctest: +SKIP
    """
    policy = as_policy(policy)
    if not isinstance(inplace, bool):
        raise PolicyError(f"Expected inplace to be True or False. Received: inplace={describe(inplace)}.")
    graph = graph or build_graph(model)
    if graph.model is not model:
        raise PolicyError("Expected graph= to be the graph of the model being changed. Received another model's graph.")
    if policy.layers:
        policy.check_fits(graph.fingerprint())
    else:
        policy.check_fits([(p, "") for p in graph.all_paths()])
    names = _effective_names(graph, policy)
    if graph.kind == SUBCLASSED and not inplace:
        raise UnsupportedModelError(
            f"Expected a Functional or Sequential model to clone. Received the subclassed model {model.name!r}, "
            "which Keras cannot clone layer by layer. Pass inplace=True to set the policies on its layers "
            "in place (the model object itself is changed), or rebuild the model functionally."
        )
    if inplace:
        target = model
        set_policies_in_place(model, names)
    else:
        target = clone_with_policies(model, names)
    _compile_like(model, target, uses_float16=any(n == MIXED_FLOAT16 for n in names.values()), optimizer=optimizer)
    return target


def _effective_names(graph: ModelGraph, policy: PrecisionPolicy) -> dict[str, str]:
    # A layer the policy does not name keeps float32, except one that was not
    # float32 to begin with (a float64 layer): that one keeps what it has.
    current = graph.resolve({})
    names = {path: policy.get(path, current.get(path, FLOAT32)) for path in graph.all_paths()}
    for info in graph.layers:
        if info.pinned in (reasons.PINNED_OUTPUT, reasons.PINNED_SOFTMAX) and names.get(info.path) != FLOAT32:
            logger.warning(
                "autoprec: keeping %r in float32 (%s): a model's outputs and its final softmax/sigmoid "
                "stay float32, although the policy asks for %s.", info.path, info.pinned, names[info.path],
            )
            names[info.path] = FLOAT32
            for sub in info.sublayers:
                names[sub] = FLOAT32
    return names


def _compile_like(source: Any, target: Any, *, uses_float16: bool, optimizer: Any) -> None:
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
