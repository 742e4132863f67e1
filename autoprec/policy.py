"""PrecisionPolicy: an immutable map from layer path to a policy name.

It knows nothing of Optuna or of how it was found; it converts to and from
Keras's own :class:`keras.dtype_policies.DTypePolicyMap` and to a versioned
JSON file that records which model it was made for.

>>> policy = PrecisionPolicy({"dense": "mixed_float16", "out": "float32"})
>>> policy["dense"]
'mixed_float16'
>>> policy.counts()
{'mixed_float16': 1, 'float32': 1}
>>> PrecisionPolicy.from_config(policy.get_config()) == policy
True
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from autoprec.errors import ModelMismatchError, PolicyError, SchemaError, describe
from autoprec.formats import (
    FLOAT32,
    LOW_PRECISION,
    MIXED_FLOAT16,
    POLICY_NAMES,
    TARGETS,
    check_policy_name,
    is_quantized,
    split,
)

logger = logging.getLogger("autoprec")

SCHEMA_NAME = "autoprec.policy"
SCHEMA_VERSION = 2  # 2: quantized policy names (int8_from_..., int4_from_..., float8_from_...); 1 is read too
READABLE_VERSIONS = (1, 2)


class PrecisionPolicy(Mapping):
    """Immutable mapping of layer path to policy name.

    Args:
        entries: ``{path: policy name}``. A path is autoprec's key for a layer
            or its Keras ``layer.path`` (``seq/dense``); a nested model's name
            means all its layers (see :meth:`for_graph`).
        target: the 16-bit format the policy was tuned for, if any.
        layers: optional facts per path (``class``, ``params``, ``flops``,
            ``keras_path``) used for the model fingerprint and :meth:`summary`.

    Example:
        >>> p = PrecisionPolicy({"a": "float32", "b": "mixed_bfloat16"})
        >>> p.to_keras()["b"].name
        'mixed_bfloat16'
    """

    __slots__ = ("_entries", "_target", "_layers", "_provenance")

    def __init__(
        self,
        entries: Mapping[str, str],
        *,
        target: str | None = None,
        layers: Mapping[str, Mapping[str, Any]] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        if target is not None and target not in TARGETS:
            raise PolicyError(f"Expected target to be one of {list(TARGETS)} or None. Received: {describe(target)}.")
        self._entries = _clean_entries(entries)
        self._target = target
        self._layers = {k: dict(v) for k, v in (layers or {}).items()}
        self._provenance = _checked_provenance(provenance or {}, PolicyError)  # PolicyError(message)

    # Keras's get() idiom (keras.dtype_policies.get) on purpose: the constructor from any accepted input, which
    # hides Mapping.get; read an entry with policy[path] or `path in policy`.
    @classmethod
    def get(cls, policy: Any) -> PrecisionPolicy:  # type: ignore[override]
        """Accept a PrecisionPolicy, a DTypePolicyMap, a ``{path: name}`` dict, a config, or a JSON path.

        >>> PrecisionPolicy.get({"d": "mixed_bfloat16"})["d"]
        'mixed_bfloat16'
        """
        return _from_any(cls, policy)

    # Mapping protocol -------------------------------------------------------
    def __getitem__(self, path: str) -> str:
        return self._entries[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrecisionPolicy):
            return NotImplemented
        return self._entries == other._entries and self._target == other._target

    def __hash__(self) -> int:
        return hash((tuple(sorted(self._entries.items())), self._target))

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return f"PrecisionPolicy({len(self)} layers: {counts}, target={self._target})"

    # Keras conventions --------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """A plain, JSON-able dict; :meth:`from_config` rebuilds the policy from it."""
        return {"entries": dict(self._entries), "target": self._target, "layers": self.layers, **self._extra()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrecisionPolicy:
        return cls(config["entries"], **{k: config.get(k) for k in ("target", "layers", "provenance")})

    def _extra(self) -> dict[str, Any]:
        return {"provenance": self.provenance}

    # Derived views ------------------------------------------------------------
    @property
    def target(self) -> str | None:
        """The 16-bit format this policy was tuned for."""
        return self._target

    @property
    def provenance(self) -> dict[str, Any]:
        """How the policy was judged, as ``tune`` recorded it; a copy.

        The metric, its float32 baseline and tuned value, the drop with its
        upper confidence bound and the confidence (where one was asked for),
        the allowed drop and the budget's formula, the evaluation samples, the
        held-out check's figures, and the device the speed-up is estimated (or
        measured) for. Empty for a policy written by hand.
        """
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._provenance.items()}

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Facts recorded per layer path (class, params, flops, keras_path); a copy."""
        return {k: dict(v) for k, v in self._layers.items()}

    @property
    def fingerprint(self) -> list[tuple[str, str]]:
        """``[(path, class name)]`` of the model the policy was made for, sorted."""
        return sorted((p, str(v.get("class", ""))) for p, v in self._layers.items())

    @property
    def uses_float16(self) -> bool:
        """True when any layer computes in float16 (a loss scale is then needed)."""
        return any(split(v)[1] == MIXED_FLOAT16 for v in self._entries.values())

    @property
    def quantized(self) -> dict[str, str]:
        """The entries that quantize their layer (``int8_from_...`` and the like)."""
        return {p: v for p, v in self._entries.items() if is_quantized(v)}

    def counts(self) -> dict[str, int]:
        """Number of layers per policy name, in first-seen order."""
        return dict(Counter(self._entries.values()))

    def low_precision_share(self) -> dict[str, float]:
        """Share of parameters and FLOPs in 16-bit or quantized layers (NaN when unknown)."""
        return _low_precision_share(self._entries, self._layers)

    def summary(self) -> str:
        """A few lines: counts per policy and the 16-bit share of params and FLOPs.

        >>> print(PrecisionPolicy({"a": "float32"}).summary().splitlines()[0])
        PrecisionPolicy for 1 layer (target: none)
        """
        return _summary(self)

    def replace(self, updates: Mapping[str, str]) -> PrecisionPolicy:
        """A new policy with some entries changed (the original is immutable)."""
        return PrecisionPolicy({**self._entries, **updates}, target=self._target, layers=self._layers, **self._extra())

    # Keras -------------------------------------------------------------------
    def to_keras(self, model: Any = None):
        """A :class:`keras.dtype_policies.DTypePolicyMap` with an explicit float32 default.

        The explicit default matters: a map without one loses its float entries
        in ``get_config`` (Keras 3.15). A map resolves a layer by its own
        ``layer.path``, so the keys are the paths the layers really have: those
        of ``model`` when given (build the same model again with
        ``dtype=policy.to_keras(model)`` on each layer), else the Keras paths
        recorded when the policy was made. Keras gives a path only to layers
        with their own ``build()``; a weightless layer without one
        (``Activation``, ``ReLU``, pooling) takes the map's default, float32,
        whatever the policy says, and is named in a warning.
        """
        return _to_keras(self, model)

    @classmethod
    def from_keras(cls, policy_map, *, target: str | None = None) -> PrecisionPolicy:
        """Build from a ``DTypePolicyMap`` (its exact keys become paths).

        >>> from keras import dtype_policies
        >>> m = dtype_policies.DTypePolicyMap("float32", {"d": dtype_policies.DTypePolicy("mixed_float16")})
        >>> PrecisionPolicy.from_keras(m)["d"]
        'mixed_float16'
        """
        return cls(_entries_of_map(policy_map), target=target)

    def for_graph(self, graph: Any) -> dict[str, str]:
        """``{key: policy name}`` for the layers of ``graph`` this policy names, in either spelling.

        Raises:
            ModelMismatchError: a name matches no layer, or a layer changed class.
        """
        return _match_graph(self, graph)

    # JSON --------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """The versioned JSON document :meth:`save` writes."""
        return _document(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as versioned JSON, atomically (see :meth:`load`).

        Raises:
            OutputError: the file cannot be written (missing directory, a directory in the way).
        """
        from autoprec.files import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_json_dict(), indent=2, allow_nan=False) + "\n", what="policy file")

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrecisionPolicy:
        """Read and schema-check a policy file written by :meth:`save`.

        The file is untrusted: anything off-schema raises :class:`SchemaError`.
        """
        from autoprec.files import read_text

        text = read_text(path, what="policy JSON file", error=SchemaError)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(
                f"Expected a policy JSON file written by autoprec. Received: {str(path)!r}, "
                f"which is not valid JSON ({exc}). Regenerate it with `result.policy.save(...)`."
            ) from None
        return cls.from_json_dict(doc, source=str(path))

    @classmethod
    def from_json_dict(cls, doc: Any, *, source: str = "<dict>") -> PrecisionPolicy:
        """Validate a JSON document and build the policy from it."""
        entries, target, facts, provenance = _parse_document(doc, source)
        return cls(entries, target=target, layers=facts, provenance=provenance)


def _summary(policy: PrecisionPolicy) -> str:
    share = policy.low_precision_share()
    n = len(policy)
    lines = [f"PrecisionPolicy for {n} layer{'' if n == 1 else 's'} (target: {policy.target or 'none'})"]
    lines += [f"  {name:<15} {k:>5} layers" for name, k in policy.counts().items()]
    for key, label in (("params", "parameters"), ("flops", "FLOPs")):
        if not math.isnan(share[key]):
            lines.append(f"  16-bit share of {label + ':':<11} {share[key]:.1%}")
    return "\n".join(lines)


def _low_precision_share(entries: Mapping[str, str], layers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    totals, low = {"params": 0.0, "flops": 0.0}, {"params": 0.0, "flops": 0.0}
    for path, facts in layers.items():
        for key in totals:
            value = float(facts.get(key, 0) or 0)
            totals[key] += value
            if entries.get(path) in LOW_PRECISION or is_quantized(entries.get(path)):
                low[key] += value
    return {k: (low[k] / totals[k] if totals[k] else math.nan) for k in totals}


def _clean_entries(entries: Any) -> dict[str, str]:
    if not isinstance(entries, Mapping):
        raise PolicyError(f"Expected a mapping of layer path to policy name. Received: {describe(entries)}.")
    clean = {}
    for path, name in entries.items():
        if not isinstance(path, str) or not path:
            raise PolicyError(f"Expected layer paths as non-empty strings. Received: {describe(path)}.")
        clean[path] = check_policy_name(name, what=f"policy for layer {path!r}")
    return clean


def _entries_of_map(policy_map: Any) -> dict[str, str]:
    from keras import dtype_policies

    if not isinstance(policy_map, dtype_policies.DTypePolicyMap):
        raise PolicyError(f"Expected a keras.dtype_policies.DTypePolicyMap. Received: {describe(policy_map)}.")
    return {key: policy_map[key].name for key in policy_map}


_CONFIG_KEYS = {"entries", "target", "layers", "provenance"}  # get_config's keys (provenance since 0.1)


def _from_any(cls: type[PrecisionPolicy], policy: Any) -> PrecisionPolicy:
    if isinstance(policy, PrecisionPolicy):
        return policy
    if isinstance(policy, (str, os.PathLike)):
        return cls.load(policy)
    if isinstance(policy, Mapping) and {"entries", "target", "layers"} <= set(policy) <= _CONFIG_KEYS:
        return cls.from_config(policy)
    if isinstance(policy, Mapping) and not hasattr(policy, "default_policy"):
        return cls(policy)
    try:
        return cls.from_keras(policy)
    except PolicyError:
        raise PolicyError(
            "Expected policy to be an autoprec.PrecisionPolicy, a keras DTypePolicyMap, a dict of "
            f"layer path to policy name, or the path of a policy JSON file. Received: {describe(policy)}."
        ) from None


def _to_keras(policy: PrecisionPolicy, model: Any):
    from keras import dtype_policies

    if model is None:
        facts = policy.layers
        keyed = {facts.get(p, {}).get("keras_path") or p: name for p, name in policy.items()}
    else:
        keyed = _keyed_by_keras_path(policy, model)
    return dtype_policies.DTypePolicyMap(
        default_policy=FLOAT32,
        policy_map={path: dtype_policies.DTypePolicy(name) for path, name in keyed.items()},
    )


def _document(policy: PrecisionPolicy) -> dict[str, Any]:
    import keras

    from autoprec import __version__

    facts = policy.layers
    return {
        "format": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "autoprec_version": __version__,
        "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": policy.target,
        "default_policy": FLOAT32,
        "layers": [{"path": path, "policy": name, **facts.get(path, {})} for path, name in policy.items()],
        **({"provenance": policy.provenance} if policy.provenance else {}),
    }


def _parse_document(
    doc: Any, source: str
) -> tuple[dict[str, str], str | None, dict[str, dict[str, Any]], dict[str, Any]]:
    def fail(msg: str) -> SchemaError:
        return SchemaError(f"Invalid policy file {source}: {msg}")

    if not isinstance(doc, dict):
        raise fail(f"expected a JSON object at the top level, received {type(doc).__name__}.")
    if doc.get("format") != SCHEMA_NAME:
        raise fail(f"expected format={SCHEMA_NAME!r}, received {doc.get('format')!r}.")
    version = doc.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise fail(
            f"expected schema_version in {list(READABLE_VERSIONS)}, received {version!r}. "
            "It was written by another autoprec version; re-export it with this one."
        )
    target = doc.get("target")
    if target is not None and target not in TARGETS:
        raise fail(f"expected target in {list(TARGETS)} or null, received {target!r}.")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise fail(f"expected 'layers' to be a list, received {type(layers).__name__}.")
    if not layers:  # an empty policy would apply as "all float32" without a word: never what a written file meant
        raise fail(
            "expected at least one layer in 'layers', received an empty list. The file holds no policy; "
            "write it again with result.policy.save(path)."
        )
    entries: dict[str, str] = {}
    facts: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(layers):
        if not isinstance(row, dict):
            raise fail(f"layers[{i}] should be an object, received {type(row).__name__}.")
        path, name = row.get("path"), row.get("policy")
        if not isinstance(path, str) or not path:
            raise fail(f"layers[{i}].path should be a non-empty string, received {path!r}.")
        if path in entries:
            raise fail(f"layer path {path!r} appears twice.")
        quantized_ok = version >= 2 and is_quantized(name)  # version 1 predates quantized names
        if not isinstance(name, str) or (name not in POLICY_NAMES and not quantized_ok):
            raise fail(
                f"layers[{i}].policy should be one of {list(POLICY_NAMES)}"
                f"{' or a quantized name such as int8_from_float32' if version >= 2 else ''}, received {name!r}."
            )
        entry = _parse_facts(row, i, fail)
        entries[path] = name
        if entry:
            facts[path] = entry
    return entries, target, facts, _checked_provenance(doc.get("provenance", {}), fail)


def _checked_provenance(provenance: Any, error: Callable[[str], Exception]) -> dict[str, Any]:
    """A provenance record: string keys, values that are JSON scalars (finite numbers) or objects of them."""

    def scalar(value: Any) -> bool:
        if isinstance(value, float):
            return math.isfinite(value)
        return value is None or isinstance(value, (str, bool, int))

    if not isinstance(provenance, Mapping):
        raise error(f"Expected 'provenance' to be an object. Received {describe(provenance)}.")
    clean: dict[str, Any] = {}
    for key, value in provenance.items():
        inner = value.values() if isinstance(value, Mapping) else [value]
        if not isinstance(key, str) or not all(scalar(v) for v in inner):
            raise error(
                f"Expected provenance.{key} to be a string, a finite number, true/false, null, or an object of "
                f"those. Received {describe(value)}."
            )
        clean[key] = dict(value) if isinstance(value, Mapping) else value
    return clean


def _parse_facts(row: dict, i: int, fail) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key in ("class", "keras_path"):
        if key in row:
            if not isinstance(row[key], str):
                raise fail(f"layers[{i}].{key} should be a string, received {row[key]!r}.")
            entry[key] = row[key]
    for key in ("params", "flops"):
        if key in row:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == math.inf:
                raise fail(f"layers[{i}].{key} should be a finite number >= 0, received {value!r}.")
            entry[key] = value
    return entry


def _match_graph(policy: PrecisionPolicy, graph: Any) -> dict[str, str]:
    """Map the policy's names onto the graph's keys; a layer named twice takes its most specific name."""
    aliases = graph.aliases()
    classes = dict(graph.fingerprint())
    facts = policy.layers
    unknown, changed, named = [], [], set()
    for name in policy:
        keys = aliases.get(name)
        if keys is None:
            unknown.append(name)
            continue
        named.update(keys)
        recorded = facts.get(name, {}).get("class")
        if recorded and len(keys) == 1 and classes.get(keys[0]) != recorded:
            changed.append(f"{keys[0]} ({recorded} in the policy, {classes.get(keys[0])} in the model)")
    extra = sorted(set(classes) - named) if facts else []
    if unknown or changed or extra:
        parts = [f"in the policy but not in the model: {_short_list(sorted(unknown))}"] if unknown else []
        parts += [f"in the model but not in the policy: {_short_list(extra)}"] if extra else []
        parts += [f"with another class: {_short_list(sorted(changed))}"] if changed else []
        raise ModelMismatchError(
            "This policy was made for a different model. Layers "
            + "; ".join(parts)
            + ". Tune this model (autoprec.tune) or load the policy made for it. A policy may name a layer by "
            "its key (`autoprec layers MODEL`), by its Keras layer.path, or a nested model by its name."
        )
    out: dict[str, str] = {}
    # Broad names (a nested model) first, so a layer's own entry wins.
    for name in sorted(policy, key=lambda n: -len(aliases[n])):
        for key in aliases[name]:
            out[key] = policy[name]
    return out


def _keyed_by_keras_path(policy: PrecisionPolicy, model: Any) -> dict[str, str]:
    from autoprec.graph import build_graph

    graph = build_graph(model)
    names = policy.for_graph(graph)
    keyed, unaddressable = {}, []
    for info in graph.layers:
        for key, kpath in zip((info.path, *info.sublayers), (info.keras_path, *info.sublayer_keras_paths), strict=True):
            if key not in names:
                continue
            if kpath:
                keyed[kpath] = names[key]
            elif names[key] != FLOAT32:
                unaddressable.append(key)
    if unaddressable:
        logger.warning(
            "autoprec: %d layer(s) have no layer.path (Keras sets one only for layers with their own build()), so a "
            "DTypePolicyMap passed as dtype= gives them its default, float32, although the policy says 16-bit: %s. "
            "They compute in float32 at the cost of a cast; apply_policy sets them exactly.",
            len(unaddressable),
            _short_list(unaddressable),
        )
    return keyed


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
