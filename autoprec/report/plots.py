"""The report's charts: one plain-data function and one drawing function per chart, as in ``optuna.visualization``.

Each ``*_data`` function turns a saved result into a small dict of lists
and numbers (tested on its own); each ``draw_*`` function takes that dict
and a path and writes a PNG with matplotlib, imported only here.

>>> data = {"paths": ["a", "b"], "decisions": ["float32", "mixed_float16"]}
>>> draw_precision_strip(data, "strip.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

from autoprec.formats import DEFAULT_LOSS_SCALE, MIXED_FLOAT16, split
from autoprec.formats import get as get_format
from autoprec.profiling.stats import ACT_ABSMAX, GRAD_ABSMAX

COLORS = {
    "float32": "#4c72b0",
    "mixed_float16": "#dd8452",
    "mixed_bfloat16": "#55a868",
    "float64": "#8172b3",
    "follows": "#bbbbbb",
    "int8": "#c44e52",
    "int4": "#937860",
    "float8": "#da8bc3",
}


def _decision_color(decision: Any) -> str:
    text = decision if isinstance(decision, str) else "follows"
    text = "follows" if text.startswith("follows") else split(text)[0] or text.split("/", 1)[0]
    return COLORS.get(text, "#999999")


def _legend_key(decision: Any) -> str:
    text = decision if isinstance(decision, str) else "follows"
    return "follows" if text.startswith("follows") else text


# --- plain data -------------------------------------------------------------


def strip_data(saved: Any) -> dict:
    """Each layer's decision, input to output."""
    frame = saved.sensitivity.sort_values("order") if "order" in saved.sensitivity else saved.sensitivity
    return {"paths": list(frame["path"]), "decisions": [_legend_key(d) for d in frame["decision"]]}


def sensitivity_data(saved: Any) -> dict:
    """The decisions' most telling measure that is not zero everywhere: metric drop, else output error, else score."""
    frame = saved.sensitivity
    frame = (
        frame[frame["kind"] == "decision"]
        if "kind" in frame
        else frame[frame["decision_unit"] & (frame["pinned"] == "")]
    )
    column = next(
        (c for c in ("metric_drop", "output_error", "score") if c in frame and (frame[c].fillna(0) > 0).any()), "score"
    )
    frame = frame.sort_values(column, ascending=False, na_position="last") if column in frame else frame
    raw = frame[column] if column in frame else [math.nan] * len(frame)
    values = [float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else math.nan for v in raw]
    return {
        "paths": list(frame["path"]),
        "values": values,
        "decisions": list(frame["decision"]),
        "measure": column,
        "allowed": float(saved.meta.get("budget", {}).get("allowed", math.nan)),
    }


def ranges_data(saved: Any) -> dict:
    """Largest activation and gradient magnitudes per layer against the format's limits."""
    frame = saved.sensitivity.sort_values("order") if "order" in saved.sensitivity else saved.sensitivity
    fmt = get_format(saved.meta.get("target", MIXED_FLOAT16))
    cols = {c: [float(v) for v in frame[c]] if c in frame else [] for c in (ACT_ABSMAX, GRAD_ABSMAX)}
    return {
        "paths": list(frame["path"]),
        "act": cols[ACT_ABSMAX],
        "grad": cols[GRAD_ABSMAX],
        "grad_scaled": [g * DEFAULT_LOSS_SCALE for g in cols[GRAD_ABSMAX]],
        "scale": DEFAULT_LOSS_SCALE,
        "limits": {
            "largest finite": fmt.max_finite,
            "smallest normal": fmt.min_normal,
            "smallest subnormal": fmt.min_subnormal,
        },
        "format": fmt.short,
    }


def _evaluated(trials: Any) -> Any:
    """The trials that hold a measurement: COMPLETE (within budget) and PRUNED over budget, not the skipped markers."""
    if "evaluated" in trials:
        return trials[trials["evaluated"].fillna(False).astype(bool)]
    return trials[trials["state"] == "COMPLETE"]  # a report saved before 0.2


