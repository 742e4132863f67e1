"""Reports a person would rather look at than read: Markdown, self-contained HTML, PNG plots.

Everything is regenerated from the files :meth:`TuneResult.save` writes
(``result.json``, ``sensitivity.csv``, ``trials.csv``, ``policy.json``), so
``autoprec report DIR`` works on a directory alone. A directory where
:meth:`autoprec.AdaptivePrecision.save` wrote a training history (alone or
beside a tune result) also gets a timeline of the policy changes, with the
loss and the loss scale. The charts live in
:mod:`autoprec.report.plots` (plain data, then drawing); each layer's sentence comes
from :func:`autoprec.decisions.sentence`. Every string that comes from the
model is escaped.

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

from autoprec.decisions import sentence
from autoprec.errors import DataError
from autoprec.formats import leaves_float32
from autoprec.report.plots import CHARTS

PLOTS = tuple(CHARTS)
# Written by AdaptivePrecision.save (autoprec.adaptive.HISTORY_FILE and CHECKS_FILE); spelled here so that
# reading a report does not import Keras. tests/test_adaptive.py holds the two spellings together.
ADAPTIVE_FILES = ("adaptive_history.csv", "adaptive_checks.csv")


@dataclass(frozen=True)
class Saved:
    """A saved result: its metadata and tables; ``sensitivity`` is None for an adaptive training run alone."""

    meta: dict
    sensitivity: Any
    trials: Any
    directory: str
    adaptive: dict | None = None  # {"events": DataFrame, "checks": DataFrame} of an adaptive training run
    sublayers: Any = None  # the layers inside blocks (sublayers.csv), when the model has any


def load_saved(directory: str | os.PathLike) -> Saved:
    """Read ``result.json``, ``sensitivity.csv`` and ``trials.csv`` from a result directory.

    Raises:
        DataError: a file is missing, empty, or not what ``TuneResult.save`` writes.
    """
    import pandas as pd

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise DataError(
            f"Expected a result directory written by TuneResult.save (or `autoprec tune -o DIR`). "
            f"Received {directory!r}, which is not a directory."
        )
    adaptive = load_adaptive(directory)
    if adaptive is not None and not os.path.isfile(os.path.join(directory, "result.json")):
        return Saved({}, None, None, directory, adaptive)
    missing = [
        n for n in ("result.json", "sensitivity.csv", "trials.csv") if not os.path.isfile(os.path.join(directory, n))
    ]
    if missing:
        raise DataError(
            f"Expected a directory written by TuneResult.save (or `autoprec tune -o DIR`). Received {directory!r}, "
            f"which lacks {missing}."
        )
    try:
        with open(os.path.join(directory, "result.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"Expected valid JSON in {directory}/result.json: {exc}.") from None
    if not isinstance(meta, dict) or not {"baseline_metric", "metric", "budget", "target"} <= set(meta):
        raise DataError(
            f"Expected {directory}/result.json to hold a tune result (baseline_metric, metric, budget, target)."
        )
    try:
        sensitivity = pd.read_csv(os.path.join(directory, "sensitivity.csv"), keep_default_na=True)
        trials = pd.read_csv(os.path.join(directory, "trials.csv"))
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"Expected the CSV files in {directory!r} as TuneResult.save writes them: {exc}.") from None
    needed = {"path", "decision", "reason", "pinned"}
    if not needed <= set(sensitivity.columns) or not {"trial", "state"} <= set(trials.columns):
        raise DataError(
            f"Expected {directory}/sensitivity.csv with columns {sorted(needed)} and trials.csv with "
            "'trial' and 'state'. Regenerate the directory with `autoprec tune`."
        )
    sensitivity["pinned"] = sensitivity["pinned"].fillna("")
    sublayers = None
    if os.path.isfile(os.path.join(directory, "sublayers.csv")):
        sublayers = pd.read_csv(os.path.join(directory, "sublayers.csv"))
        if not {"block", "path", "class", "computes", "pinned"} <= set(sublayers.columns):
            raise DataError(f"Expected {directory}/sublayers.csv as TuneResult.save writes it (block, path, ...).")
    return Saved(meta, sensitivity, trials, directory, adaptive, sublayers)


def load_adaptive(directory: str) -> dict | None:
    """The events and checks an adaptive training run saved in ``directory``, or None when it holds none.

    Raises:
        DataError: the files are there but are not what ``AdaptivePrecision.save`` writes.

    Example:
        >>> load_adaptive("runs/adaptive")["events"][["step", "layer", "reason"]]  # doctest: +SKIP
    """
    import pandas as pd

    paths = [os.path.join(directory, name) for name in ADAPTIVE_FILES]
    if not os.path.isfile(paths[0]):
        return None
    try:
        events = pd.read_csv(paths[0])
        checks = (
            pd.read_csv(paths[1]) if os.path.isfile(paths[1]) else pd.DataFrame(columns=["step", "loss", "loss_scale"])
        )
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"Expected the adaptive history in {directory!r} as AdaptivePrecision.save writes it: {exc}."
        ) from None
    needed = {"step", "layer", "direction", "before", "after", "reason"}
    if not needed <= set(events.columns) or not {"step", "loss"} <= set(checks.columns):
        raise DataError(
            f"Expected {paths[0]} with columns {sorted(needed)} and {ADAPTIVE_FILES[1]} with 'step' and 'loss'. "
            "Save them again with AdaptivePrecision.save(directory)."
        )
    return {"events": events, "checks": checks}


def plot_records(saved: Saved) -> dict[str, Any]:
    """Plain data for every chart that applies to this result."""
    if saved.sensitivity is None:  # an adaptive training run alone
        return {"timeline": CHARTS["timeline"][0](saved)}
    records: dict[str, Any] = {name: data_fn(saved) for name, (data_fn, _) in CHARTS.items()}
    for name in ("training", "timeline"):
        if records.get(name) is None:
            records.pop(name, None)
    if not records["ranges"]["act"]:
        records.pop("ranges")
    return records


def reason_text(row: dict, meta: dict) -> str:
    """The sentence for one row of a saved result."""
    return sentence(
        row,
        target=meta.get("target", "mixed_float16"),
        metric=meta.get("metric_name", "metric"),
        higher_is_better=meta.get("higher_is_better", True),
        allowed=float(meta.get("budget", {}).get("allowed", math.inf)),
    )


# ---------------------------------------------------------------------------
# Markdown and HTML


def _md(text: Any) -> str:
    """Escape a string for a Markdown table cell (Markdown renders inline HTML, so escape that too)."""
    return (
        html.escape(str(text), quote=True)
        .replace("|", "\\|")
        .replace("*", "\\*")
        .replace("_", "\\_")
        .replace("`", "\\`")
    )


def _table_rows(saved: Saved) -> list[dict]:
    frame = saved.sensitivity.sort_values("order") if "order" in saved.sensitivity else saved.sensitivity
    rows = []
    for i, row in enumerate(frame.to_dict("records")):
        rows.append(
            {
                "#": i,
                "path": row["path"],
                "class": row["class"],
                "kind": row.get("kind", ""),
                "flops": f"{float(row.get('flops_share', 0)) * 100:.2f}%",
                "decision": row["decision"] if isinstance(row["decision"], str) else "follows",
                "reason": reason_text(row, saved.meta),
            }
        )
    return rows


def _sublayer_rows(saved: Saved) -> list[dict]:
    """The tree under each block: one row per sublayer, indented by its depth below the block."""
    if saved.sublayers is None:
        return []
    rows = []
    for row in saved.sublayers.to_dict("records"):
        block, path = str(row["block"]), str(row["path"])
        depth = path.count("/") - block.count("/")
        pinned = str(row["pinned"]).lower() == "true"
        rows.append(
            {
                "block": block,
                "path": path,
                "depth": max(depth, 1),
                "class": row["class"],
                "computes": row["computes"],
                "note": "pinned: the layer fixes its own dtype" if pinned else "",
            }
        )
    return rows


def _headline(saved: Saved) -> list[tuple[str, str]]:
    m = saved.meta
    decisions = saved.sensitivity["decision"].astype(str)
    low = saved.sensitivity[decisions.map(leaves_float32)]
    share = float(low["flops_share"].sum()) if "flops_share" in low else math.nan
    verdict = "within the budget" if m.get("feasible", True) else "OVER THE BUDGET"
    device = m.get("device", "gpu")
    rows = [
        ("Target", m["target"]),
        ("Budget", m.get("formula", "")),
        ("float32 baseline", f"{m['metric_name']} = {m['baseline_metric']:.6g}"),
        (
            "Verified with Keras policies",
            f"{m['metric_name']} = {m['metric']:.6g} (drop {m['drop']:.4g}, allowed "
            f"{m['budget']['allowed']:.4g}: {verdict})",
        ),
        (
            f"Estimated speed-up on a {device}",
            f"{m['speedup_estimate']:.2f}x, an estimate of the cost model for a {device} "
            "(not a measurement on this machine)"
            + (
                f"; measured on {m.get('measured_on') or 'the tuning machine'}: {m['measured_speedup']:.2f}x"
                if m.get("measured_speedup")
                else ""
            ),
        ),
        (
            "16-bit decisions",
            f"{m.get('n_16bit', 0)} of {m.get('n_units', 0)}, {share * 100:.1f}% of the model's FLOPs",
        ),
    ]
    return rows + _run_rows(saved)


def _run_rows(saved: Saved) -> list[tuple[str, str]]:
    """The headline's rows about how the run went: size, pretraining, fallbacks, the search and its cost."""
    m, rows = saved.meta, []
    if m.get("size_ratio", 1.0) > 1.0 + 1e-9 or m.get("objective") == "size":
        rows.append(
            (
                "Weights",
                f"{m.get('size_ratio', 1.0):.2f}x smaller than float32; the search optimised "
                f"{m.get('objective', 'speed')}",
            )
        )
    if m.get("pretrain_steps"):
        rows.append(("Pretraining", f"float32 copy trained {m['pretrain_steps']} steps before the search"))
    verification = m.get("verification") or {}
    if verification.get("unit") == "token" or verification.get("weighted"):
        weighed = " weighed above zero (sample weights or the model's output mask)" if verification["weighted"] else ""
        rows.append(
            (
                "Evaluation data",
                f"{verification.get('samples', '?')} samples; the metric averages over the "
                f"{verification.get('counted', '?')} {verification['unit']}s{weighed}",
            )
        )
    if verification.get("fallbacks"):
        rows.append(("Fallbacks", ", ".join(f"{f['key']} ({f['check']})" for f in verification["fallbacks"])))
    if not m.get("feasible", True):
        rows.append(("Why over the budget", verification.get("why", "")))
    stats = m.get("stats") or {}
    if stats:
        rows.append(
            (
                "Search",
                f"{len(saved.trials)} trials, {stats.get('evaluations', '?')} evaluated "
                f"({stats.get('rejected_early', 0)} stopped early), {stats.get('passes', '?')} passes "
                f"over the data, {stats.get('seconds', 0):.1f} s",
            )
        )
    if stats.get("statistics_samples"):
        rows.append(("Statistics", _statistics_text(stats)))
    resolution = stats.get("resolution") or {}
    if resolution.get("resolvable_drop") is not None and resolution.get("samples_needed", 0) > resolution.get(
        "samples", 0
    ):
        rows.append(
            (
                "Resolution",
                f"on {resolution.get('samples', '?')} samples the bound tells a drop from zero above "
                f"{float(resolution['resolvable_drop']):.4g} (the all-16-bit candidate's margin); the budget needs "
                f"about {resolution.get('samples_needed', '?')}",
            )
        )
    passes = stats.get("stage_passes") or {}
    if passes:
        rows.append(
            (
                "Cost in float32 passes",
                ", ".join(f"{k} {v:g}" for k, v in passes.items())
                + f" (one warm float32 pass over the data: {stats.get('pass_seconds', 0):.3g} s)",
            )
        )
    return rows


