"""A tune worker run in a subprocess by the resume, parallel and distributed tests and the workers benchmark.

usage: python tune_worker.py MODEL.keras DATA.npz STORAGE STUDY N_TRIALS [--kill-after K] [--sleep S]
       [--search-only] [--barrier DIR --workers N] [--budget B] [--out POLICY.json]

``--kill-after K`` SIGKILLs the process as it starts evaluating its (K+1)-th
trial, which is then RUNNING in the study: a crash mid-trial. ``--sleep S``
makes each evaluation S seconds longer (a bigger model, for the scheduling).
``--barrier DIR --workers N`` holds the search until N workers are ready, so
that they search together, and prints the CPU and wall seconds of the search.
Prints ``done`` and the study's trial count.

It tunes for float16 with the three-way choice ``conftest.THREE_WAY``, so that on the planted
MLP the search has work to share, kill and resume.
"""

import argparse
import glob
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from conftest import THREE_WAY

import autoprec
from autoprec.search import plan as search

parser = argparse.ArgumentParser()
for name in ("model", "data", "storage", "study"):
    parser.add_argument(name)
parser.add_argument("n_trials", type=int)
parser.add_argument("--kill-after", type=int, default=None)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--out", default=None)
parser.add_argument("--search-only", action="store_true")
parser.add_argument("--barrier", default=None)
parser.add_argument("--workers", type=int, default=1)
parser.add_argument("--budget", default="0.5%")
args = parser.parse_args()

original_measure, original_run = search.Search._measure, search.Search.run
calls = {"n": 0}


def measure(self, key, assignment):
    if key not in self.cache:  # a search trial about to be evaluated
        if args.kill_after is not None and calls["n"] >= args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no tell(): a crash mid-trial
        calls["n"] += 1
        time.sleep(args.sleep)
    return original_measure(self, key, assignment)


def run(self):
    open(os.path.join(args.barrier, f"ready.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 300
    while len(glob.glob(os.path.join(args.barrier, "ready.*"))) < args.workers and time.monotonic() < deadline:
        time.sleep(0.02)
    cpu, wall = time.process_time(), time.monotonic()
    try:
        return original_run(self)
    finally:  # how many cores this worker kept busy while it searched (the workers benchmark reads it)
        print(f"search cpu_s={time.process_time() - cpu:.3f} wall_s={time.monotonic() - wall:.3f}", flush=True)


search.Search._measure = measure
if args.barrier:
    search.Search.run = run
model = keras.models.load_model(args.model)
with np.load(args.data) as archive:
    data = (archive["x"], archive["y"])
result = autoprec.tune(
    model,
    data,
    budget=args.budget,
    target="mixed_float16",
    candidates=THREE_WAY,
    n_trials=args.n_trials,
    seed=0,
    storage=args.storage,
    study_name=args.study,
    search_only=args.search_only,
    verbose=0,
)
if args.out:
    result.policy.save(args.out)
print("done", len(result.trials) if hasattr(result, "policy") else result.trials)
sys.exit(0)
