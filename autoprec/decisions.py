"""Decisions and their reasons: one named constant per reason, and the sentence for each.

``tune`` picks a reason for every layer with :func:`reason_for`; the report,
the CLI and the tests filter on the :class:`Reason` values and turn them
into words with :func:`sentence`. Nothing else re-derives a reason.

>>> Reason.PINNED_OUTPUT == "PINNED_OUTPUT"
True
>>> sentence({"decision": "float32", "reason": "PINNED_USER"}, target="mixed_float16")
'float32: pinned by keep_float32'
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

from autoprec.formats import FLOAT32, MIXED_FLOAT16
from autoprec.formats import get as get_format
from autoprec.profiling.stats import (
    ACT_ABSMAX,
    ACT_FLUSH,
    ACT_OVERFLOW,
    ALONE_STOPPED,
    NONFINITE_OUTPUTS,
    Hazard,
    hazard,
    hazards,
    number,
    tested_alone,
)


class Reason(enum.StrEnum):
    """Why a layer ended where it did."""

    # Pinned to float32 (or left as it was) before any search.
    PINNED_OUTPUT = "PINNED_OUTPUT"  # produces a model output: outputs stay float32
    PINNED_SOFTMAX = "PINNED_SOFTMAX"  # softmax/sigmoid feeding an output
    PINNED_USER = "PINNED_USER"  # keep_float32=[...]
    PINNED_DTYPE = "PINNED_DTYPE"  # not a float32 layer to begin with (float64, int, quantized)
    # Decided by the search or its checks.
    LOW_PRECISION_OK = "LOW_PRECISION_OK"  # runs in 16-bit within the budget
    FORCED_16BIT = "FORCED_16BIT"  # force_16bit=[...]
    OVERFLOW = "OVERFLOW"  # its outputs exceed the format's range
    UNDERFLOW = "UNDERFLOW"  # a large share of its outputs flush to zero
    OP_HAZARD = "OP_HAZARD"  # a keras.ops node after it (no policy of its own) overflows or flushes
    METRIC_DROP = "METRIC_DROP"  # in 16-bit it costs more metric than the budget allows
    NO_GAIN = "NO_GAIN"  # 16-bit does not pay here: the cost model rates float32 at least as fast
    NOT_WITHIN_BUDGET = "NOT_WITHIN_BUDGET"  # 16-bit would pay, but no assignment with it in 16-bit met the budget
    SPLIT_FOLLOWER = "SPLIT_FOLLOWER"  # a weightless follower kept float32 so that its producer runs in 16-bit
    VERIFY_FALLBACK = "VERIFY_FALLBACK"  # returned to float32 by the real-policy verification
    TRAIN_FALLBACK = "TRAIN_FALLBACK"  # returned to float32 by the loss-scaled training check
    # Layers that are not decisions of their own.
    JOINED = "JOINED"  # a weightless layer that takes its producers' precision
    MOVES_DATA = "MOVES_DATA"  # pure data movement (reshape, dropout...): follows its input
    SUBLAYERS_DECIDED = "SUBLAYERS_DECIDED"  # a block whose sublayers are decisions of their own


def _text(row: Mapping[str, Any], key: str) -> str:
    """A text field of a row ('' when missing; a CSV reads empty cells back as NaN)."""
    value = row.get(key)
    return value if isinstance(value, str) else ""


def _positive(row: Mapping[str, Any], key: str) -> bool:
    value = number(row, key)
    return not math.isnan(value) and value > 0


def reason_for(
    row: Mapping[str, Any],
    *,
    decision: str,
    pinned: str | None,
    role: str,
    own_decision: bool,
    forced: bool = False,
    fallback: str | None = None,
    split_from: str | None = None,
) -> Reason:
    """The reason for one layer's final ``decision``, from its profile ``row``.

    Args:
        row: the layer's profile facts (``act_overflow``, ``metric_drop``...).
        decision: the policy name it ended with.
        pinned: its pin reason, if pinned.
        role: ``"weighted"``, ``"compute"``, ``"movement"``, ``"op"`` or ``"block"`` (see ``graph``).
        own_decision: whether the search decided it (a weightless layer may join its producer).
        forced: listed in ``force_16bit``.
        fallback: ``"verify"`` or ``"train"`` when a check returned it to float32.
        split_from: the producer this weightless layer was split from (kept float32 so it runs in 16-bit).

    A float32 decision with no measured hazard is ``NO_GAIN`` only when the
    cost model rates float32 at least as fast (``row["speedup_16bit"] <=
    row["speedup_float32"]``), else ``NOT_WITHIN_BUDGET``.

    >>> reason_for({"act_overflow": 0.2}, decision="float32", pinned=None, role="compute", own_decision=True)
    <Reason.OVERFLOW: 'OVERFLOW'>
    """
    if pinned:
        return Reason(pinned)
    if not own_decision:
        if role == "block":
            return Reason.SUBLAYERS_DECIDED
        return Reason.MOVES_DATA if role in ("movement", "op") else Reason.JOINED
    if decision != FLOAT32:
        return Reason.FORCED_16BIT if forced else Reason.LOW_PRECISION_OK
    if split_from:
        return Reason.SPLIT_FOLLOWER
    if fallback == "train":
        return Reason.TRAIN_FALLBACK
    if fallback == "verify":
        return Reason.VERIFY_FALLBACK
    found = hazard(row)
    if found is Hazard.OVERFLOW:
        return Reason.OVERFLOW
    if _text(row, "op_hazard"):  # its own outputs are fine: the keras.ops call after it is not
        return Reason.OP_HAZARD
    if found is not None:
        return Reason.UNDERFLOW if found is Hazard.FLUSH else Reason.OVERFLOW
    if _positive(row, "metric_drop"):
        return Reason.METRIC_DROP
    faster, as_is = number(row, "speedup_16bit"), number(row, "speedup_float32")
    if faster > 0 and as_is > 0 and faster > as_is * (1 + 1e-9):
        return Reason.NOT_WITHIN_BUDGET
    return Reason.NO_GAIN


def _drop_words(drop: float, metric: str, higher_is_better: bool) -> str:
    if "acc" in metric.lower():
        return f"drops {metric} by {drop * 100:.2g} points"
    verb = "drops" if higher_is_better else "raises"
    return f"{verb} {metric} by {abs(drop):.3g}"


def _facts(row: Mapping[str, Any], fmt: Any, metric: str, higher_is_better: bool) -> list[str]:
    """The measured hazards of one layer, in words (empty when none)."""
    facts = []
    drop = number(row, "metric_drop")
    # An infinite drop with non-finite outputs is said by the hazard below, in words.
    if drop > 0 and (math.isfinite(drop) or number(row, NONFINITE_OUTPUTS, 0.0) == 0):
        alone = "alone" if tested_alone(row) or "ablation" not in row else "in its group"
        # Stopped once it certainly broke the budget, its drop is a lower bound.
        least = " at least" if row.get("ablation") == ALONE_STOPPED else ""
        words = _drop_words(drop, metric, higher_is_better).replace(" by ", f" by{least} ", 1)
        facts.append(f"{alone} in {fmt.short} it {words}")
    absmax, overflow = number(row, ACT_ABSMAX), number(row, ACT_OVERFLOW)
    if overflow > 0:
        reach = f"its output reaches {absmax:.2g} > {fmt.max_finite:g}" if absmax == absmax else "its outputs overflow"
        facts.append(f"{reach} ({overflow * 100:.2g}% of values)")
    found = hazards(row)  # each one, not only the first: a layer can overflow and flush
    if Hazard.FLUSH in found:
        facts.append(f"{number(row, ACT_FLUSH) * 100:.2g}% of its nonzero outputs flush to zero in {fmt.short}")
    if Hazard.NONFINITE in found:
        facts.append(f"the model's outputs turn non-finite when it runs in {fmt.short}")
    if _text(row, "op_hazard"):
        facts.append(
            f"`{row['op_hazard']}` after it (a keras.ops call, no policy of its own) overflows {fmt.short}; "
            "wrap it in a layer to decide it separately"
        )
    return facts


_PINNED_WORDS = {
    Reason.PINNED_OUTPUT: "it produces a model output, and outputs stay float32",
    Reason.PINNED_SOFTMAX: (
        "a softmax/sigmoid feeding the output; Keras computes it in the layer's dtype, so it stays float32"
    ),
    Reason.PINNED_USER: "pinned by keep_float32",
    Reason.PINNED_DTYPE: "not a float32 layer to begin with; left as it was",
    Reason.JOINED: "no weights and no hazard of its own; it takes the precision of the layers that feed it",
    Reason.MOVES_DATA: "moves data without computing; it follows its input",
    Reason.SUBLAYERS_DECIDED: (
        "its sublayers are decided one by one (the rows listed just before it); its own ops between them compute "
        "in the 16-bit format they all share, else in float32"
    ),
}


def sentence(
    row: Mapping[str, Any],
    *,
    target: str = MIXED_FLOAT16,
    metric: str = "metric",
    higher_is_better: bool = True,
    allowed: float = math.inf,
) -> str:
    """The decision for one layer and why, in words.

    ``row`` holds ``decision`` and ``reason`` and the profile facts; for
    fallbacks, ``fallback_detail`` says what failed; ``producers`` names the
    layers feeding a weightless decision.

    >>> sentence({"decision": "float32", "reason": "OVERFLOW", "act_absmax": 7.4e4, "act_overflow": 0.31,
    ...           "role": "compute", "producers": "d2", "producer_decision": "mixed_float16"}, target="mixed_float16")
    'float32: its output reaches 7.4e+04 > 65504 (31% of values); its producer `d2` stays mixed_float16'
    """
    decision, reason = str(row.get("decision", FLOAT32)), Reason(row.get("reason", Reason.NO_GAIN))
    fmt = get_format(target)
    if reason in _PINNED_WORDS:
        return f"{decision}: {_PINNED_WORDS[reason]}"
    facts = _facts(row, fmt, metric, higher_is_better)
    if decision != FLOAT32:
        head = f"{decision}: " + ("forced by force_16bit; " if reason == Reason.FORCED_16BIT else "")
        share = number(row, "flops_share")
        effect = (facts[0] + ", within the budget") if facts else "no measurable drop"
        return head + effect + (f"; {share * 100:.2g}% of the model's FLOPs" if share == share else "")
    detail = _text(row, "fallback_detail")
    if reason == Reason.VERIFY_FALLBACK:
        facts.insert(0, "returned to float32 when the real Keras policies missed the budget")
    elif reason == Reason.TRAIN_FALLBACK:
        facts.insert(
            0,
            "returned to float32 by the loss-scaled training check"
            + (f" (with it in 16-bit: {detail})" if detail else ""),
        )
    elif reason == Reason.NO_GAIN:
        figures = (
            (
                f"the cost model rates the policy at {number(row, 'speedup_16bit'):.3g}x with it in 16-bit and "
                f"{number(row, 'speedup_float32'):.3g}x with it in float32: "
            )
            if number(row, "speedup_16bit") > 0
            else ""
        )
        facts.append(
            f"no measurable drop alone, but 16-bit here does not pay: {figures}the casts at its boundaries cost "
            "more than it saves"
        )
    elif reason == Reason.NOT_WITHIN_BUDGET:
        facts.append(
            f"16-bit here would pay ({number(row, 'speedup_16bit'):.3g}x against {number(row, 'speedup_float32'):.3g}x "
            "by the cost model), but no assignment the search tried with it in 16-bit met the budget"
        )
    elif reason == Reason.SPLIT_FOLLOWER:
        facts.insert(
            0,
            f"kept float32 so that its producer `{_text(row, 'split_from')}` computes in 16-bit: the search "
            "had kept both in float32 together, and the split (the producer in 16-bit, this layer in "
            "float32) was measured within the budget",
        )
    elif reason == Reason.METRIC_DROP and number(row, "metric_drop") <= allowed:
        facts.append("together with the other 16-bit layers it would exceed the budget")
    if _text(row, "role") == "compute" and _text(row, "producer_decision") and _text(row, "producers"):
        facts.append(f"its producer `{row['producers']}` stays {row['producer_decision']}")
    return f"{decision}: " + "; ".join(facts or ["kept float32 by the search"])
