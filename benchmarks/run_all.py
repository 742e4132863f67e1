"""Run every CPU benchmark and write ``reports/benchmarks.md``. ``make bench`` calls it.

    python benchmarks/run_all.py --output reports/benchmarks.md

Each benchmark compares its variants side by side in this one process,
interleaved, and reports medians and ratios. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import machine  # noqa: E402

GPU_NOTE = """No CUDA machine was available when this report was made, so `benchmarks/gpu.py`
has not been run; it is ready: `KERAS_BACKEND=jax python benchmarks/gpu.py --out gpu.md` on
a CUDA machine (JAX or TensorFlow backend) measures float32 vs all-float16 vs tuned step time for a
conv and a transformer-block model, and the LossScaleOptimizer's behaviour on real float16 kernels.
On this CPU, with `KERAS_BACKEND=jax` and TensorFlow blocked from import, `profile` (gradient
statistics through `jax.value_and_grad`) and `tune` (engine, search, verification with real float16
Dense kernels) ran, ranked the planted layers first and chose the same policies as on TensorFlow; `gpu.py --quick` then stopped at the conv model's first real float16 step, because JAX's
CPU backend lacks that float16 kernel ("The precision 'F16_F16_F32' is not supported by dot_general on
CPU"). Its figures need a GPU."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="reports/benchmarks.md")
    args = parser.parse_args(argv)
    import bench_scaling
    import bench_search_quality
    import bench_speed
    import bench_trial_cost

    started = time.time()
    sections = []
    targets = []

    text, rec = bench_search_quality.run()
    worst = min(r["tune"] for r in rec)
    beaten = [r["model"] for r in rec if r["tune"] + 1e-9 < max(r["halving"], r["prefix"])]
    targets.append(f"- Search quality: tune reaches {worst:.1%} of the exhaustive optimum at worst (target >= 99%): "
                   f"{'met' if worst >= 0.99 else 'MISSED'}; below a baseline on: {', '.join(beaten) or 'no model'}.")
    sections.append(("1. Search quality against the exhaustive optimum", bench_search_quality.__doc__, text))

    text, rec = bench_trial_cost.run()
    r50 = [r for r in rec if r["layers"] >= 50]
    targets.append(f"- Cost per trial: the engine is {min(r['ratio'] for r in r50):.1f}x cheaper than rebuilding at "
                   f">= 50 layers (target >= 10x): {'met' if min(r['ratio'] for r in r50) >= 10 else 'MISSED'}.")
    sections.append(("2. Cost per trial: simulated engine vs rebuilding with real policies", bench_trial_cost.__doc__, text))

    text, rec = bench_scaling.run()
    sections.append(("3. Tuning cost as the model grows", bench_scaling.__doc__, text))

    text, rec = bench_speed.run()
    for r in rec:
        if r["all16_meets"] and r["same_policy"]:
            targets.append(f"- Speed, {r['model']}: tuned chose the all-bfloat16 policy itself (target <= 1.05x all-bfloat16: "
                           f"met by construction); the measured ratio, {r['tuned_vs_all16']:.2f}x, is this machine's timing "
                           f"noise between two copies of one policy. Tuned is {r['tuned_ratio']:.2f}x float32.")
        elif r["all16_meets"]:
            targets.append(f"- Speed, {r['model']}: tuned is {r['tuned_vs_all16']:.2f}x all-bfloat16 (target <= 1.05x): "
                           f"{'met' if r['tuned_vs_all16'] <= 1.05 else 'MISSED'}.")
        else:
            targets.append(f"- Speed, {r['model']}: tuned is {r['tuned_ratio']:.2f}x float32 (target <= 0.75x): "
                           f"{'met' if r['tuned_ratio'] <= 0.75 else 'MISSED'}.")
    sections.append(("4. Training-step time on this CPU (mixed_bfloat16)", bench_speed.__doc__, text))

    out = [
        "# autoprec benchmarks", "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"- Machine: {machine()}",
        "- Command: `make bench` (= `python benchmarks/run_all.py --output reports/benchmarks.md`)",
        f"- Wall time: {time.time() - started:.0f} s", "",
        "Every figure is a median or a ratio of variants measured side by side, interleaved, in one run.",
        "", "## Targets", "", *targets, "",
    ]
    for title, doc, body in sections:
        out += [f"## {title}", "", doc.strip().split("\n\n")[0].replace("\n", " "), "", body, ""]
    out += ["## 5. GPU", "", GPU_NOTE, ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
