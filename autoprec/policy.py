"""PrecisionPolicy: an immutable map from Keras ``layer.path`` to a policy name.

It knows nothing of Optuna or of how it was found; it converts to and from
Keras's own :class:`keras.dtype_policies.DTypePolicyMap` and to a versioned
JSON file that records which model it was made for.

>>> policy = PrecisionPolicy({"dense": "mixed_float16", "out": "float32"})
>>> policy["dense"]
'mixed_float16'
>>> policy.counts()
{'mixed_float16': 1, 'float32': 1}
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from autoprec.errors import ModelMismatchError, PolicyError, SchemaError, describe

FLOAT32 = "float32"
MIXED_FLOAT16 = "mixed_float16"
MIXED_BFLOAT16 = "mixed_bfloat16"
FLOAT64 = "float64"
POLICY_NAMES = (FLOAT32, MIXED_FLOAT16, MIXED_BFLOAT16, FLOAT64)
LOW_PRECISION = (MIXED_FLOAT16, MIXED_BFLOAT16)
TARGETS = (MIXED_FLOAT16, MIXED_BFLOAT16)

SCHEMA_NAME = "autoprec.policy"
SCHEMA_VERSION = 1


def check_policy_name(name: object, *, what: str = "policy") -> str:
    """Return ``name`` if it is an accepted policy name, else raise :class:`PolicyError`.

    >>> check_policy_name("mixed_bfloat16")
    'mixed_bfloat16'
    """
    if isinstance(name, str) and name in POLICY_NAMES:
        return name
    hint = ""
    if name in ("float16", "bfloat16"):
        # A pure 16-bit policy set after build does not really compute in 16-bit
        # (Keras 3.15); the mixed policies keep float32 variables and do.
        hint = f" Use 'mixed_{name}' instead: it computes in {name} and keeps float32 weights."
    raise PolicyError(
        f"Expected a {what} name, one of {list(POLICY_NAMES)}. Received: {describe(name)}.{hint}"
    )


class PrecisionPolicy(Mapping):
    """Immutable mapping of Keras layer path to policy name.

    Args:
        entries: ``{layer.path: policy name}``.
        target: the 16-bit format the policy was tuned for, if any.
        layers: optional facts per path (``class``, ``params``, ``flops``) used
            for the model fingerprint and for :meth:`summary`.

    Example:
        >>> p = PrecisionPolicy({"a": "float32", "b": "mixed_bfloat16"})
        >>> p.to_keras()["b"].name
        'mixed_bfloat16'
    """

    __slots__ = ("_entries", "_target", "_layers")

    def __init__(
        self,
        entries: Mapping[str, str],
        *,
        target: str | None = None,
        layers: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if not isinstance(entries, Mapping):
            raise PolicyError(
                f"Expected a mapping of layer path to policy name. Received: {describe(entries)}."
            )
        clean = {}
        for path, name in entries.items():
            if not isinstance(path, str) or not path:
                raise PolicyError(f"Expected layer paths as non-empty strings. Received: {describe(path)}.")
            clean[path] = check_policy_name(name, what=f"policy for layer {path!r}")
        if target is not None and target not in TARGETS:
            raise PolicyError(f"Expected target to be one of {list(TARGETS)} or None. Received: {describe(target)}.")
        self._entries = dict(clean)
        self._target = target
        self._layers = {k: dict(v) for k, v in (layers or {}).items()}

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

    # Derived views ------------------------------------------------------------
    @property
    def target(self) -> str | None:
        """The 16-bit format this policy was tuned for."""
        return self._target

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Facts recorded per layer path (class, params, flops); a copy."""
        return {k: dict(v) for k, v in self._layers.items()}

    @property
    def fingerprint(self) -> list[tuple[str, str]]:
        """``[(path, class name)]`` of the model the policy was made for, sorted."""
        return sorted((p, str(v.get("class", ""))) for p, v in self._layers.items())

    @property
    def uses_float16(self) -> bool:
        """True when any layer computes in float16 (a loss scale is then needed)."""
        return any(v == MIXED_FLOAT16 for v in self._entries.values())

    def counts(self) -> dict[str, int]:
        """Number of layers per policy name, in first-seen order."""
        out: dict[str, int] = {}
        for name in self._entries.values():
            out[name] = out.get(name, 0) + 1
        return out

    def low_precision_share(self) -> dict[str, float]:
        """Share of parameters and FLOPs in 16-bit layers (NaN when unknown)."""
        totals = {"params": 0.0, "flops": 0.0}
        low = {"params": 0.0, "flops": 0.0}
        for path, facts in self._layers.items():
            for key in totals:
                value = float(facts.get(key, 0) or 0)
                totals[key] += value
                if self._entries.get(path) in LOW_PRECISION:
                    low[key] += value
        return {k: (low[k] / totals[k] if totals[k] else math.nan) for k in totals}

    def summary(self) -> str:
        """A few lines: counts per policy and the 16-bit share of params and FLOPs.

        >>> print(PrecisionPolicy({"a": "float32"}).summary().splitlines()[0])
        PrecisionPolicy for 1 layers (target: none)
        """
        share = self.low_precision_share()
        lines = [f"PrecisionPolicy for {len(self)} layers (target: {self._target or 'none'})"]
        lines += [f"  {name:<15} {n:>5} layers" for name, n in self.counts().items()]
        if not math.isnan(share["params"]):
            lines.append(f"  16-bit share of parameters: {share['params']:.1%}")
        if not math.isnan(share["flops"]):
            lines.append(f"  16-bit share of FLOPs:      {share['flops']:.1%}")
        return "\n".join(lines)

    def replace(self, updates: Mapping[str, str]) -> "PrecisionPolicy":
        """A new policy with some entries changed (the original is immutable)."""
        entries = dict(self._entries)
        entries.update(updates)
        return PrecisionPolicy(entries, target=self._target, layers=self._layers)

    # Keras -------------------------------------------------------------------
    def to_keras(self):
        """A :class:`keras.dtype_policies.DTypePolicyMap` with an explicit float32 default.

        The explicit default matters: a map without one loses its float entries
        in ``get_config`` (Keras 3.15).
        """
        from keras import dtype_policies

        return dtype_policies.DTypePolicyMap(
            default_policy=FLOAT32,
            policy_map={path: dtype_policies.DTypePolicy(name) for path, name in self._entries.items()},
        )

    @classmethod
    def from_keras(cls, policy_map, *, target: str | None = None) -> "PrecisionPolicy":
        """Build from a ``DTypePolicyMap`` (its exact keys become paths).

        >>> from keras import dtype_policies
        >>> m = dtype_policies.DTypePolicyMap("float32", {"d": dtype_policies.DTypePolicy("mixed_float16")})
        >>> PrecisionPolicy.from_keras(m)["d"]
        'mixed_float16'
        """
        from keras import dtype_policies

        if not isinstance(policy_map, dtype_policies.DTypePolicyMap):
            raise PolicyError(f"Expected a keras.dtype_policies.DTypePolicyMap. Received: {describe(policy_map)}.")
        return cls({key: policy_map[key].name for key in policy_map}, target=target)

    # JSON --------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """The versioned JSON document :meth:`save` writes."""
        import keras

        from autoprec import __version__

        return {
            "format": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "autoprec_version": __version__,
            "keras_version": keras.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": self._target,
            "default_policy": FLOAT32,
            "layers": [
                {"path": path, "policy": name, **{k: v for k, v in self._layers.get(path, {}).items()}}
                for path, name in self._entries.items()
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as versioned JSON (see :meth:`load`)."""
        text = json.dumps(self.to_json_dict(), indent=2, allow_nan=False)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrecisionPolicy":
        """Read and schema-check a policy file written by :meth:`save`.

        The file is untrusted: anything off-schema raises :class:`SchemaError`.
        """
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            raise SchemaError(f"Expected a policy JSON file. Received: path={str(path)!r}, which does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SchemaError(
                f"Expected a policy JSON file written by autoprec. Received: {str(path)!r}, "
                f"which is not valid JSON ({exc}). Regenerate it with `result.policy.save(...)`."
            ) from None
        return cls.from_json_dict(doc, source=str(path))

    @classmethod
    def from_json_dict(cls, doc: Any, *, source: str = "<dict>") -> "PrecisionPolicy":
        """Validate a JSON document and build the policy from it."""

        def fail(msg: str) -> SchemaError:
            return SchemaError(f"Invalid policy file {source}: {msg}")

        if not isinstance(doc, dict):
            raise fail(f"expected a JSON object at the top level, received {type(doc).__name__}.")
        if doc.get("format") != SCHEMA_NAME:
            raise fail(f"expected format={SCHEMA_NAME!r}, received {doc.get('format')!r}.")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise fail(
                f"expected schema_version={SCHEMA_VERSION}, received {version!r}. "
                "It was written by another autoprec version; re-export it with this one."
            )
        target = doc.get("target")
        if target is not None and target not in TARGETS:
            raise fail(f"expected target in {list(TARGETS)} or null, received {target!r}.")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise fail(f"expected 'layers' to be a list, received {type(layers).__name__}.")
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
            if name not in POLICY_NAMES:
                raise fail(f"layers[{i}].policy should be one of {list(POLICY_NAMES)}, received {name!r}.")
            entry: dict[str, Any] = {}
            if "class" in row:
                if not isinstance(row["class"], str):
                    raise fail(f"layers[{i}].class should be a string.")
                entry["class"] = row["class"]
            for key in ("params", "flops"):
                if key in row:
                    value = row[key]
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                        raise fail(f"layers[{i}].{key} should be a number >= 0, received {value!r}.")
                    entry[key] = value
            entries[path] = name
            if entry:
                facts[path] = entry
        return cls(entries, target=target, layers=facts)

    # Model compatibility -----------------------------------------------------
    def check_fits(self, fingerprint: list[tuple[str, str]]) -> None:
        """Raise :class:`ModelMismatchError` unless the model's layers match the policy's.

        ``fingerprint`` is the model's ``[(path, class)]``; see ``graph.ModelGraph.fingerprint``.
        A policy without recorded layer facts is checked by paths only.
        """
        model_classes = dict(fingerprint)
        known = self._layers or {p: {} for p in self._entries}
        missing = sorted(p for p in known if p not in model_classes)
        extra = sorted(p for p in model_classes if p not in known) if self._layers else []
        changed = sorted(
            f"{p} ({facts['class']} in the policy, {model_classes[p]} in the model)"
            for p, facts in known.items()
            if p in model_classes and facts.get("class") and facts["class"] != model_classes[p]
        )
        if missing or extra or changed:
            parts = []
            if missing:
                parts.append(f"in the policy but not in the model: {_short_list(missing)}")
            if extra:
                parts.append(f"in the model but not in the policy: {_short_list(extra)}")
            if changed:
                parts.append(f"with another class: {_short_list(changed)}")
            raise ModelMismatchError(
                "This policy was made for a different model. Layers " + "; ".join(parts)
                + ". Tune this model (autoprec.tune) or load the policy made for it."
            )


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
