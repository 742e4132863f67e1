"""Every script in examples/ runs in its fast mode, and the committed demo outputs show what they promise.

Each example runs as a user would run it (``python examples/NAME.py``,
``bash examples/cli.sh``) in a fresh process with ``AUTOPREC_EXAMPLES_FAST=1``
and ``AUTOPREC_EXAMPLES_OUT`` pointing at a temporary directory, so nothing
is written into the repository. A new script in examples/ is run here too,
with no checks beyond its exit status, until someone adds its own.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Scripts another test already runs in fast mode (running them twice costs CI time for nothing).
RUN_ELSEWHERE = {"adaptive_training.py": "tests/test_adaptive.py::test_example_runs_in_fast_mode"}
# What each example must print, and the files it must write under AUTOPREC_EXAMPLES_OUT.
CHECKS = {
    "quickstart.py": (["TuneResult(", "compute dtype", "The tuned model trained on"], ["quickstart/policy.json"]),
    "precision_table.py": (
        ["policy set after building: dense1 computes in float32", "| float64 |", "| mixed_float16 |", "| autoprec ("],
        ["precision_table.md"],
    ),
    "keras_applications.py": (["MobileNet:", "decisions (blocks", "Report:"], ["keras_applications/report.md"]),
    "transformer.py": (["embed              float32", "block1_ff1"], ["transformer/report.md"]),
    "cli.sh": (["== 5.", "wrote tuned.keras"], ["cli/run/report.md", "cli/tuned.keras", "cli/profile.csv"]),
}
# Fast scripts that tune with target="auto", which charges this CPU's kind: marked cpu_kind by hand (they run in a
# subprocess, where tests/conftest.py's guard cannot see). keras_applications.py and cli.sh do too, but slow tests
# run on this kind only.
CPU_KIND = {"quickstart.py", "precision_table.py"}
SLOW = {"keras_applications.py", "cli.sh"}  # over 30 s on 2 cores: MobileNet's graph; six processes importing Keras


def _scripts() -> list[str]:
    names = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_"))
    return [n for n in names if n not in RUN_ELSEWHERE]


def _run(name: str, out: pathlib.Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "AUTOPREC_EXAMPLES_FAST": "1",
        "AUTOPREC_EXAMPLES_OUT": str(out),
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHON": sys.executable,
    }
    command = ["bash", str(EXAMPLES / name)] if name.endswith(".sh") else [sys.executable, str(EXAMPLES / name)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in _scripts() if n not in CPU_KIND]
)
def test_example_runs_in_fast_mode(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.cpu_kind  # run as on both kinds of CPU (tests/conftest.py)
@pytest.mark.parametrize("name", sorted(CPU_KIND))
def test_example_that_tunes_for_this_cpu_runs_in_fast_mode(name, tmp_path):
    _check(name, tmp_path)


def _check(name: str, tmp_path: pathlib.Path) -> None:
    result = _run(name, tmp_path)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    printed, files = CHECKS.get(name, ([], []))
    missing = [text for text in printed if text not in result.stdout]
    assert not missing, f"{name} did not print {missing}:\n{result.stdout[-3000:]}"
    absent = [f for f in files if not (tmp_path / f).is_file()]
    assert not absent, f"{name} did not write {absent} under AUTOPREC_EXAMPLES_OUT"


def test_every_example_is_run_somewhere():
    scripts = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    assert {"quickstart.py", "precision_table.py", "keras_applications.py", "transformer.py", "cli.sh"} <= scripts
    assert set(RUN_ELSEWHERE) <= scripts, "a script said to be run elsewhere is gone: update RUN_ELSEWHERE"
    assert scripts == set(_scripts()) | set(RUN_ELSEWHERE)


def test_every_example_says_what_it_shows_and_how_long_it_takes():
    for path in EXAMPLES.iterdir():
        if path.suffix in (".py", ".sh") and not path.name.startswith("_"):
            head = " ".join(path.read_text(encoding="utf-8")[:3000].replace("#", " ").split())
            assert "AUTOPREC_EXAMPLES_FAST=1" in head and "on a laptop CPU" in head, path.name


# --- the committed outputs ----------------------------------------------------------------------------


def _rows(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_committed_demo_report_shows_the_hazards_found_and_ruled_out():
    """The profile finds both planted hazards, each breaking the budget alone, and rules them out of float16: the
    search's first trial then meets the budget (issue 27: it took 5 or more, most over the budget)."""
    demo = ROOT / "reports" / "demo"
    trials = [t for t in _rows(demo / "trials.csv") if t["evaluated"] == "True"]
    assert trials and trials[0]["phase"] == "all_16bit" and trials[0]["feasible"] == "True"
    layers = _rows(demo / "sensitivity.csv")
    kept = {r["path"]: r["reason"] for r in layers if r["kind"] == "decision" and r["decision"] == "float32"}
    assert {"conv1", "attn_logits"} <= set(kept), kept
    assert kept["conv1"] == "OVERFLOW"
    alone = {r["path"]: float(r["metric_drop"]) for r in layers if r["ablation"].startswith("alone")}
    assert alone["conv1"] > 0.005 and alone["attn_logits"] > 0.005  # each breaks the 0.5% budget alone
    report = (demo / "report.md").read_text(encoding="utf-8")
    assert "Estimated speed-up on a gpu" in report and "an estimate" in report
    assert "65504" in report  # the overflow, in words
    assert (
        demo.parent / "demo-screenshot.png"
    ).stat().st_size > 50_000  # beside reports/demo/, which each run rewrites


def test_committed_precision_table_has_every_variant_measured_in_one_run():
    text = (ROOT / "reports" / "precision_table.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip().split(" ")[0] for r in rows] == [
        "float64",
        "float32",
        "mixed_bfloat16",
        "mixed_float16",
        "autoprec",
    ]
    assert "in one run" in text and "slower than float32: mixed_float16" in text  # no fast float16 kernels on a CPU


@pytest.mark.slow
def test_demo_tunes_a_model_where_the_answer_is_not_trivial(tmp_path):
    from autoprec.demo import run_demo

    result = run_demo(tmp_path / "demo", n_trials=15, epochs=4, verbose=0)
    frame = result.sensitivity.set_index("path")
    assert (frame.loc[["conv1", "attn_logits"], "metric_drop"] > 0.005).all()  # found alone, ruled out of float16
    assert result.feasible and result.trials[result.trials["evaluated"]]["feasible"].iloc[0]
    decisions = result.units.set_index("path")["decision"]
    assert decisions["conv1"] == "float32" and decisions["attn_logits"] == "float32"
    assert decisions["conv2"] == "mixed_float16"  # most of the FLOPs still go to float16
    assert (tmp_path / "demo" / "report.html").is_file()