def history_data(saved: Any) -> dict:
    """The best feasible estimated speed-up after each trial."""
    trials = _evaluated(saved.trials).sort_values("trial")
    best, xs, ys = 1.0, [], []
    for row in trials.to_dict("records"):
        if _true(row.get("feasible")) and row.get("speedup_estimate") == row.get("speedup_estimate"):
            best = max(best, float(row["speedup_estimate"]))
        xs.append(int(row["trial"]))
        ys.append(best)
    return {"trial": xs, "best_speedup": ys}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def tradeoff_data(saved: Any) -> dict:
    """Every evaluated trial: what the search optimised (speed-up or weight-size ratio) against drop, and the budget."""
    trials = _evaluated(saved.trials)
    drops = [float(v) if v == v and v is not None else math.nan for v in trials["drop"]]
    keep = [i for i, d in enumerate(drops) if d < 1e8]
    meta = saved.meta
    size = meta.get("objective") == "size" and "size_ratio" in trials
    xs = list(trials["size_ratio"] if size else trials["speedup_estimate"])
    feasible = list(trials["feasible"])
    rejected = list(trials["rejected"]) if "rejected" in trials else [False] * len(trials)
    chosen_x = float(meta.get("size_ratio", 1.0)) if size else float(meta["speedup_estimate"])
    bounds = list(trials["drop_bound"]) if "drop_bound" in trials else [math.nan] * len(trials)
    return {
        "speedup": [float(xs[i]) for i in keep],
        "drop": [drops[i] for i in keep],
        "bound": [_number(bounds[i]) for i in keep],  # the drop's upper confidence bound (NaN: none asked for)
        "confidence": meta.get("confidence"),
        "feasible": [_true(feasible[i]) for i in keep],
        "rejected": [_true(rejected[i]) for i in keep],
        "allowed": float(meta["budget"]["allowed"]),
        "chosen": (chosen_x, float(meta["drop"])),
        "metric": meta.get("metric_name", "metric"),
        "over_range": len(drops) - len(keep),
        "x_label": "weights smaller than float32 (x)" if size else "estimated speed-up (x)",
    }


def training_data(saved: Any) -> dict | None:
    """The training check's losses and loss-scale history, if it ran."""
    training = saved.meta.get("training")
    if not training:
        return None
    return {"float32": training["float32_losses"], "tuned": training["tuned_losses"], "scale": training["loss_scale"]}


def timeline_data(saved: Any) -> dict | None:
    """The policy changes of an adaptive training run, per layer, with the loss and loss scale at each check.

    ``lanes`` holds, for each layer that changed, its ``(start, end, policy)``
    spans over the steps; ``None`` when the directory holds no adaptive history.

    >>> import pandas as pd
    >>> events = pd.DataFrame({"step": [98], "layer": ["d2"], "direction": ["promote"], "before": ["mixed_float16"],
    ...                        "after": ["float32"], "reason": ["OVERFLOW"]})
    >>> checks = pd.DataFrame({"step": [98, 200], "loss": [float("inf"), 0.01], "loss_scale": [32768.0, 32768.0]})
    >>> class Saved: adaptive = {"events": events, "checks": checks}
    >>> timeline_data(Saved())["lanes"]
    {'d2': [(0, 98, 'mixed_float16'), (98, 200, 'float32')]}
    """
    adaptive = getattr(saved, "adaptive", None)
    if not adaptive:
        return None
    events = adaptive["events"].sort_values("step", kind="stable")
    checks = adaptive["checks"].sort_values("step", kind="stable")
    last = int(max([1, *checks["step"], *events["step"]]))
    lanes: dict[str, list[tuple[int, int, str]]] = {}
    for row in events.to_dict("records"):
        spans = lanes.setdefault(str(row["layer"]), [(0, last, str(row["before"]))])
        start, _, policy = spans.pop()
        spans += [(start, int(row["step"]), policy), (int(row["step"]), last, str(row["after"]))]
    scale = [_finite(v) for v in checks["loss_scale"]] if "loss_scale" in checks else []
    # a history without the trigger column marks no step: one "" per check keeps the columns aligned
    triggers = list(checks["trigger"]) if "trigger" in checks else [""] * len(checks)
    return {
        "lanes": lanes,
        "last_step": last,
        "steps": [int(s) for s in checks["step"]],
        "nonfinite_steps": [int(s) for s, t in zip(checks["step"], triggers, strict=True) if t == "nonfinite_loss"],
        "loss": [_finite(v) for v in checks["loss"]],
        "loss_scale": scale if any(v == v for v in scale) else [],
        "events": [
            {
                "step": int(r["step"]),
                "layer": str(r["layer"]),
                "direction": str(r["direction"]),
                "reason": str(r["reason"]),
            }
            for r in events.to_dict("records")
        ],
    }


def _true(value: Any) -> bool:
    return (
        value is True
        or (isinstance(value, str) and value.lower() == "true")
        or (not isinstance(value, str) and value == value and value is not None and bool(value))
    )


# --- drawing ----------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs: Any):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), **kwargs)


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(ax: Any, decisions: list, **kwargs: Any) -> None:
    from matplotlib.patches import Patch

    used = sorted(set(decisions), key=lambda d: list(COLORS).index(d) if d in COLORS else len(COLORS))
    ax.legend(handles=[Patch(color=_decision_color(d), label=d) for d in used], **kwargs)


