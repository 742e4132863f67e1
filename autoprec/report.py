"""Reports a person would rather look at than read: Markdown, self-contained HTML, PNG plots.

Everything is regenerated from the files :meth:`TuneResult.save` writes
(``result.json``, ``sensitivity.csv``, ``trials.csv``, ``policy.json``), so
``autoprec report DIR`` works on a directory alone. As in
``optuna.visualization``, each plot is computed as plain data first
(``*_data`` functions, tested on their own) and drawn by a separate
matplotlib function. Every string that comes from the model is escaped.

>>> paths = write_report("reports/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from autoprec import reasons
from autoprec.engine import LIMITS
from autoprec.errors import DataError
from autoprec.policy import FLOAT32, MIXED_FLOAT16

COLORS = {"float32": "#4c72b0", "mixed_float16": "#dd8452", "mixed_bfloat16": "#55a868", "float64": "#8172b3", "follows": "#bbbbbb"}
PLOTS = ("precision_strip", "sensitivity", "ranges", "history", "tradeoff", "training")


@dataclass(frozen=True)
class Saved:
    """A saved result: its metadata and tables."""

    meta: dict
    sensitivity: Any
    trials: Any
    directory: str


def load_saved(directory: str | os.PathLike) -> Saved:
    """Read ``result.json``, ``sensitivity.csv`` and ``trials.csv`` from a result directory."""
    import pandas as pd

    directory = os.fspath(directory)
    need = ["result.json", "sensitivity.csv", "trials.csv"]
    missing = [n for n in need if not os.path.exists(os.path.join(directory, n))]
    if missing:
        raise DataError(
            f"Expected a directory written by TuneResult.save (or `autoprec tune -o DIR`). Received {directory!r}, "
            f"which lacks {missing}."
        )
    try:
        with open(os.path.join(directory, "result.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"Expected valid JSON in {directory}/result.json: {exc}.") from None
    if not isinstance(meta, dict) or "baseline_metric" not in meta:
        raise DataError(f"Expected {directory}/result.json to hold a tune result (baseline_metric, metric, budget...).")
    sensitivity = pd.read_csv(os.path.join(directory, "sensitivity.csv"), keep_default_na=True)
    trials = pd.read_csv(os.path.join(directory, "trials.csv"))
    sensitivity["pinned"] = sensitivity["pinned"].fillna("")
    return Saved(meta, sensitivity, trials, directory)


# ---------------------------------------------------------------------------
# Reasons in words


def _fmt_name(target: str) -> str:
    return "float16" if target == MIXED_FLOAT16 else "bfloat16"


def _drop_words(meta: dict, drop: float) -> str:
    name = meta.get("metric_name", "metric")
    if "acc" in name.lower():
        return f"drops {name} by {drop * 100:.2g} points"
    verb = "drops" if meta.get("higher_is_better", True) else "raises"
    return f"{verb} {name} by {abs(drop):.3g}"


def _value(row: Any, column: str) -> float:
    try:
        value = float(row.get(column, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value


def reason_sentence(row: Any, meta: dict) -> str:
    """The decision for one layer and why, in words.

    >>> meta = {"target": "mixed_float16", "metric_name": "accuracy"}
    >>> reason_sentence({"decision": "float32", "reason": "METRIC_DROP", "metric_drop": 0.046, "act_overflow": 0.031}, meta)
    'float32: alone in float16 it drops accuracy by 4.6 points; 3.1% of its outputs exceed 65504'
    """
    decision, reason = row.get("decision", FLOAT32), row.get("reason", "")
    fmt = _fmt_name(meta.get("target", MIXED_FLOAT16))
    limits = LIMITS[meta.get("target", MIXED_FLOAT16)]
    drop = _value(row, "metric_drop")
    facts = []
    if not math.isnan(drop) and drop > 0:
        facts.append(f"alone in {fmt} it {_drop_words(meta, drop)}")
    overflow = _value(row, "act_overflow")
    if overflow > 0:
        facts.append(f"{overflow:.2g}% of its outputs exceed {limits.max_finite:g}".replace(f"{overflow:.2g}%", f"{overflow * 100:.2g}%"))
    flush = _value(row, "act_flush")
    if flush > 0.01:
        facts.append(f"{flush * 100:.2g}% of its nonzero outputs flush to zero in {fmt}")
    if _value(row, "nonfinite_outputs") > 0:
        facts.append(f"the model's outputs turn non-finite when it runs in {fmt}")
    share = _value(row, "flops_share")
    if reason == reasons.PINNED_OUTPUT:
        return f"{decision}: it produces a model output, and outputs stay float32"
    if reason == reasons.PINNED_SOFTMAX:
        return f"{decision}: a softmax/sigmoid feeding the output; Keras computes it in the layer's dtype, so it stays float32"
    if reason == reasons.PINNED_USER:
        return f"{decision}: pinned by keep_float32"
    if reason == reasons.PINNED_DTYPE:
        return f"{decision}: not a float32 layer to begin with; left as it was"
    if reason == reasons.FOLLOWS:
        return f"{decision}: no weights; it takes the precision of the layers that feed it"
    if decision != FLOAT32:
        head = f"{decision}: " + ("forced by force_16bit; " if reason == reasons.FORCED_16BIT else "")
        effect = facts[0] + ", within the budget" if facts else "no measurable drop"
        return head + effect + (f"; {share * 100:.2g}% of the model's FLOPs" if not math.isnan(share) else "")
    if reason == reasons.VERIFY_FALLBACK:
        facts.insert(0, "returned to float32 when the real Keras policies missed the budget")
    elif reason == reasons.TRAIN_FALLBACK:
        failed = (meta.get("verification") or {}).get("train_fallbacks") or []
        reason_text = next((f["reason"] for f in failed if f.get("path") == row.get("path")), "")
        facts.insert(0, "returned to float32 by the loss-scaled training check" + (f" (with it in 16-bit: {reason_text})" if reason_text else ""))
    elif reason == reasons.NO_GAIN:
        facts.append("no measurable drop alone, but 16-bit here does not pay: the casts at its boundaries cost more than it saves")
    elif reason == reasons.METRIC_DROP and facts and not math.isnan(drop) and drop <= float(meta.get("budget", {}).get("allowed", math.inf)):
        facts.append("together with the other 16-bit layers it would exceed the budget")
    return f"{decision}: " + "; ".join(facts or ["kept float32 by the search"])


# ---------------------------------------------------------------------------
# Plot data (plain records) and rendering (matplotlib)


def strip_data(saved: Saved) -> dict:
    frame = saved.sensitivity.sort_values("order") if "order" in saved.sensitivity else saved.sensitivity
    return {"paths": list(frame["path"]), "decisions": [d if isinstance(d, str) else "follows" for d in frame["decision"]]}


def sensitivity_data(saved: Saved) -> dict:
    frame = saved.sensitivity[saved.sensitivity["decision_unit"] & (saved.sensitivity["pinned"] == "")]
    # The most telling measure that is not zero everywhere: metric drop, else output error, else score.
    column = next((c for c in ("metric_drop", "output_error", "score") if c in frame and (frame[c].fillna(0) > 0).any()), "score")
    frame = frame.sort_values(column, ascending=False, na_position="last")
    values = [float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else (math.inf if v == math.inf else math.nan) for v in frame[column]]
    return {"paths": list(frame["path"]), "values": values, "decisions": list(frame["decision"]), "measure": column,
            "allowed": float(saved.meta.get("budget", {}).get("allowed", math.nan))}


def ranges_data(saved: Saved) -> dict:
    frame = saved.sensitivity.sort_values("order") if "order" in saved.sensitivity else saved.sensitivity
    target = saved.meta.get("target", MIXED_FLOAT16)
    limits = LIMITS[target]
    cols = {c: [float(v) for v in frame[c]] if c in frame else [] for c in ("act_absmax", "grad_absmax")}
    scale = 2.0**15
    return {"paths": list(frame["path"]), "act": cols["act_absmax"], "grad": cols["grad_absmax"],
            "grad_scaled": [g * scale for g in cols["grad_absmax"]], "scale": scale,
            "limits": {"largest finite": limits.max_finite, "smallest normal": limits.min_normal, "smallest subnormal": limits.min_subnormal},
            "format": _fmt_name(target)}


def history_data(saved: Saved) -> dict:
    trials = saved.trials[saved.trials["state"] == "COMPLETE"].sort_values("trial")
    best, xs, ys = 1.0, [], []
    for row in trials.itertuples(index=False):
        if bool(row.feasible) and row.speedup_estimate == row.speedup_estimate:
            best = max(best, float(row.speedup_estimate))
        xs.append(int(row.trial))
        ys.append(best)
    return {"trial": xs, "best_speedup": ys}


def tradeoff_data(saved: Saved) -> dict:
    trials = saved.trials[(saved.trials["state"] == "COMPLETE") & (saved.trials["drop"] < 1e8)]
    meta = saved.meta
    return {"speedup": [float(v) for v in trials["speedup_estimate"]], "drop": [float(v) for v in trials["drop"]],
            "feasible": [bool(v) for v in trials["feasible"]], "allowed": float(meta["budget"]["allowed"]),
            "chosen": (float(meta["speedup_estimate"]), float(meta["drop"])), "metric": meta.get("metric_name", "metric")}


def training_data(saved: Saved) -> dict | None:
    training = saved.meta.get("training")
    if not training:
        return None
    return {"float32": training["float32_losses"], "tuned": training["tuned_losses"], "scale": training["loss_scale"]}


def _render(name: str, data: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    if name == "precision_strip":
        n = len(data["paths"])
        fig, ax = plt.subplots(figsize=(10, 1.9))
        for i, d in enumerate(data["decisions"]):
            ax.add_patch(plt.Rectangle((i, 0), 1, 1, color=COLORS.get(d, "#999999")))
        ax.set_xlim(0, max(n, 1))
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_xlabel("layer index, input to output")
        ax.set_title("Precision of each layer")
        used = sorted(set(data["decisions"]), key=list(COLORS).index)
        ax.legend(handles=[Patch(color=COLORS[d], label=d) for d in used], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    elif name == "sensitivity":
        values = [v if v == v else 0.0 for v in data["values"]]
        floor = min([v for v in values if v > 0] or [1e-6]) / 10
        shown = [min(max(v, floor), 1e6) for v in values]
        n = len(shown)
        fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * n + 1.2)))
        ax.barh(range(n), shown, color=[COLORS.get(d, "#999") for d in data["decisions"]])
        ax.set_yticks(range(n))
        ax.set_yticklabels(data["paths"], fontsize=7 if n > 30 else 9)
        ax.invert_yaxis()
        ax.set_xscale("log")
        label = {"metric_drop": "metric drop with only this layer in 16-bit (log)",
                 "output_error": "output error (relative L2) with only this layer in 16-bit (log)"}.get(data["measure"], "first-order score (log)")
        if any(v <= 0 for v in values):
            label += "; a zero is drawn at the left edge"
        ax.set_xlabel(label)
        if data["measure"] == "metric_drop" and data["allowed"] == data["allowed"] and data["allowed"] > 0:
            ax.axvline(data["allowed"], color="black", linestyle="--", linewidth=1, label="budget")
        used = sorted(set(data["decisions"]), key=list(COLORS).index)
        ax.legend(handles=[Patch(color=COLORS[d], label=d) for d in used], loc="lower right", fontsize=8)
        ax.set_title("Per-layer sensitivity, most sensitive first"
                     + (" (no layer drops the metric alone)" if data["measure"] != "metric_drop" else ""))
    elif name == "ranges":
        n = len(data["paths"])
        fig, ax = plt.subplots(figsize=(10, 4.2))
        xs = range(n)
        pos = lambda vals: [v if v and v > 0 and math.isfinite(v) else float("nan") for v in vals]  # noqa: E731
        ax.plot(xs, pos(data["act"]), "o-", markersize=3, label="activations |x| max")
        ax.plot(xs, pos(data["grad"]), "s-", markersize=3, label="gradients |g| max")
        ax.plot(xs, pos(data["grad_scaled"]), "^-", markersize=3, label=f"gradients x {data['scale']:g} (loss scale)")
        for (label, value), style in zip(data["limits"].items(), ("-", "--", ":")):
            ax.axhline(value, color="red", linestyle=style, linewidth=1, label=f"{data['format']} {label} ({value:.3g})")
        ax.set_yscale("log")
        ax.set_xlabel("layer index, input to output")
        ax.set_ylabel("largest magnitude (log)")
        ax.set_title(f"Activation and gradient magnitudes against {data['format']} limits")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif name == "history":
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.step(data["trial"], data["best_speedup"], where="post", marker="o", markersize=4)
        if len(data["trial"]) <= 1:
            ax.set_xlim(-1, 1)
            ax.set_xticks(data["trial"] or [0])
        ax.set_xlabel("trial")
        ax.set_ylabel("best feasible speed-up (estimated, x)")
        ax.set_title("Search history")
    elif name == "tradeoff":
        fig, ax = plt.subplots(figsize=(7, 4))
        ok = [i for i, f in enumerate(data["feasible"]) if f]
        bad = [i for i, f in enumerate(data["feasible"]) if not f]
        ax.scatter([data["speedup"][i] for i in bad], [max(data["drop"][i], 1e-6) for i in bad], c="#c44e52", s=14, label="over budget")
        ax.scatter([data["speedup"][i] for i in ok], [max(data["drop"][i], 1e-6) for i in ok], c="#55a868", s=14, label="within budget")
        ax.axhline(max(data["allowed"], 1e-6), color="black", linestyle="--", linewidth=1, label="budget")
        ax.scatter([data["chosen"][0]], [max(data["chosen"][1], 1e-6)], marker="*", s=220, c="gold", edgecolors="black", label="chosen", zorder=5)
        ax.set_yscale("log")
        ax.set_xlabel("estimated speed-up (x)")
        ax.set_ylabel(f"{data['metric']} drop (log; 0 shown at 1e-6)")
        ax.set_title("Every trial: drop against speed-up")
        ax.legend(fontsize=8)
    elif name == "training":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
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
    else:  # pragma: no cover - names are ours
        raise ValueError(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_records(saved: Saved) -> dict[str, Any]:
    """Plain data for every plot that applies to this result."""
    records = {"precision_strip": strip_data(saved), "sensitivity": sensitivity_data(saved), "ranges": ranges_data(saved),
               "history": history_data(saved), "tradeoff": tradeoff_data(saved)}
    training = training_data(saved)
    if training is not None:
        records["training"] = training
    if not records["ranges"]["act"]:
        records.pop("ranges")
    return records


# ---------------------------------------------------------------------------
# Markdown and HTML


def _md(text: Any) -> str:
    """Escape a string for a Markdown table cell (Markdown renders inline HTML, so escape that too)."""
    return html.escape(str(text), quote=True).replace("|", "\\|").replace("*", "\\*").replace("_", "\\_").replace("`", "\\`")


def _table_rows(saved: Saved) -> list[dict]:
    frame = saved.sensitivity.sort_values("order") if "order" in saved.sensitivity else saved.sensitivity
    rows = []
    for i, row in enumerate(frame.to_dict("records")):
        rows.append({"#": i, "path": row["path"], "class": row["class"],
                     "flops": f"{float(row.get('flops_share', 0)) * 100:.2f}%",
                     "decision": row["decision"] if isinstance(row["decision"], str) else "follows",
                     "reason": reason_sentence(row, saved.meta)})
    return rows


def _headline(saved: Saved) -> list[tuple[str, str]]:
    m = saved.meta
    low = saved.sensitivity[saved.sensitivity["decision"].isin(["mixed_float16", "mixed_bfloat16"])]
    share = float(low["flops_share"].sum()) if "flops_share" in low else math.nan
    rows = [
        ("Target", m["target"]),
        ("Budget", m.get("formula", "")),
        ("float32 baseline", f"{m['metric_name']} = {m['baseline_metric']:.6g}"),
        ("Verified with Keras policies", f"{m['metric_name']} = {m['metric']:.6g} (drop {m['drop']:.4g}, allowed {m['budget']['allowed']:.4g})"),
        ("Estimated speed-up", f"{m['speedup_estimate']:.2f}x" + (f"; measured {m['measured_speedup']:.2f}x" if m.get("measured_speedup") else "")),
        ("16-bit decision units", f"{m.get('n_16bit', 0)} of {m.get('n_units', 0)}, {share * 100:.1f}% of the model's FLOPs"),
    ]
    if m.get("pretrain_steps"):
        rows.append(("Pretraining", f"float32 copy trained {m['pretrain_steps']} steps before the search"))
    verification = m.get("verification") or {}
    if verification.get("fallbacks"):
        rows.append(("Verification fallbacks", ", ".join(verification["fallbacks"])))
    stats = m.get("stats") or {}
    if stats:
        rows.append(("Search", f"{len(saved.trials)} trials, {stats.get('evaluations', '?')} evaluated, "
                                f"{stats.get('passes', '?')} passes over the data, {stats.get('seconds', 0):.1f} s"))
    return rows


def _training_lines(saved: Saved) -> list[str]:
    t = saved.meta.get("training")
    if not t:
        return []
    last = lambda xs: xs[-1] if xs else float("nan")  # noqa: E731
    return [
        f"{'Passed' if t['passed'] else 'FAILED'}: {t['reason']}.",
        f"{t['steps']} steps from the same weights; final loss float32 {_num(last(t['float32_losses']))} "
        f"vs tuned {_num(last(t['tuned_losses']))}; skipped steps {t['skipped_steps']}; non-finite losses {t['nonfinite_losses']}; "
        f"final loss scale {_num(last(t['loss_scale'])) if t['loss_scale'] else 'none (no float16 layer)'}.",
    ]


def _num(value: Any) -> str:
    return "nan" if value is None else f"{float(value):.4g}"


def render_markdown(saved: Saved, images: dict[str, str]) -> str:
    lines = ["# autoprec report", ""]
    lines += [f"- **{k}**: {_md(v)}" for k, v in _headline(saved)]
    if "precision_strip" in images:
        lines += ["", f"![precision of each layer]({images['precision_strip']})"]
    lines += ["", "## Layers", "", "| # | path | class | FLOPs share | decision | reason |", "|---:|---|---|---:|---|---|"]
    for r in _table_rows(saved):
        lines.append(f"| {r['#']} | `{html.escape(str(r['path']))}` | {_md(r['class'])} | {r['flops']} | {_md(r['decision'])} | {_md(r['reason'])} |")
    training = _training_lines(saved)
    if training:
        lines += ["", "## Training check", ""] + [_md(t) for t in training]
    lines += ["", "## Plots", ""]
    for name in PLOTS[1:]:
        if name in images:
            lines.append(f"![{name}]({images[name]})")
            lines.append("")
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right}code{font-size:12px}img{max-width:100%;margin:0.5em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:600}dd{margin:0}
.p-float32{color:#4c72b0}.p-mixed_float16{color:#c65f16}.p-mixed_bfloat16{color:#2f7d46}"""


