"""The callback's rules: its options, the events it records, and the judge that decides moves."""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Mapping
from typing import Any

from autoprec.data import TRAIN_BATCH_SIZE
from autoprec.errors import ArgumentError, check_int, describe
from autoprec.formats import FLOAT32, LOW_PRECISION, Format
from autoprec.profiling.stats import (
    ACT_ABSMAX,
    ACT_FLUSH,
    ACT_NONFINITE,
    FLUSH_SHARE,
    GRAD_ABSMAX,
    GRAD_FLUSH,
    GRAD_NONFINITE,
    as_float,
)

logger = logging.getLogger("autoprec")


# Files AdaptivePrecision.save writes (autoprec.report.pages spells the CSV names too, so that
# reading a report does not import Keras; a test holds the two spellings together).
HISTORY_FILE = "adaptive_history.csv"
CHECKS_FILE = "adaptive_checks.csv"
POLICY_FILE = "adaptive_policy.json"

EVENT_COLUMNS = (
    "step",
    "epoch",
    "layer",
    "direction",
    "before",
    "after",
    "reason",
    "node",
    "statistic",
    "value",
    "threshold",
    "why",
)
CHECK_COLUMNS = (
    "step",
    "epoch",
    "trigger",
    "loss",
    "sample_loss",
    "loss_scale",
    "skipped_steps",
    "layers_16bit",
    "seconds",
)
PROMOTE, DEMOTE = "promote", "demote"


class Change(enum.StrEnum):
    """Why the callback moved a layer: the ``reason`` column of :attr:`AdaptivePrecision.history`.

    >>> Change.OVERFLOW == "OVERFLOW"
    True
    """

    OVERFLOW = "OVERFLOW"  # an activation at the layer reaches promote_at of the largest finite value
    UNDERFLOW = "UNDERFLOW"  # over flush_share of the nonzero activations at the layer flush to zero
    GRAD_UNDERFLOW = "GRAD_UNDERFLOW"  # over flush_share of its gradients flush at the loss scale
    GRAD_OVERFLOW = "GRAD_OVERFLOW"  # skipped steps, and its gradients overflow even at the lowered scale
    SKIPPED_STEPS = "SKIPPED_STEPS"  # skipped steps no statistic explains: the layer closest to the limits
    NONFINITE_LOSS = "NONFINITE_LOSS"  # a non-finite loss no statistic explains: the layer closest to the limits
    RETRY_FAILED = "RETRY_FAILED"  # trouble while a demoted layer was on probation
    SAFE_RANGE = "SAFE_RANGE"  # demoted: its statistics stayed well inside the format's range


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
    """The callback's cadence and thresholds, checked on construction.

    Example:
        >>> AdaptiveOptions(check_every=50).promote_at
        0.5
        >>> AdaptiveOptions(check_every=0)
        Traceback (most recent call last):
        ...
        autoprec.errors.ArgumentError: Expected check_every to be an integer >= 1. Received: check_every=0 ...
    """

    check_every: int = 100
    batch_size: int = TRAIN_BATCH_SIZE
    promote_at: float = 0.5
    demote_at: float = 1 / 16
    flush_share: float = FLUSH_SHARE
    patience: int = 3
    cooldown: int = 10
    skip_limit: int = 3

    def __post_init__(self) -> None:
        for name, minimum in (
            ("check_every", 1),
            ("batch_size", 1),
            ("patience", 1),
            ("cooldown", 0),
            ("skip_limit", 1),
        ):
            check_int(name, getattr(self, name), minimum)
        _check_share("promote_at", self.promote_at, 0.0, 1.0, closed="high")
        _check_share("demote_at", self.demote_at, 0.0, self.promote_at, what=" (below promote_at)")
        _check_share("flush_share", self.flush_share, 0.0, 1.0, closed="low")


