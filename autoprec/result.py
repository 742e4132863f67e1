"""What ``tune`` hands back: :class:`TuneResult`, one line to print, a summary, and an atomic save.

>>> result = autoprec.tune(model, (x_val, y_val), budget="0.5%")   # doctest: +SKIP
>>> result                                                          # doctest: +SKIP
TuneResult(metric=0.912, baseline=0.915, drop=0.003<=0.005, float16=41/52 layers, trials=50)
>>> result.save("reports/run1")                                     # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec.budget import BoundBudget, Budget
from autoprec.formats import get as get_format
from autoprec.formats import leaves_float32, split
from autoprec.policy import PrecisionPolicy
from autoprec.verify.real import TrainCheck

logger = logging.getLogger("autoprec")


@dataclass(frozen=True)
class TuneResult:
    """What :func:`autoprec.tune` found. ``repr`` is one line; ``summary()`` a few; ``save()`` writes it all.

    ``feasible`` is what verification with the real Keras policies showed:
    the verified drop is within the budget. A result that no fallback could
    bring within the budget says so in its ``repr`` and its summary.
    """

    policy: PrecisionPolicy
    model: Any = field(repr=False)
    sensitivity: Any = field(repr=False)
    trials: Any = field(repr=False)
    study: Any = field(repr=False)
    baseline_metric: float
    metric: float
    budget: Budget
    speedup_estimate: float
    metric_name: str = "metric"
    higher_is_better: bool = True
    target: str = "mixed_float16"
    formula: str = ""
    device: str = "gpu"
    verification: dict = field(default_factory=dict, repr=False)
    training: TrainCheck | None = field(default=None, repr=False)
    measured_speedup: float | None = None
    measured_on: str | None = None  # the device the measured figures came from (backends.device_description)
    pretrain_steps: int = 0
    stats: dict = field(default_factory=dict, repr=False)
    objective: str = "speed"
    size_ratio: float = 1.0
    drop_bound: float = math.nan  # the verified drop's upper bound at ``confidence`` (NaN: judged by the drop)
    confidence: float | None = None

    @property
    def rule(self) -> BoundBudget:
        """The budget bound to this result's float32 baseline: what judged it."""
        return self.budget.bind(
            baseline=self.baseline_metric,
            higher_is_better=self.higher_is_better,
            metric=self.metric_name,
            confidence=self.confidence,
        )

    @property
    def drop(self) -> float:
        return self.rule.drop(self.metric)

    @property
    def judged_drop(self) -> float:
        """What the budget judged: the drop's upper bound at :attr:`confidence`, or the drop where none was asked."""
        return self.drop if self.confidence is None or math.isnan(self.drop_bound) else max(self.drop_bound, self.drop)

    @property
    def drop_text(self) -> str:
        """``0.0031`` or ``0.0031 (95% bound 0.0046)``."""
        if self.judged_drop == self.drop and (self.confidence is None or math.isnan(self.drop_bound)):
            return f"{self.drop:.4g}"
        return f"{self.drop:.4g} ({self.confidence:.0%} bound {self.drop_bound:.4g})"

    @property
    def allowed_drop(self) -> float:
        return self.rule.allowed

    @property
    def feasible(self) -> bool:
        """The verified drop is within the budget, and the training check (if any) passed."""
        trained = self.training is None or self.training.passed
        return self.rule.feasible(self.judged_drop) and trained

    @property
    def units(self):
        """The rows of the layers the search decided."""
        frame = self.sensitivity
        return (
            frame[frame["kind"] == "decision"]
            if "kind" in frame
            else frame[frame["decision_unit"] & (frame["pinned"] == "")]
        )

    @property
    def cost_in_passes(self) -> dict[str, float]:
        """Each stage's wall time in warm float32 passes over the evaluation data, with the ``total``.

        ``{"open": ..., "profile": ..., "search": ..., "split": ..., "verify": ..., "total": ...}``; see
        :func:`autoprec.tuner.stage_passes`.
        """
        return dict(self.stats.get("stage_passes") or {})

    @property
    def sublayers(self):
        """The layers inside blocks, read from :attr:`model`: the precision each really computes in, pinned ones marked.

        See :func:`autoprec.graph.sublayer_frame`.
        """
        from autoprec.graph import sublayer_frame

        return sublayer_frame(self.model)

    @property
    def n_16bit(self) -> int:
        """Decisions that left float32: 16-bit, or quantized."""
        decisions = self.units["decision"].astype(str)
        return sum(bool(leaves_float32(d)) for d in decisions)

    @property
    def all_float32(self) -> bool:
        """True when no decision could leave float32 within the budget."""
        return self.n_16bit == 0

    @property
    def _low_label(self) -> str:
        """What the decisions that left float32 are: the 16-bit format, or ``reduced`` where some are quantized."""
        quantized = any(split(str(d))[0] is not None for d in self.units["decision"])
        return "reduced" if quantized else get_format(self.target).short

    def __repr__(self) -> str:
        rel = "<=" if self.rule.feasible(self.judged_drop) else ">"
        rel = rel if self.drop_text == f"{self.drop:.4g}" else f" {rel} "
        tail = "" if self.feasible else ", INFEASIBLE"
        return (
            f"TuneResult(metric={self.metric:.4g}, baseline={self.baseline_metric:.4g}, "
            f"drop={self.drop_text}{rel}{self.allowed_drop:.4g}, {self._low_label}={self.n_16bit}/"
            f"{len(self.units)} layers, trials={len(self.trials)}{tail})"
        )

    def summary(self) -> str:
        """A short human summary: budget, metrics, speed-up and the policy's counts."""
        verdict = "verified with Keras policies" if self.feasible else "verified with Keras policies: OVER THE BUDGET"
        lines = [
            repr(self),
            f"  budget: {self.formula}",
            f"  {self.metric_name}: float32 {self.baseline_metric:.6g} -> tuned {self.metric:.6g} ({verdict})",
            f"  estimated speed-up on a {self.device} (an estimate from the cost model): {self.speedup_estimate:.2f}x"
            + (f"; measured on {self.measured_on}: {self.measured_speedup:.2f}x" if self.measured_speedup else ""),
            self.policy.summary(),
        ]
        if self.size_ratio > 1.0 + 1e-9 or self.objective == "size":
            lines.insert(
                4, f"  weights {self.size_ratio:.2f}x smaller than float32; the search optimised {self.objective}"
            )
        held = _holdout_line(self.verification.get("holdout"), self.confidence)
        if held:
            lines.insert(3, held)
        return "\n".join(lines + _check_lines(self))

    def to_json_dict(self) -> dict[str, Any]:
        """Metadata for ``result.json`` (what the report needs besides the CSVs)."""
        return jsonable(
            {
                "metric_name": self.metric_name,
                "higher_is_better": self.higher_is_better,
                "target": self.target,
                "baseline_metric": self.baseline_metric,
                "metric": self.metric,
                "drop": self.drop,
                "drop_bound": None if math.isnan(self.drop_bound) else self.drop_bound,
                "confidence": self.confidence,
                "feasible": self.feasible,
                "budget": {
                    "max_drop": self.budget.max_drop,
                    "relative": self.budget.relative,
                    "allowed": self.allowed_drop,
                },
                "formula": self.formula,
                "device": self.device,
                "speedup_estimate": self.speedup_estimate,
                "objective": self.objective,
                "size_ratio": self.size_ratio,
                "measured_speedup": self.measured_speedup,
                "measured_on": self.measured_on,
                "pretrain_steps": self.pretrain_steps,
                "verification": self.verification,
                "training": self.training.to_dict() if self.training else None,
                "stats": self.stats,
                "n_16bit": self.n_16bit,
                "n_units": int(len(self.units)),
            }
        )

    def save(self, directory: str | os.PathLike, *, lock: bool = True) -> list[str]:
        """Write policy.json, sensitivity.csv, trials.csv, result.json, model.keras and the report, atomically.

        The files go into a temporary sibling directory that then replaces
        ``directory`` as a whole: an interrupted save leaves the previous
        result intact, and files of an earlier run are never mixed in. A second
        writer to the same directory fails at once.

        Args:
            directory: the result directory.
            lock: take the directory's lock for the save (pass False when the
                caller already holds it for the whole run, as the CLI does).

        Raises:
            OutputError: the directory cannot be written, or another run holds it.
        """
        import contextlib

        from autoprec.files import DirectoryLock, write_directory

        with DirectoryLock(directory) if lock else contextlib.nullcontext(), write_directory(directory) as tmp:
            names = _write_files(self, tmp)
        return [os.path.join(os.fspath(directory), name) for name in names]


