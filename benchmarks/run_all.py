"""Run every CPU benchmark and write ``reports/benchmarks.md``. ``make bench`` calls it.

    python benchmarks/run_all.py --output reports/benchmarks.md [--only NAME ...]

Each benchmark compares its variants side by side in one process,
interleaved, and reports medians and ratios; the applications benchmark runs
each measurement in a fresh process for its peak RSS. About 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import machine  # noqa: E402  (found through the sys.path entry above)

GPU_NOTE = """No CUDA machine was lent to the sessions that made this report, so `benchmarks/gpu.py`
has not been run; it is ready: `KERAS_BACKEND=jax python benchmarks/gpu.py --out gpu.md` on a CUDA
machine measures float32 vs all-float16 vs tuned step time for a conv and a transformer-block model,
and the LossScaleOptimizer's behaviour on real float16 kernels. The cost model's GPU factors are
stated assumptions until then."""


def _quality(rec):
    worst = min(r["tune"] for r in rec)
    beaten = [r["model"] for r in rec if r["tune"] + 1e-9 < max(r["halving"], r["prefix"])]
    return [
        f"- Search quality: tune reaches {worst:.1%} of the exhaustive optimum over every eligible layer at worst "
        f"(target >= 99%): {'met' if worst >= 0.99 else 'MISSED'}; "
        f"below a baseline on: {', '.join(beaten) or 'no model'}."
    ]


def _trial_cost(rec):
    r50 = [r for r in rec if r["layers"] >= 50]
    worst = min(r["ratio"] for r in r50)
    return [
        f"- Cost per trial: the engine is {worst:.1f}x cheaper than rebuilding at >= 50 layers (target >= 50x): "
        f"{'met' if worst >= 50 else 'MISSED'}."
    ]


def _scaling(rec):
    slope = rec[-1]["slope"]
    return [
        f"- Tune cost grows as layers^{slope:.2f} over 10-160 layers, profile included (target <= 1.15): "
        f"{'met' if slope <= 1.15 else 'MISSED'}."
    ]


def _applications(rec):
    lines = []
    for r in rec:
        tuned = r["tune"]
        if "error" in tuned:
            lines.append(f"- {r['model']}: tune failed: {tuned['error']}")
            continue
        ok = tuned["peak_rss_gb"] <= 3 and tuned["seconds"] <= 180
        target = " (target <= 3 GB, <= 180 s)" if r["model"] in ("ResNet50", "Xception") else ""
        lines.append(
            f"- {r['model']}: tune peaked at {tuned['peak_rss_gb']:.2f} GB RSS in {tuned['seconds']:.0f} s{target}: "
            f"{'met' if ok else 'MISSED' if target else 'for the record'}."
        )
    return lines


def _speed(rec):
    lines = []
    for r in rec:
        tuned, all16 = r["tuned"], r["Keras global bf16"]
        line = (
            f"- Speed, {r['model']}: tuned {tuned['ratio']:.2f}x float32 ({tuned['ratio'] / all16['ratio']:.2f}x the "
            f"global bf16 policy, which {'meets' if all16['meets'] else 'misses'} the budget); grappler AMP "
            f"{r['grappler AMP']['ratio']:.2f}x with accuracy {r['grappler AMP']['accuracy']:.3f} "
            f"({'within' if r['grappler AMP']['meets'] else 'OVER'} the budget)."
        )
        if r["model"].startswith("weightless"):
            ok = tuned["ratio"] / all16["ratio"] <= 1.10 and tuned["ratio"] <= 0.70
            line += f" Target <= 1.10x all-bf16 and <= 0.70x float32: {'met' if ok else 'MISSED'}."
        lines.append(line)
    return lines


def _quantize(rec):
    tuned = [r for r in rec if r["variant"].startswith("tuned")]
    return [
        f"- Quantization, {r['model']}, {r['variant']}: weights {r['size_ratio']:.2f}x smaller, accuracy "
        f"{r['accuracy']:.3f}, inference {r['time_ratio']:.2f}x float32's time."
        for r in tuned
    ]


def _adaptive(rec):
    return [
        f"- AdaptivePrecision, {r['model']}: fit with the callback takes {r['ratio']:.3f}x plain fit's time "
        f"(target <= 1.10x): {'met' if r['ratio'] <= 1.10 else 'MISSED'}."
        for r in rec
    ]


def _workers(rec):
    return [
        f"- Shared search, {r['workers']} worker(s): {r['seconds']:.1f} s wall, "
        f"{r.get('speedup', 1.0):.2f}x one worker."
        for r in rec
    ]


SECTIONS = [  # (module, title, targets)
    ("bench_search_quality", "Search quality against the exhaustive optimum", _quality),
    ("bench_trial_cost", "Cost per trial: simulated engine vs rebuilding with real policies", _trial_cost),
    ("bench_scaling", "Tuning cost as the model grows", _scaling),
    ("bench_applications", "keras.applications: memory and time", _applications),
    ("bench_speed", "What a user would pick instead: training-step time and accuracy on this CPU", _speed),
    ("bench_quantize", "Quantized candidates: size, accuracy and inference time", _quantize),
    ("bench_adaptive", "AdaptivePrecision: the callback's overhead", _adaptive),
    ("bench_workers", "One study, several workers", _workers),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="reports/benchmarks.md")
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    args = parser.parse_args(argv)
    started = time.time()
    sections, targets = [], []
    for module_name, title, summarise in SECTIONS:
        if args.only and module_name not in args.only:
            continue
        module = importlib.import_module(module_name)
        t = time.time()
        text, rec = module.run()
        targets += summarise(rec)
        doc = module.__doc__.strip().split("\n\n")
        sections.append(
            (
                title,
                "\n\n".join(doc[:2]).replace("\n", " ") if len(doc) > 1 else doc[0],
                text,
                f"`python benchmarks/{module_name}.py`, {time.time() - t:.0f} s",
            )
        )
    out = [
        "# autoprec benchmarks",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"- Machine: {machine()}",
        "- Command: `make bench` (= `python benchmarks/run_all.py --output reports/benchmarks.md`)",
        f"- Wall time: {time.time() - started:.0f} s",
        "",
        "Every figure is a median or a ratio of variants measured side by side, interleaved, in one run.",
        "",
        "## Targets",
        "",
        *targets,
        "",
    ]
    for i, (title, doc, body, how) in enumerate(sections, start=1):
        out += [f"## {i}. {title}", "", doc, "", body, "", f"Measured by {how}.", ""]
    out += [f"## {len(sections) + 1}. GPU", "", GPU_NOTE, ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