def _check_share(name: str, value: object, low: float, high: float, *, closed: str = "", what: str = "") -> None:
    """Raise unless ``value`` is a number between ``low`` and ``high``; ``closed`` names the ends included."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    above = number is not None and (low <= number if "low" in closed else low < number)
    below = number is not None and (number <= high if "high" in closed else number < high)
    if not (above and below):
        span = f"{'[' if 'low' in closed else '('}{low:g}, {high:g}{']' if 'high' in closed else ')'}"
        raise ArgumentError(f"Expected {name} to be a number in {span}{what}. Received: {name}={describe(value)}.")


@dataclasses.dataclass(frozen=True)
class Event:
    """One change of one layer's policy, with the statistic that caused it.

    >>> Event(step=98, epoch=6, layer="d2", direction="promote", before="mixed_float16", after="float32",
    ...       reason="OVERFLOW", node="d2", statistic=ACT_ABSMAX, value=7.2e4, threshold=32752.0).why
    'mixed_float16 -> float32: act_absmax reached 7.2e+04 >= 3.28e+04'
    """

    step: int
    epoch: int
    layer: str
    direction: str
    before: str
    after: str
    reason: str
    node: str = ""
    statistic: str = ""
    value: float = math.nan
    threshold: float = math.nan

    @property
    def why(self) -> str:
        """The change in words."""
        where = "" if self.node in ("", self.layer) else f" at its input from `{self.node}`"
        fact = {
            Change.OVERFLOW: f"{self.statistic}{where} reached {self.value:.3g} >= {self.threshold:.3g}",
            Change.UNDERFLOW: (
                f"{self.value:.2%} of the nonzero activations{where} flush to zero (> {self.threshold:.2%})"
            ),
            Change.GRAD_UNDERFLOW: (
                f"{self.value:.2%} of the gradients{where} flush at the loss scale (> {self.threshold:.2%})"
            ),
            Change.GRAD_OVERFLOW: (
                f"after skipped steps, its gradients{where} reach {self.value:.3g} at the lowered loss scale"
            ),
            Change.SKIPPED_STEPS: f"{self.value:g} skipped steps, and it is the 16-bit layer closest to the limits",
            Change.NONFINITE_LOSS: "the loss turned non-finite, and it is the 16-bit layer closest to the limits",
            Change.RETRY_FAILED: "training misbehaved while it was on probation in 16-bit",
            Change.SAFE_RANGE: f"{self.statistic}{where} stayed at {self.value:.3g} <= {self.threshold:.3g}",
        }[Change(self.reason)]
        return f"{self.before} -> {self.after}: {fact}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "why": self.why}


# ---------------------------------------------------------------------------
# The rules: plain Python over per-node statistics (tested with hand-made rows)


class Judge:
    """Decide promotions and demotions from one check's statistics; keeps patience, probation and cool-down.

    Args:
        producers: ``{layer path: its producers' paths}`` for every layer the callback may move.
        assignment: ``{layer path: policy name}``, the current policy of those layers.
        fmt: the 16-bit format layers are demoted to and judged against.
        options: the thresholds.
        demote: whether float32 layers may be tried in 16-bit.

    Example:
        >>> from autoprec.formats import get
        >>> judge = Judge({"d": ()}, {"d": "mixed_float16"}, get("mixed_float16"), AdaptiveOptions())
        >>> [e.reason for e in judge.decide({"d": {ACT_ABSMAX: 4e4}}, step=10)]
        ['OVERFLOW']
        >>> judge.assignment
        {'d': 'float32'}
    """

    def __init__(
        self,
        producers: Mapping[str, tuple[str, ...]],
        assignment: Mapping[str, str],
        fmt: Format,
        options: AdaptiveOptions,
        *,
        demote: bool = False,
    ) -> None:
        self.producers, self.assignment, self.fmt, self.options = dict(producers), dict(assignment), fmt, options
        self.demote = demote
        self.checks = 0
        self._safe: dict[str, int] = {}
        self._cool: dict[str, int] = {}  # path -> last check of its cool-down
        self._probation: dict[str, int] = {}  # path -> last check of its probation

    def decide(
        self,
        rows: Mapping[str, Mapping[str, float]],
        *,
        step: int,
        epoch: int = 0,
        skipped: int = 0,
        nonfinite_loss: bool = False,
        scale_ratio: float = 1.0,
    ) -> list[Event]:
        """The changes this check calls for (already applied to :attr:`assignment`).

        Args:
            rows: statistics columns per node path (``act_absmax``, ``grad_flush``...); may be empty.
            step, epoch: where training is, for the events.
            skipped: steps the LossScaleOptimizer skipped since the last check.
            nonfinite_loss: the logged loss turned non-finite.
            scale_ratio: the current loss scale over the one the gradient rows were taken at.
        """
        self.checks += 1
        trouble = nonfinite_loss or skipped >= self.options.skip_limit
        found = [self._hazard(p, rows, trouble, scale_ratio) for p in self._low()]
        changes = [(p, *h) for p, h in zip(self._low(), found, strict=True) if h is not None]
        if trouble and not changes:
            changes = self._blame(rows, skipped, nonfinite_loss, scale_ratio)
        events = [
            self._event(p, FLOAT32, reason, node, stat, value, limit, step, epoch)
            for p, reason, node, stat, value, limit in changes
        ]
        for event in events:
            self._cool[event.layer] = self.checks + self.options.cooldown
            self._probation.pop(event.layer, None)
        if self.demote and not trouble and not events:
            events += self._demotions(rows, step, epoch)
        else:
            self._safe.clear()
        return events

    def _low(self) -> list[str]:
        return [p for p, name in self.assignment.items() if name in LOW_PRECISION]

    def _nodes(self, path: str, rows: Mapping[str, Mapping[str, float]]) -> list[tuple[str, Mapping[str, float]]]:
        return [(n, rows[n]) for n in (path, *self.producers.get(path, ())) if n in rows]

    def _hazard(self, path: str, rows: Mapping, trouble: bool, scale_ratio: float) -> tuple | None:
        """``(reason, node, statistic, value, threshold)`` of the first hazard at ``path``, or None."""
        top, share = self.options.promote_at * self.fmt.max_finite, self.options.flush_share
        for node, r in self._nodes(path, rows):
            if _num(r, ACT_ABSMAX) >= top:
                return Change.OVERFLOW, node, ACT_ABSMAX, _num(r, ACT_ABSMAX), top
            if _num(r, ACT_FLUSH) > share:
                return Change.UNDERFLOW, node, ACT_FLUSH, _num(r, ACT_FLUSH), share
            if _num(r, GRAD_FLUSH) > share:
                return Change.GRAD_UNDERFLOW, node, GRAD_FLUSH, _num(r, GRAD_FLUSH), share
            if trouble and _num(r, GRAD_ABSMAX) * scale_ratio >= self.fmt.max_finite:
                return (
                    Change.GRAD_OVERFLOW,
                    node,
                    GRAD_ABSMAX,
                    _num(r, GRAD_ABSMAX) * scale_ratio,
                    self.fmt.max_finite,
                )
        return None

    def _blame(self, rows: Mapping, skipped: int, nonfinite_loss: bool, scale_ratio: float) -> list[tuple]:
        """Trouble no statistic explains: the layers on probation, else the 16-bit layer closest to the limits."""
        reason = Change.NONFINITE_LOSS if nonfinite_loss else Change.SKIPPED_STEPS
        value = math.nan if nonfinite_loss else float(skipped)
        statistic = "loss" if nonfinite_loss else "skipped_steps"
        probation = [p for p, last in self._probation.items() if last >= self.checks and p in self._low()]
        if probation:
            return [(p, Change.RETRY_FAILED, p, statistic, value, math.nan) for p in probation]
        low = self._low()
        if not rows:  # no statistics (subclassed model): every 16-bit layer goes back
            return [(p, reason, p, statistic, value, math.nan) for p in low]

        def closeness(path: str) -> float:
            return max(
                [max(_num(r, ACT_ABSMAX), _num(r, GRAD_ABSMAX) * scale_ratio) for _, r in self._nodes(path, rows)]
                or [-1.0]
            )

        return [(max(low, key=closeness), reason, "", statistic, value, math.nan)] if low else []

    def _demotions(self, rows: Mapping, step: int, epoch: int) -> list[Event]:
        limit = self.options.demote_at * self.fmt.max_finite
        events = []
        for path, name in self.assignment.items():
            if name != FLOAT32 or self._cool.get(path, 0) >= self.checks:
                continue
            nodes = self._nodes(path, rows)
            safe = bool(nodes) and all(self._safe_row(r, limit) for _, r in nodes)
            self._safe[path] = self._safe.get(path, 0) + 1 if safe else 0
            if self._safe[path] >= self.options.patience:
                node, r = max(nodes, key=lambda nr: _num(nr[1], ACT_ABSMAX))
                events.append(
                    self._event(
                        path,
                        self.fmt.name,
                        Change.SAFE_RANGE,
                        node,
                        ACT_ABSMAX,
                        _num(r, ACT_ABSMAX),
                        limit,
                        step,
                        epoch,
                    )
                )
                self._safe[path] = 0
                self._probation[path] = self.checks + self.options.patience
        return events

    def _safe_row(self, r: Mapping[str, float], limit: float) -> bool:
        share = self.options.flush_share
        return (
            _num(r, ACT_ABSMAX) <= limit
            and _num(r, ACT_FLUSH) <= share
            and _num(r, GRAD_FLUSH) <= share
            and _num(r, GRAD_ABSMAX) < self.fmt.max_finite
            and _num(r, ACT_NONFINITE) == 0
            and _num(r, GRAD_NONFINITE) == 0
        )

    def _event(
        self,
        path: str,
        after: str,
        reason: str,
        node: str,
        statistic: str,
        value: float,
        threshold: float,
        step: int,
        epoch: int,
    ) -> Event:
        before = self.assignment[path]
        self.assignment[path] = after
        return Event(
            step=step,
            epoch=epoch,
            layer=path,
            direction=PROMOTE if after == FLOAT32 else DEMOTE,
            before=before,
            after=after,
            reason=str(reason),
            node=node,
            statistic=statistic,
            value=float(value),
            threshold=float(threshold),
        )


def _num(row: Mapping[str, float], key: str) -> float:
    return as_float(row.get(key), 0.0)


# ---------------------------------------------------------------------------
# The sampled statistics pass