def _write_files(result: TuneResult, directory: str) -> list[str]:
    """Write every file of a result into ``directory`` (a fresh one); return their names."""
    from autoprec.graph import SUBCLASSED, model_kind
    from autoprec.report.pages import write_report

    join = functools.partial(os.path.join, directory)
    result.policy.save(join("policy.json"))
    result.sensitivity.to_csv(join("sensitivity.csv"), index=False)
    result.trials.to_csv(join("trials.csv"), index=False)
    with open(join("result.json"), "w", encoding="utf-8") as fh:
        json.dump(result.to_json_dict(), fh, indent=2, allow_nan=False)
    names = ["policy.json", "sensitivity.csv", "trials.csv", "result.json"]
    sublayers = result.sublayers
    if len(sublayers):
        sublayers.to_csv(join("sublayers.csv"), index=False)
        names.append("sublayers.csv")
    if model_kind(result.model) == SUBCLASSED:
        logger.warning(
            "autoprec: model.keras of a subclassed model reloads with default dtypes (Keras rebuilds its layers "
            "in __init__); after loading, apply policy.json again: "
            "apply_policy(model, 'policy.json', inplace=True)."
        )
    try:
        result.model.save(join("model.keras"))
        names.append("model.keras")
    except Exception as exc:  # a subclassed model without get_config cannot be saved; the rest still is
        logger.warning("autoprec: could not save the tuned model (%s); the policy and reports are saved.", exc)
    names += [os.path.basename(p) for p in write_report(directory)]
    return names