def render_html(saved: Saved, images: dict[str, str]) -> str:
    esc = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>autoprec report</title>",
             f"<style>{_CSS}</style></head><body><h1>autoprec report</h1><dl>"]
    parts += [f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _headline(saved)]
    parts.append("</dl>")
    if "precision_strip" in images:
        parts.append(f"<img alt='precision of each layer' src='{_data_uri(os.path.join(saved.directory, images['precision_strip']))}'>")
    parts.append("<h2>Layers</h2><table><thead><tr><th>#</th><th>path</th><th>class</th><th>FLOPs share</th><th>decision</th><th>reason</th></tr></thead><tbody>")
    for r in _table_rows(saved):
        parts.append(f"<tr><td class='num'>{r['#']}</td><td><code>{esc(r['path'])}</code></td><td>{esc(r['class'])}</td>"
                     f"<td class='num'>{esc(r['flops'])}</td><td class='p-{esc(r['decision'])}'>{esc(r['decision'])}</td><td>{esc(r['reason'])}</td></tr>")
    parts.append("</tbody></table>")
    training = _training_lines(saved)
    if training:
        parts.append("<h2>Training check</h2>" + "".join(f"<p>{esc(t)}</p>" for t in training))
    parts.append("<h2>Plots</h2>")
    for name in PLOTS[1:]:
        if name in images:
            parts.append(f"<img alt='{esc(name)}' src='{_data_uri(os.path.join(saved.directory, images[name]))}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _data_uri(path: str) -> str:
    with open(path, "rb") as fh:
        return "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")


def write_report(directory: str | os.PathLike) -> list[str]:
    """(Re)write the plots, ``report.md`` and ``report.html`` from a saved result directory."""
    saved = load_saved(directory)
    images = {}
    for name, data in plot_records(saved).items():
        filename = f"{name}.png"
        _render(name, data, os.path.join(saved.directory, filename))
        images[name] = filename
    md_path = os.path.join(saved.directory, "report.md")
    html_path = os.path.join(saved.directory, "report.html")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(saved, images))
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(render_html(saved, images))
    return [md_path, html_path] + [os.path.join(saved.directory, f) for f in images.values()]
