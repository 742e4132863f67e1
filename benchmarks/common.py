"""Shared benchmark helpers: machine description, interleaved timing, Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def machine() -> str:
    """One line: CPU model, cores, and the versions that matter."""
    import keras
    import optuna
    import tensorflow as tf

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from autoprec import backends

    bf16 = "AVX512_BF16/AMX" if backends.cpu_has_fast_bf16() else "no fast bf16"
    return (
        f"{cpu}, {os.cpu_count()} cores ({bf16}); Python {platform.python_version()}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__} ({keras.backend.backend()}), Optuna {optuna.__version__}"
    )


def interleaved(fns: dict, *, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Round-robin order means drift on a noisy machine hits every variant alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_gb() -> float:
    """This process's peak resident set size in GiB: autoprec's own reading, the one tune's stage figures use."""
    from autoprec.backends import peak_rss_gb as peak

    return peak()


def in_fresh_process(script: str, args: list[str], out: str, *, timeout: int) -> dict:
    """Run ``script --worker *args out`` in a fresh Python (its peak RSS is its own) and read the JSON it wrote
    to ``out``; ``{"error": ...}`` with the last line of its stderr when it failed."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.path.dirname(os.path.dirname(script))}
    argv = [sys.executable, script, "--worker", *args, out]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)
