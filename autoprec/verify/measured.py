"""Measure policies where they will run: training-step time and metric against float32, side by side.

``tune`` ranks candidates with a cost model of the deployment device, and it
may run on another machine (a laptop CPU tuning for a GPU). :func:`measure`
confirms, or re-ranks, policies on the machine that matters: for each policy it
applies the real Keras policies, scores the metric against float32 on the same
data (the drop, its confidence bound where asked, and whether it is within a
budget), and times training steps of every variant interleaved, step by step,
so that drift on the machine hits them alike. Every row names the device its
figures came from. The CLI's ``autoprec measure model.keras --policy
policy.json --data val.npz`` runs it from a shell.

>>> import autoprec
>>> table = autoprec.measure(model, (x_val, y_val), {"tuned": "policy.json"}, budget="0.5%")  # doctest: +SKIP
>>> table[["policy", "speedup", "drop", "within_budget", "device"]]                 # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from autoprec.errors import ArgumentError, check_int
from autoprec.formats import FLOAT32

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = [
    "policy",
    "layers_16bit",
    "step_ms",
    "speedup",
    "metric",
    "drop",
    "drop_bound",
    "allowed_drop",
    "within_budget",
    "device",
]


def measure(
    model: Any,
    data: Any,
    policies: Any,
    *,
    steps: int = 20,
    metric: Any = None,
    higher_is_better: bool | None = None,
    budget: Any = None,
    confidence: float | None = None,
    batch_size: int | str = "auto",
) -> pd.DataFrame:
    """Each policy's measured training-step speed-up and metric drop against float32, on this machine.

    Args:
        model: the float32 Keras model (compiled: its loss and optimizer train the timed steps).
        data: evaluation data, as for :func:`autoprec.tune`; its batches are also the timed steps' batches.
        policies: a :class:`PrecisionPolicy`, a policy JSON path, a ``{path: policy}`` mapping, or a
            list of them, or a ``{label: policy}`` dict to name the rows.
        steps: timed training steps per variant (after two untimed warm-up steps).
        metric: the metric to score, as for ``tune`` (default: the compiled one).
        higher_is_better: the metric's direction, for a callable metric.
        budget: with one, ``within_budget`` says whether each policy's drop (its bound, with a
            ``confidence``) is within it.
        confidence: judge the drop by its one-sided upper bound at this confidence, as ``tune`` does.
        batch_size: evaluation and step batch size.

    Returns:
        A DataFrame, one row per policy after a ``float32`` row, with :data:`COLUMNS`;
        ``attrs["device"]`` names the machine, ``attrs["steps"]`` the steps timed.

    Raises:
        ArgumentError: no policy, a bad ``steps``, or a model that is not compiled.
        SchemaError, PolicyError: a policy file off-schema, or naming layers the model lacks.

    Example:
        >>> measure(model, (x, y), ["fp16.json", "bf16.json"], budget="0.5%")  # doctest: +SKIP
    """
    import pandas as pd

    from autoprec import backends
    from autoprec.budget import Budget
    from autoprec.session import open_session
    from autoprec.verify.real import verify_eval

    check_int("steps", steps, minimum=1)
    named = _named_policies(policies)
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise ArgumentError(
            f"Expected a compiled model: its loss and optimizer train the timed steps. Received {model.name!r}, "
            "which is not compiled. Call model.compile(optimizer=..., loss=...) first."
        )
    bound = Budget.get(budget) if budget is not None else None
    session = open_session(
        model,
        data,
        metric=metric,
        higher_is_better=higher_is_better,
        target="mixed_float16",
        batch_size=batch_size,
        confidence=confidence,
    )
    device = backends.device_description()
    rule = session.rule(bound) if bound is not None else None
    rows: list[dict[str, Any]] = [_row("float32", 0, session.baseline, 0.0, float("nan"), device, rule)]
    models = [_float32_copy(session)]
    for label, policy in named.items():
        names = _names_for(session, policy)
        real, ev = verify_eval(session, names)
        low = sum(v != FLOAT32 for v in names.values())
        rows.append(_row(label, low, ev.metric, ev.drop, ev.bound, device, rule, judged=ev.judged))
        models.append(real)
    seconds = _interleaved_steps(models, session.data, steps)
    for row, s in zip(rows, seconds, strict=True):
        row.update(step_ms=s * 1e3, speedup=seconds[0] / s)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs.update(device=device, steps=steps, baseline=session.baseline, metric=session.metric.name)
    return frame


def _row(
    label: str, low: int, value: float, drop: float, bound: float, device: str, rule: Any, *, judged: float = 0.0
) -> dict[str, Any]:
    return {
        "policy": label,
        "layers_16bit": low,
        "metric": value,
        "drop": drop,
        "drop_bound": None if np.isnan(bound) else bound,
        "allowed_drop": None if rule is None else rule.allowed,
        "within_budget": None if rule is None else bool(rule.feasible(judged)),
        "device": device,
    }


def _named_policies(policies: Any) -> dict[str, Any]:
    """``{label: policy}`` from one policy, a list of them, or a labelled dict."""
    from autoprec.policy import PrecisionPolicy

    if isinstance(policies, Mapping) and not isinstance(policies, PrecisionPolicy):
        values = list(policies.values())
        if values and all(isinstance(v, str) and not _is_path(v) for v in values):
            return {"policy": policies}  # one {layer path: policy name} mapping
        named = {str(k): v for k, v in policies.items()}
    elif isinstance(policies, (list, tuple)):
        named = {_label(p, i): p for i, p in enumerate(policies)}
    else:
        named = {_label(policies, 0): policies}
    if not named:
        raise ArgumentError(
            "Expected at least one policy to measure: a PrecisionPolicy, a policy JSON path, or a list of them. "
            "Received none."
        )
    return named


def _is_path(value: str) -> bool:
    return value.endswith(".json") or os.sep in value


def _label(policy: Any, index: int) -> str:
    if isinstance(policy, (str, os.PathLike)):
        return os.path.basename(os.fspath(policy))
    return f"policy {index + 1}"


def _names_for(session: Any, policy: Any) -> dict[str, str]:
    """``{path: policy name}`` for the session's model, read (a JSON path is schema-checked) and matched to it."""
    from autoprec.policy import PrecisionPolicy

    return PrecisionPolicy.get(policy).for_graph(session.graph)


def _float32_copy(session: Any) -> Any:
    from autoprec.apply import apply_policy

    return apply_policy(session.model, {}, graph=session.graph)


def _interleaved_steps(models: list, data: Any, steps: int) -> list[float]:
    """Median seconds per ``train_on_batch`` of each model, timed round-robin after two warm-up steps."""
    batches: list = []
    while len(batches) < steps + 2:
        batches.extend(data.batches())
    times: list[list[float]] = [[] for _ in models]
    for i, (x, y) in enumerate(batches[: steps + 2]):
        for k, m in enumerate(models):
            started = time.perf_counter()
            out = m.train_on_batch(x, y)
            float(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))  # waits for the device
            if i >= 2:
                times[k].append(time.perf_counter() - started)
    return [float(np.median(t)) for t in times]
