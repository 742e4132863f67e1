"""The decision space: which layers the search decides, in which groups, in which order.

Decisions are the weighted layers, and the weightless layers that
:func:`autoprec.profiling.sensitivity.own_risk` finds risky on their own. Every other
weightless layer joins its producers (``graph.resolve``). With
``granularity="block"``, weighted layers are grouped by nested model, else
by name prefix (``conv2_block1_1_conv`` -> ``conv2_block1_1``); a risky
weightless layer stays a decision of its own even then. Layers named in
``force_16bit`` are held at the target and are not decided.

Quantized candidates (``"int8"``, ``"int4"``, ``"float8"``) are choices only
for decisions whose layers Keras can all quantize; a chosen mode expands to
the Keras policy name with the target as its float part where Keras allows
it (``int8_from_mixed_bfloat16``).

>>> space = DecisionSpace({"d1": ("d1",), "d2": ("d2",)}, choices=("float32", "mixed_float16"),
...                       target="mixed_float16", order=("d2", "d1"))
>>> space.expand({"d2": "mixed_float16"})
{'d1': 'float32', 'd2': 'mixed_float16'}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoprec.formats import FLOAT32, QUANTIZED_MODES, quantized_name
from autoprec.graph import ModelGraph
from autoprec.profiling.sensitivity import own_risk
from autoprec.profiling.stats import NONFINITE_OUTPUTS, Hazard, hazard, number, tested_alone
from autoprec.search.plan import Space

GRANULARITIES = ("layer", "block")


@dataclass(frozen=True)
class DecisionSpace:
    """Decision keys, the layers each sets, and the sensitivity order of the keys."""

    groups: Mapping[str, tuple[str, ...]]
    choices: tuple[str, ...]
    target: str
    order: tuple[str, ...]
    forced: tuple[str, ...] = ()
    own: frozenset[str] = field(default_factory=frozenset)
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per key, when not ``choices``
    quantized: Mapping[str, str] = field(default_factory=dict)  # mode -> Keras policy name
    top: Mapping[str, str] = field(default_factory=dict)  # per key, the choice of "everything as far as it goes"
    split: Mapping[str, list[str]] = field(default_factory=dict)  # producer key -> followers split off in float32
    ruled_out: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # key -> choices that alone broke the budget

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def choices_of(self, key: str) -> tuple[str, ...]:
        """The choices of one decision (quantized modes only where Keras can quantize every layer of it)."""
        return tuple(self.options.get(key, self.choices))

    def expand(self, assignment: Mapping[str, str]) -> dict[str, str]:
        """``{layer path: policy}`` for every decided layer (missing keys: float32) and the forced ones."""
        out = {path: self.target for path in self.forced}
        for key, paths in self.groups.items():
            choice = assignment.get(key, FLOAT32)
            for path in paths:
                out[path] = self.quantized.get(choice, choice)
        return out

    def as_searched(self) -> DecisionSpace:
        """The space the study searched: without the followers split off after it (see ``tuner.split_stage``)."""
        if not self.split:
            return self
        followers = {f for fs in self.split.values() for f in fs}
        return dataclasses.replace(
            self,
            groups={k: v for k, v in self.groups.items() if k not in followers},
            order=tuple(k for k in self.order if k not in followers),
            own=frozenset(self.own - followers),
            split={},
        )

    def key_of(self, path: str) -> str | None:
        """The decision key that sets ``path``, if any."""
        for key, paths in self.groups.items():
            if path in paths:
                return key
        return None

    def search_space(self) -> Space:
        return Space(
            self.keys,
            self.choices,
            self.target,
            self.order,
            options={k: v for k, v in self.options.items() if v != self.choices},
            top=dict(self.top),
            ruled_out=dict(self.ruled_out),
        )


def build_space(
    graph: ModelGraph,
    frame: Any,
    *,
    granularity: str,
    target: str,
    choices: Sequence[str],
    tolerance: float,
    objective: str = "speed",
    allowed: float | None = None,
) -> DecisionSpace:
    """The decision space for ``graph`` from its profile ``frame`` (ranked most sensitive first).

    ``allowed`` (the largest drop the budget allows) rules out the target for
    every key one of whose layers lost more alone in the profile's ablation
    (:func:`ruled_out`).
    """
    forced = tuple(p for p in graph.forced if p in graph and graph[p].eligible)
    own = own_risk(frame, graph, tolerance=tolerance) - set(forced)
    decided = [i.path for i in graph.eligible if (i.is_unit or i.path in own) and i.path not in forced]
    if granularity == "block":
        groups = _blocks(graph, [p for p in decided if p not in own])
        groups.update({p: (p,) for p in decided if p in own})
    else:
        groups = {p: (p,) for p in decided}
    groups = _overflowing_blocks_together(graph, frame, groups)
    rank = {p: i for i, p in enumerate(frame["path"])}
    position = {i.path: i.order for i in graph.layers}
    keys = sorted(groups, key=lambda k: position[groups[k][0]])  # execution order
    ordered = tuple(sorted(keys, key=lambda k: min(rank.get(p, len(rank)) for p in groups[k])))
    modes = [c for c in choices if c in QUANTIZED_MODES]
    floats = tuple(c for c in choices if c not in modes)
    options = {k: (floats if not all(graph[p].quantizable for p in groups[k]) else tuple(choices)) for k in keys}
    # The choice each key takes when everything goes as far as it can: the smallest format for size.
    smallest = [m for m in ("int4", "int8") if m in modes]
    top = {k: smallest[0] for k in keys if objective == "size" and smallest and smallest[0] in options[k]}
    searched = target if target in choices else floats[-1]
    return DecisionSpace(
        {k: groups[k] for k in keys},
        choices=tuple(choices),
        target=searched,
        order=ordered,
        forced=forced,
        own=frozenset(own),
        options=options,
        quantized={m: quantized_name(m, target if target in choices else FLOAT32) for m in modes},
        top=top,
        ruled_out={} if allowed is None else ruled_out(frame, {k: groups[k] for k in keys}, searched, allowed),
    )


def alone_drop(row: Mapping[str, Any]) -> float:
    """The drop a layer the ablation measured alone caused (a certain lower bound where it was stopped over the
    budget; infinite where the outputs went non-finite), NaN where it was not measured alone.

    >>> alone_drop({"ablation": "alone", "metric_drop": 0.01}), alone_drop({})
    (0.01, nan)
    """
    if not tested_alone(row):
        return math.nan
    if number(row, NONFINITE_OUTPUTS, 0.0) > 0:
        return math.inf
    return number(row, "metric_drop")


def ruled_out(
    frame: Any, groups: Mapping[str, tuple[str, ...]], target: str, allowed: float
) -> dict[str, tuple[str, ...]]:
    """Keys whose target is ruled out: one of their layers, alone in the target format (every other layer
    float32), lost more than the budget allows in the ablation.

    Its measured drop itself, not an upper bound on it: rounding more layers only adds error (the fall-back's
    bisection rests on the same fact), so no assignment with that layer in the target can meet the budget, and
    the search never spends a trial on one.
    """
    rows = {r["path"]: r for r in frame.to_dict("records")} if "ablation" in frame else {}
    out: dict[str, tuple[str, ...]] = {}
    for key, paths in groups.items():
        if any(alone_drop(rows.get(p, {})) > allowed for p in paths):
            out[key] = (target,)
    return out


def _overflowing_blocks_together(
    graph: ModelGraph, frame: Any, groups: dict[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """One decision, keyed by the block, for the sublayers of a block whose own call in 16-bit goes non-finite where
    float32 does not, though no sublayer's does.

    Such an overflow may lie in the block's own ops between its sublayers (attention scores of 16-bit queries
    and keys), which the engine computes in float32 where the sublayers differ: only the block all in 16-bit or
    all in float32 is simulated with its real arithmetic.
    """
    rows = {r["path"]: r for r in frame.to_dict("records")}

    def breaks(path: str) -> bool:  # its own call in 16-bit goes non-finite, or its float32 output overflows
        row = rows.get(path, {})
        return number(row, "sqnr_db", 0.0) == -math.inf or hazard(row) is Hazard.OVERFLOW

    out = dict(groups)
    for block, paths in graph.inner.items():
        members = [k for k in groups if set(groups[k]) & set(paths)]
        if members and breaks(block) and not any(breaks(p) for p in paths):
            out = {k: v for k, v in out.items() if k not in members}
            key = block if block not in out else f"{block} (block)"  # a name-prefix group may share its name
            out[key] = tuple(p for k in members for p in groups[k])
    return out


def _blocks(graph: ModelGraph, paths: list[str]) -> dict[str, tuple[str, ...]]:
    """Group layers: a nested sub-model is one block, else layers sharing a name prefix.

    The prefix is the path with its last ``_``-separated token dropped
    (``conv2_block1_1_conv`` -> ``conv2_block1_1``); a custom layer's
    sublayers already share their parent.
    """
    groups: dict[str, list[str]] = {}
    for path in paths:
        info = graph[path]
        if info.parent:
            block = info.parent
        else:
            name = path.split("/")[0]
            block = name.rsplit("_", 1)[0] if "_" in name else name
        groups.setdefault(block, []).append(path)
    return {k: tuple(v) for k, v in groups.items()}