def draw_precision_strip(data: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = _figure(10, 1.9)
    n = len(data["paths"])
    for i, d in enumerate(data["decisions"]):
        ax.add_patch(plt.Rectangle((i, 0), 1, 1, color=_decision_color(d)))
    ax.set_xlim(0, max(n, 1))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("layer index, input to output")
    ax.set_title("Precision of each layer")
    _legend(ax, data["decisions"], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, path)


def draw_sensitivity(data: dict, path: str) -> None:
    values = [v if v == v else 0.0 for v in data["values"]]
    # Zeros and layers cleared with their group sit at the left edge: below the budget line, never right of it.
    allowed = data["allowed"] if data["allowed"] == data["allowed"] and data["allowed"] > 0 else math.inf
    floor = min(min([v for v in values if v > 0] or [1e-6]), allowed) / 10
    shown = [min(max(v, floor), 1e6) for v in values]
    n = len(shown)
    fig, ax = _figure(10, max(3.0, 0.22 * n + 1.2))
    ax.barh(range(n), shown, color=[_decision_color(d) for d in data["decisions"]])
    ax.set_yticks(range(n))
    ax.set_yticklabels(data["paths"], fontsize=7 if n > 30 else 9)
    ax.invert_yaxis()
    ax.set_xscale("log")
    label = {
        "metric_drop": "metric drop with only this layer in 16-bit (log)",
        "output_error": "output error (relative L2) with only this layer in 16-bit (log)",
    }.get(data["measure"], "first-order score (log)")
    if any(v <= 0 for v in values):
        label += "; a zero (or a layer cleared with its group) is drawn at the left edge"
    ax.set_xlabel(label)
    if data["measure"] == "metric_drop" and data["allowed"] == data["allowed"] and data["allowed"] > 0:
        ax.axvline(data["allowed"], color="black", linestyle="--", linewidth=1, label="budget")
    _legend(ax, [_legend_key(d) for d in data["decisions"]], loc="lower right", fontsize=8)
    ax.set_title(
        "Per-layer sensitivity, most sensitive first"
        + (" (no layer drops the metric alone)" if data["measure"] != "metric_drop" else "")
    )
    _save(fig, path)


def _finite(value: Any) -> float:
    """``value`` as a float, or NaN when it is missing or not finite."""
    return float(value) if value is not None and value == value and math.isfinite(float(value)) else math.nan


def _positive(values: list) -> list[float]:
    """The values a log axis can draw; NaN (a gap) for the rest."""
    return [v if v and v > 0 and math.isfinite(v) else float("nan") for v in values]


def draw_ranges(data: dict, path: str) -> None:
    fig, ax = _figure(10, 4.2)
    xs = range(len(data["paths"]))
    ax.plot(xs, _positive(data["act"]), "o-", markersize=3, label="activations |x| max")
    ax.plot(xs, _positive(data["grad"]), "s-", markersize=3, label="gradients |g| max")
    ax.plot(xs, _positive(data["grad_scaled"]), "^-", markersize=3, label=f"gradients x {data['scale']:g} (loss scale)")
    for (label, value), style in zip(data["limits"].items(), ("-", "--", ":"), strict=True):
        ax.axhline(value, color="red", linestyle=style, linewidth=1, label=f"{data['format']} {label} ({value:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("layer index, input to output")
    ax.set_ylabel("largest magnitude (log)")
    ax.set_title(f"Activation and gradient magnitudes against {data['format']} limits")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def draw_history(data: dict, path: str) -> None:
    fig, ax = _figure(7, 3.5)
    ax.step(data["trial"], data["best_speedup"], where="post", marker="o", markersize=4)
    if len(data["trial"]) <= 1:
        ax.set_xlim(-1, 1)
        ax.set_xticks(data["trial"] or [0])
    ax.set_xlabel("trial")
    ax.set_ylabel("best feasible speed-up (estimated, x)")
    ax.set_title("Search history")
    _save(fig, path)


def draw_tradeoff(data: dict, path: str) -> None:
    fig, ax = _figure(7, 4)
    groups = (
        ("over budget", "#c44e52", lambda i: not data["feasible"][i] and not data["rejected"][i]),
        ("over budget, stopped early (drop at least)", "#e39c9e", lambda i: data["rejected"][i]),
        ("within budget", "#55a868", lambda i: data["feasible"][i]),
    )
    bound = data.get("bound") or [math.nan] * len(data["speedup"])
    for label, color, member in groups:
        idx = [i for i in range(len(data["speedup"])) if member(i)]
        if idx:
            ax.scatter(
                [data["speedup"][i] for i in idx], [max(data["drop"][i], 1e-6) for i in idx], c=color, s=14, label=label
            )
            bounded = [i for i in idx if math.isfinite(bound[i])]
            if bounded:  # a bar from the measured drop up to its upper confidence bound: what the budget judged
                low = [max(data["drop"][i], 1e-6) for i in bounded]
                high = [max(bound[i], 1e-6) for i in bounded]
                ax.errorbar(
                    [data["speedup"][i] for i in bounded],
                    low,
                    yerr=[[0.0] * len(bounded), [max(h - lo, 0.0) for h, lo in zip(high, low, strict=True)]],
                    fmt="none",
                    ecolor=color,
                    elinewidth=0.8,
                    capsize=2,
                )
    ax.axhline(max(data["allowed"], 1e-6), color="black", linestyle="--", linewidth=1, label="budget")
    ax.scatter(
        [data["chosen"][0]],
        [max(data["chosen"][1], 1e-6)],
        marker="*",
        s=220,
        c="gold",
        edgecolors="black",
        label="chosen",
        zorder=5,
    )
    ax.set_yscale("log")
    ax.set_xlabel(data.get("x_label", "estimated speed-up (x)"))
    conf = data.get("confidence")
    bars = f"; bars up to the {conf:.0%} upper bound" if conf and any(map(math.isfinite, bound)) else ""
    ax.set_ylabel(f"{data['metric']} drop (log; 0 shown at 1e-6{bars})")
    ax.set_title(
        "Every trial: drop against speed-up"
        + (f" ({data['over_range']} with non-finite outputs not shown)" if data.get("over_range") else "")
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def draw_training(data: dict, path: str) -> None:
    fig, (a1, a2) = _figure(10, 3.5, ncols=2)
    a1.plot(data["float32"], label="float32")
    a1.plot(data["tuned"], label="tuned")
    a1.set_xlabel("training step")
    a1.set_ylabel("loss")
    a1.set_title("Training check: loss")
    a1.legend()
    if data["scale"]:
        a2.plot(data["scale"])
        a2.set_yscale("log", base=2)
    a2.set_xlabel("training step")
    a2.set_ylabel("loss scale (log2)")
    a2.set_title("Loss-scale history" if data["scale"] else "No loss scale (no float16 layer)")
    _save(fig, path)


def draw_timeline(data: dict, path: str) -> None:
    from matplotlib.patches import Patch

    lanes = data["lanes"]
    fig, (top, bottom) = _figure(
        10, 2.6 + 0.3 * len(lanes), nrows=2, sharex=True, gridspec_kw={"height_ratios": [max(1, len(lanes)), 2]}
    )
    for i, spans in enumerate(lanes.values()):
        top.broken_barh(
            [(s, max(e - s, 0.5)) for s, e, _ in spans],
            (i - 0.4, 0.8),
            facecolors=[_decision_color(p) for _, _, p in spans],
        )
    top.set_yticks(range(len(lanes)))
    top.set_yticklabels(list(lanes), fontsize=8)
    top.invert_yaxis()
    used = sorted(
        {p for spans in lanes.values() for _, _, p in spans}, key=lambda d: list(COLORS).index(d) if d in COLORS else 99
    )
    top.legend(
        handles=[Patch(color=_decision_color(p), label=p) for p in used],
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
    )
    n = len(data["events"])
    top.set_title(
        f"Policy changes during training ({n} change{'s' if n != 1 else ''})"
        if lanes
        else "No policy change during training"
    )
    _draw_loss_lane(bottom, data)
    for event in data["events"]:
        for ax in (top, bottom):
            ax.axvline(
                event["step"],
                color="#c44e52" if event["direction"] == "promote" else "#55a868",
                linestyle="--",
                linewidth=0.8,
            )
    bottom.set_xlim(0, data["last_step"])
    _save(fig, path)


def _draw_loss_lane(bottom: Any, data: dict) -> None:
    """The timeline's lower lane: the logged loss (log scale), non-finite steps, and the loss scale."""
    loss = [v if v > 0 else math.nan for v in data["loss"]]
    bottom.plot(data["steps"], loss, "o-", markersize=3, color="black", label="loss (logged)")
    if any(v == v for v in loss):
        bottom.set_yscale("log")
    for step in data["nonfinite_steps"]:
        bottom.annotate(
            "non-finite loss",
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            color="#c44e52",
            fontsize=7,
            ha="right",
            va="top",
        )
    bottom.set_xlabel("training step")
    bottom.set_ylabel("loss")
    if data["loss_scale"]:
        twin = bottom.twinx()
        twin.step(data["steps"], data["loss_scale"], where="post", color="#dd8452", label="loss scale")
        twin.set_yscale("log", base=2)
        twin.set_ylabel("loss scale (log2)")


CHARTS = {
    "precision_strip": (strip_data, draw_precision_strip),
    "sensitivity": (sensitivity_data, draw_sensitivity),
    "ranges": (ranges_data, draw_ranges),
    "history": (history_data, draw_history),
    "tradeoff": (tradeoff_data, draw_tradeoff),
    "training": (training_data, draw_training),
    "timeline": (timeline_data, draw_timeline),
}