def _statistics_text(stats: dict[str, Any]) -> str:
    """What the statistics read: the samples of the ranges and, where fewer, of the gradients.

    >>> _statistics_text({"statistics_samples": 256, "gradient_samples": 16, "samples": 512})
    'activation peaks on 256, gradients and scores on 16 of 512 evaluation samples (seeded); every metric...'
    """
    read = stats["statistics_samples"]
    grads = stats.get("gradient_samples") or read
    what = f"ranges, flush shares and scores on {read}" if grads >= read else (
        f"activation peaks on {read}, gradients and scores on {grads}"
    )  # fmt: skip
    return (
        f"{what} of {stats.get('samples', '?')} evaluation samples (seeded); every metric and the budget on all of them"
    )


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _last(xs: list) -> float:
    return xs[-1] if xs else float("nan")


def _training_lines(saved: Saved) -> list[str]:
    t = saved.meta.get("training")
    if not t:
        return []
    window = max(1, int(t["steps"]) // 5)  # the judge's window: one batch's loss is noise

    def tail(xs: list) -> float:
        finite = [float(v) for v in xs[-window:] if v is not None and math.isfinite(float(v))]
        return sum(finite) / len(finite) if finite else float("nan")

    return [
        f"{'Passed' if t['passed'] else 'FAILED'}: {t['reason']}.",
        f"{t['steps']} steps from the same weights; mean loss over the last {window} steps: float32 "
        f"{_num(tail(t['float32_losses']))} vs tuned {_num(tail(t['tuned_losses']))}; "
        f"skipped steps {t['skipped_steps']}; non-finite losses {t['nonfinite_losses']}; "
        f"final loss scale {_num(_last(t['loss_scale'])) if t['loss_scale'] else 'none (no float16 layer)'}.",
    ]


def _num(value: Any) -> str:
    return "nan" if value is None else f"{float(value):.4g}"


def _adaptive_lines(adaptive: dict) -> list[str]:
    """The adaptive training run in a few sentences."""
    events, checks = adaptive["events"], adaptive["checks"]
    promoted = int((events["direction"] == "promote").sum())
    steps = int(checks["step"].max()) if len(checks) else 0
    lines = [
        f"{len(events)} policy changes ({promoted} to float32, {len(events) - promoted} to 16-bit) over {steps} "
        f"steps and {len(checks)} checks."
    ]
    if len(checks):
        last = checks.iloc[-1]
        scale = last.get("loss_scale")
        lines.append(
            f"At the last check: loss {_num(last['loss'])}, loss scale "
            f"{_num(scale) if scale == scale and scale is not None else 'none (no LossScaleOptimizer)'}"
            + (f", {int(last['layers_16bit'])} layers in 16-bit." if "layers_16bit" in last else ".")
        )
    return lines


def _event_rows(adaptive: dict) -> list[dict]:
    rows = []
    for r in adaptive["events"].sort_values("step", kind="stable").to_dict("records"):
        why = r.get("why") if isinstance(r.get("why"), str) else f"{r['before']} -> {r['after']}"
        rows.append({"step": int(r["step"]), "layer": r["layer"], "reason": r["reason"], "why": why})
    return rows


def _adaptive_markdown(saved: Saved, images: dict[str, str]) -> list[str]:
    if saved.adaptive is None:
        return []
    lines = ["", "## Adaptive precision during training", ""] + [_md(t) for t in _adaptive_lines(saved.adaptive)]
    if "timeline" in images:
        lines += ["", f"![policy timeline]({images['timeline']})"]
    if len(saved.adaptive["events"]):
        lines += ["", "| step | layer | reason | change |", "|---:|---|---|---|"]
        lines += [
            f"| {r['step']} | `{html.escape(str(r['layer']))}` | {_md(r['reason'])} | {_md(r['why'])} |"
            for r in _event_rows(saved.adaptive)
        ]
    return lines


def _adaptive_html(saved: Saved, images: dict[str, str]) -> list[str]:
    if saved.adaptive is None:
        return []
    parts = ["<h2>Adaptive precision during training</h2>"] + [
        f"<p>{_esc(t)}</p>" for t in _adaptive_lines(saved.adaptive)
    ]
    if "timeline" in images:
        parts.append(
            f"<img alt='policy timeline' src='{_data_uri(os.path.join(saved.directory, images['timeline']))}'>"
        )
    if len(saved.adaptive["events"]):
        parts.append("<table><thead><tr><th>step</th><th>layer</th><th>reason</th><th>change</th></tr></thead><tbody>")
        parts += [
            f"<tr><td class='num'>{r['step']}</td><td><code>{_esc(r['layer'])}</code></td><td>{_esc(r['reason'])}</td>"
            f"<td>{_esc(r['why'])}</td></tr>"
            for r in _event_rows(saved.adaptive)
        ]
        parts.append("</tbody></table>")
    return parts


_TRIAL_ROWS = 40  # the report lists this many trials; trials.csv holds them all


def _trial_rows(saved: Saved) -> tuple[list[str], list[list[str]]]:
    """The evaluated trials, best feasible first: header and cells (drop with its upper bound where judged by one)."""
    trials = saved.trials
    if trials is None or "drop" not in trials or not len(trials):
        return [], []
    conf = saved.meta.get("confidence")
    size = saved.meta.get("objective") == "size" and "size_ratio" in trials
    x = "size_ratio" if size else "speedup_estimate"
    rows = trials[trials["drop"].notna()].copy()
    if x not in rows:
        return [], []
    rows["_ok"] = rows["feasible"].map(lambda v: str(v).lower() == "true")
    rows = rows.sort_values(["_ok", x], ascending=[False, False]).head(_TRIAL_ROWS)
    header = ["trial", "size ratio" if size else "est. speed-up", "drop"]
    header += [f"{conf:.0%} bound"] if conf else []
    header += ["within budget"]
    cells = []
    for _, r in rows.iterrows():
        drop = float(r["drop"])
        row = [str(r["trial"]), f"{float(r[x]):.3f}x", f"{drop:.4g}" if drop < 1e8 else "non-finite"]
        if conf:
            bound = r.get("drop_bound")
            row.append(f"{float(bound):.4g}" if bound is not None and bound == bound else "")
        row.append("yes" if r["_ok"] else "no")
        cells.append(row)
    return header, cells


def _trials_markdown(saved: Saved) -> list[str]:
    header, cells = _trial_rows(saved)
    if not cells:
        return []
    lines = ["", f"## Trials ({len(cells)} of {len(saved.trials)}, best within budget first)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in cells]


def _trials_html(saved: Saved) -> list[str]:
    header, cells = _trial_rows(saved)
    if not cells:
        return []
    parts = [f"<h2>Trials ({len(cells)} of {len(saved.trials)}, best within budget first)</h2><table><thead><tr>"]
    parts += ["".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td class='num'>{_esc(c)}</td>" for c in row) + "</tr>" for row in cells]
    return [*parts, "</tbody></table>"]


def render_markdown(saved: Saved, images: dict[str, str]) -> str:
    if saved.sensitivity is None:
        return "\n".join(["# autoprec report", *_adaptive_markdown(saved, images)]) + "\n"
    lines = ["# autoprec report", ""]
    lines += [f"- **{_md(k)}**: {_md(v)}" for k, v in _headline(saved)]
    if "precision_strip" in images:
        lines += ["", f"![precision of each layer]({images['precision_strip']})"]
    lines += [
        "",
        "## Layers",
        "",
        "| # | path | class | kind | FLOPs share | decision | reason |",
        "|---:|---|---|---|---:|---|---|",
    ]
    for r in _table_rows(saved):
        lines.append(
            f"| {r['#']} | `{html.escape(str(r['path']))}` | {_md(r['class'])} | {_md(r['kind'])} | {r['flops']} | "
            f"{_md(r['decision'])} | {_md(r['reason'])} |"
        )
    inner = _sublayer_rows(saved)
    if inner:
        lines += [
            "",
            "## Inside the blocks",
            "",
            "| block | sublayer | class | computes in | |",
            "|---|---|---|---|---|",
        ]
        for r in inner:
            indent = "&nbsp;&nbsp;" * (r["depth"] - 1)
            lines.append(
                f"| `{html.escape(r['block'])}` | {indent}`{html.escape(r['path'])}` | {_md(r['class'])} | "
                f"{_md(r['computes'])} | {_md(r['note'])} |"
            )
    lines += _trials_markdown(saved)
    training = _training_lines(saved)
    if training:
        lines += ["", "## Training check", ""] + [_md(t) for t in training]
    lines += _adaptive_markdown(saved, images)
    lines += ["", "## Plots", ""]
    for name in PLOTS[1:]:
        if name in images and name != "timeline":
            lines += [f"![{name}]({images[name]})", ""]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right}code{font-size:12px}img{max-width:100%;margin:0.5em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:600}dd{margin:0}
.p-float32{color:#4c72b0}.p-mixed_float16{color:#c65f16}.p-mixed_bfloat16{color:#2f7d46}"""


def render_html(saved: Saved, images: dict[str, str]) -> str:
    head = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>autoprec report</title>",
        f"<style>{_CSS}</style></head><body><h1>autoprec report</h1>",
    ]
    if saved.sensitivity is None:
        return "\n".join([*head, *_adaptive_html(saved, images), "</body></html>"])
    parts = [*head, "<dl>"]
    parts += [f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in _headline(saved)]
    parts.append("</dl>")
    if "precision_strip" in images:
        strip = _data_uri(os.path.join(saved.directory, images["precision_strip"]))
        parts.append(f"<img alt='precision of each layer' src='{strip}'>")
    parts.append(
        "<h2>Layers</h2><table><thead><tr><th>#</th><th>path</th><th>class</th><th>kind</th><th>FLOPs share</th>"
        "<th>decision</th><th>reason</th></tr></thead><tbody>"
    )
    for r in _table_rows(saved):
        parts.append(
            f"<tr><td class='num'>{r['#']}</td><td><code>{_esc(r['path'])}</code></td><td>{_esc(r['class'])}</td>"
            f"<td>{_esc(r['kind'])}</td><td class='num'>{_esc(r['flops'])}</td><td class='p-{_esc(r['decision'])}'>"
            f"{_esc(r['decision'])}</td><td>{_esc(r['reason'])}</td></tr>"
        )
    parts.append("</tbody></table>")
    inner = _sublayer_rows(saved)
    if inner:
        parts.append(
            "<h2>Inside the blocks</h2><table><thead><tr><th>block</th><th>sublayer</th><th>class</th>"
            "<th>computes in</th><th></th></tr></thead><tbody>"
        )
        for r in inner:
            pad = r["depth"] - 1
            parts.append(
                f"<tr><td><code>{_esc(r['block'])}</code></td><td style='padding-left:{6 + 16 * pad}px'>"
                f"<code>{_esc(r['path'])}</code></td><td>{_esc(r['class'])}</td><td class='p-{_esc(r['computes'])}'>"
                f"{_esc(r['computes'])}</td><td>{_esc(r['note'])}</td></tr>"
            )
        parts.append("</tbody></table>")
    parts += _trials_html(saved)
    training = _training_lines(saved)
    if training:
        parts.append("<h2>Training check</h2>" + "".join(f"<p>{_esc(t)}</p>" for t in training))
    parts += _adaptive_html(saved, images)
    parts.append("<h2>Plots</h2>")
    for name in PLOTS[1:]:
        if name in images and name != "timeline":
            parts.append(f"<img alt='{_esc(name)}' src='{_data_uri(os.path.join(saved.directory, images[name]))}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _data_uri(path: str) -> str:
    with open(path, "rb") as fh:
        return "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")


def write_report(directory: str | os.PathLike) -> list[str]:
    """(Re)write the plots, ``report.md`` and ``report.html`` from a saved result directory.

    Plots of charts that no longer apply (a training plot from an earlier run) are removed.
    """
    saved = load_saved(directory)
    images = {}
    records = plot_records(saved)
    for name, (_, draw) in CHARTS.items():
        path = os.path.join(saved.directory, f"{name}.png")
        if name in records:
            draw(records[name], path)
            images[name] = f"{name}.png"
        elif os.path.exists(path):
            os.remove(path)
    md_path = os.path.join(saved.directory, "report.md")
    html_path = os.path.join(saved.directory, "report.html")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(saved, images))
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(render_html(saved, images))
    return [md_path, html_path] + [os.path.join(saved.directory, f) for f in images.values()]
