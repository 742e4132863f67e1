"""benchmarks/gpu.py works end to end before a GPU is lent: its dry run, under JAX without TensorFlow.

``make test-jax`` selects it (marker ``gpu_benchmark``) with the JAX core, so
that it shares the two workers with the other tests instead of running after
them. Under another backend it is skipped: the script is written for JAX and
torch on a CUDA machine, and TensorFlow is not installed there.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.gpu_benchmark
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the GPU benchmark's dry run is checked under JAX")
def test_the_gpu_benchmark_runs_end_to_end_in_its_dry_run(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        # Generous: under make test this core runs at nice 19 beside the TensorFlow suite, on its idle time.
        timeout=1800,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    # Every variant of both models measured, each row naming its device, and tune's time at the end.
    for variant in ("float32", "global mixed_float16", "global mixed_bfloat16", "tuned float16", "tuned bfloat16"):
        assert text.count(f"| {variant} |") == 2, variant
    assert "| convnet |" in text and "GPT2CausalLM" in text and "jax on cpu" in text
    assert "tune wall time (both targets)" in text
