"""The options of :func:`autoprec.tune`: their defaults and their validation, before any model work.

:meth:`TuneOptions.create` checks every argument that can be checked
without the model and the data (the budget, the formats, counts, the
storage URL), so that a mistake costs the user a second, not a profile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from autoprec.budget import Budget
from autoprec.errors import ArgumentError, DataError, check_choice, check_int, describe
from autoprec.formats import (
    FLOAT32,
    LOW_PRECISION,
    MIXED_BFLOAT16,
    MIXED_FLOAT16,
    QUANTIZED_MODES,
    quantized_name,
    resolve_target,
)
from autoprec.search.cost import Device, check_device
from autoprec.search.space import GRANULARITIES
from autoprec.verify.bounds import check_confidence
from autoprec.verify.holdout import check_holdout

VERIFY_MODES = ("eval", "train")
OBJECTIVES = ("speed", "size")
COSTS = ("estimate", "measured")


@dataclass(frozen=True)
class TuneOptions:
    """Every option of :func:`autoprec.tune`, validated. Build it with :meth:`create`.

    Each field is a keyword of ``tune`` of the same name and default, documented
    there once (``candidates`` becomes ``choices`` with ``float32`` first).

    Example:
        >>> opts = TuneOptions.create("0.5%", target="mixed_bfloat16", n_trials=20)
        >>> opts.choices, opts.budget.max_drop
        (('float32', 'mixed_bfloat16'), 0.005)
    """

    budget: Budget
    target: str
    target_why: str
    choices: tuple[str, ...]
    metric: Any = None
    higher_is_better: bool | None = None
    granularity: str = "layer"
    keep_float32: Any = ()
    force_16bit: Any = ()
    cost: str = "estimate"
    device: str | Device | None = None
    n_trials: int = 60
    timeout: float | None = None
    seed: int = 0
    storage: Any = None
    study_name: str | None = None
    verify: str = "eval"
    train_data: Any = field(default=None, repr=False)
    steps: int = 50
    pretrain_steps: int | None = None
    max_fallbacks: int = 8
    batch_size: int | str = "auto"
    profile_batch_size: int | str = "auto"
    nonfinite_inputs: str = "raise"
    verbose: int = 1
    search_only: bool = False
    objective: str = "speed"
    # "auto": 0.95 where the data resolves the budget at it (tuner._check_resolution settles it), else the drop.
    confidence: float | str | None = "auto"
    # Opt-in: the bound on the search's data already holds the budget on unseen data (reports/benchmarks.md §11),
    # while a held-out fifth judged by the same rule is a coarse, noisy check that costs share (tests/test_weightless).
    holdout: Any = field(default=None, repr=False)  # "auto", a fraction, or data
    calibration_data: Any = field(default=None, repr=False)
    inplace: bool = False

    @property
    def quantize_base(self) -> str:
        """The float policy quantized candidates compute in: the target when offered, else float32."""
        return self.target if self.target in self.choices else FLOAT32

    @property
    def formats(self) -> tuple[str, ...]:
        """The engine's formats: the 16-bit ones, the Keras names of the quantized ones, and the target.

        The target is always among them: the profile measures sensitivity in it,
        even where only quantized candidates (over float32) are searched.
        """
        out = tuple(
            quantized_name(c, self.quantize_base) if c in QUANTIZED_MODES else c for c in self.choices if c != FLOAT32
        )
        return out if self.target in out else (*out, self.target)

    @classmethod
    def create(cls, budget: Any, *, target: str | None = None, candidates: Any = None, **options: Any) -> TuneOptions:
        """Validate the arguments of :func:`autoprec.tune` (documented there), cheapest first.

        Nothing here reads the model or the data, and nothing starts TensorFlow
        work: a bad option fails in well under a second.

        Raises:
            BudgetError: the budget does not parse.
            ArgumentError: any other argument has the wrong type or value, or the storage URL cannot be opened.
            DataError: training data is missing for an option that needs it.
        """
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            valid = sorted({f.name for f in dataclasses.fields(cls)} - {"choices", "target_why"} | {"candidates"})
            raise ArgumentError(f"Expected options of tune among {valid}. Received unknown option(s): {unknown}.")
        budget = Budget.get(budget)
        target, why, choices = _target_and_candidates(target, candidates)
        options["objective"] = _check_objective(options.get("objective"), choices, options.get("verify", "eval"))
        _check_values(options)
        _check_training_data(options)
        _check_storage(options)
        return cls(budget=budget, target=target, target_why=why, choices=choices, **options)


def _check_values(options: dict[str, Any]) -> None:
    """Choices, counts, the confidence, the held-out part, batch sizes, the timeout and the device, in place."""
    from autoprec.data import NONFINITE_MODES, check_batch_size

    for name, choices_ in (
        ("granularity", GRANULARITIES),
        ("verify", VERIFY_MODES),
        ("cost", COSTS),
        ("nonfinite_inputs", NONFINITE_MODES),
    ):
        if name in options:
            check_choice(name, options[name], choices_)
    for name, minimum in (("n_trials", 1), ("seed", 0), ("steps", 2), ("max_fallbacks", 0), ("verbose", 0)):
        if name in options:
            check_int(name, options[name], minimum)
    check_int("pretrain_steps", options.get("pretrain_steps"), 1, allow_none=True)
    if "confidence" in options:
        options["confidence"] = check_confidence(options["confidence"])
    if "holdout" in options:
        options["holdout"] = check_holdout(options["holdout"])
    for name in ("batch_size", "profile_batch_size"):
        options[name] = check_batch_size(options.get(name, "auto"), name)
    timeout = options.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ArgumentError(
            f"Expected timeout to be a number of seconds > 0, or None. Received: timeout={describe(timeout)}."
        )
    check_device(options.get("device"))  # validated here (without reading this machine), resolved per run
    for name in ("inplace", "search_only"):
        if not isinstance(options.get(name, False), bool):
            raise ArgumentError(f"Expected {name} to be True or False. Received: {name}={describe(options[name])}.")


def _check_training_data(options: dict[str, Any]) -> None:
    if options.get("verify") == "train" and options.get("train_data") is None:
        raise DataError("Expected train_data=(x, y) with verify='train': the training check fine-tunes on it.")
    if options.get("pretrain_steps") is not None and options.get("train_data") is None:
        raise DataError("Expected train_data=(x, y) with pretrain_steps: the float32 copy is pretrained on it.")


def _check_storage(options: dict[str, Any]) -> None:
    from autoprec.search.study import check_storage

    only, storage = options.get("search_only", False), options.get("storage")
    check_storage(storage)  # a bad URL fails here, in well under a second, before any model work
    if only and storage is None:
        raise ArgumentError(
            f"Expected search_only=True with a shared storage= and study_name=, or False. Received: "
            f"search_only={describe(only)}, storage={describe(storage)}."
        )


def _target_and_candidates(target: Any, candidates: Any) -> tuple[str, str, tuple[str, ...]]:
    """``(target, why, choices)``: ``candidates`` defines the formats; ``target`` says which 16-bit one is preferred.

    Without ``candidates`` the choice is float32 or the target (``mixed_float16``
    by default). With them, an unnamed target is the 16-bit format they offer
    (float16 when they offer both), and a named one must be among them. When
    they offer no 16-bit format (float32 and quantized modes), quantized layers
    compute in float32 and the profile ranks layers in bfloat16.

    >>> _target_and_candidates(None, ("float32", "mixed_bfloat16", "int8"))
    ('mixed_bfloat16', 'the 16-bit format among candidates', ('float32', 'mixed_bfloat16', 'int8'))
    """
    if candidates is None:
        target, why = resolve_target(MIXED_FLOAT16 if target is None else target)
        return target, why, (FLOAT32, target)
    choices = tuple(candidates) if isinstance(candidates, (list, tuple)) else None
    valid = (FLOAT32, *LOW_PRECISION, *QUANTIZED_MODES)
    if (
        choices is None
        or FLOAT32 not in choices
        or len(set(choices)) != len(choices)
        or len(choices) < 2
        or any(not isinstance(c, str) or c not in valid for c in choices)
    ):
        raise ArgumentError(
            f"Expected candidates to be a list holding 'float32' and at least one of {list(valid[1:])}, each "
            f"once. Received: candidates={describe(candidates)}. For example candidates=('float32', "
            "'mixed_bfloat16', 'int8')."
        )
    offered = [c for c in choices if c in LOW_PRECISION]
    if target is None:
        if not offered:
            return MIXED_BFLOAT16, "ranking only: candidates offer no 16-bit format", choices
        preferred = MIXED_FLOAT16 if MIXED_FLOAT16 in offered else offered[0]
        return preferred, "the 16-bit format among candidates", choices
    target, why = resolve_target(target)
    if target not in choices:
        raise ArgumentError(
            f"Expected target to be one of the 16-bit formats among candidates {offered}. Received: "
            f"target={target!r} with candidates={list(choices)}. candidates defines the formats and "
            f"target only picks the preferred one: add {target!r} to candidates, or leave target out."
        )
    return target, why, choices


def _check_objective(objective: Any, choices: tuple[str, ...], verify: Any) -> str:
    """``speed`` or ``size``; by default size when integer candidates are offered (their CPU gain is size)."""
    integer = [c for c in choices if c in ("int8", "int4")]
    if objective is None:
        objective = "size" if integer else "speed"
    check_choice("objective", objective, OBJECTIVES)
    if integer and verify == "train":
        raise ArgumentError(
            f"Expected float candidates with verify='train'. Received candidates {integer}: int8 and int4 are "
            "post-training formats for inference, which Keras does not train. Use verify='eval', or "
            "'float8', the format Keras trains in."
        )
    return objective