def _check_lines(result: TuneResult) -> list[str]:
    """The summary's lines on the checks: fallbacks, a missed budget, the training check."""
    lines = []
    fallbacks = result.verification.get("fallbacks") or []
    if fallbacks:
        lines.append(f"  checks returned {len(fallbacks)} decision(s) to float32: {[f['key'] for f in fallbacks]}")
    if not result.feasible:
        lines.append(f"  NOT within the budget: {result.verification.get('why', 'the verified drop exceeds it')}")
    if result.training is not None:
        lines.append(
            f"  training check ({result.training.steps} steps): "
            f"{'passed' if result.training.passed else 'FAILED'}: {result.training.reason}"
        )
    return lines


def _holdout_line(held: dict | None, confidence: float | None) -> str:
    """The summary's line on the held-out check, or "" without one."""
    if not held:
        return ""
    bound = held.get("drop_bound")
    shown = f"{held['drop']:.4g}" + (
        f" ({confidence:.0%} bound {bound:.4g})" if bound is not None and confidence else ""
    )
    return (
        f"  held-out check on {held['samples']} samples the search never saw: drop={shown} "
        f"{'<=' if held['feasible'] else '>'} {held['allowed']:.4g}"
    )


def jsonable(value: Any) -> Any:
    """Plain JSON types, with non-finite floats as null.

    >>> jsonable({"a": np.float32(1.5), "b": [float("inf")]})
    {'a': 1.5, 'b': [None]}
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
