"""A tune worker run in a subprocess by the resume and parallel tests.

usage: python tune_worker.py MODEL.keras DATA.npz STORAGE STUDY N_TRIALS [--kill-after K] [--sleep S]
Prints the policy JSON path it wrote, if it finishes.
"""

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import autoprec  # noqa: E402
from autoprec import search  # noqa: E402

parser = argparse.ArgumentParser()
for name in ("model", "data", "storage", "study"):
    parser.add_argument(name)
parser.add_argument("n_trials", type=int)
parser.add_argument("--kill-after", type=int, default=None)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--out", default=None)
args = parser.parse_args()

original = search.Search._measure
calls = {"n": 0}


def measure(self, key, assignment):
    if key not in self.cache:  # a search trial about to be evaluated
        if args.kill_after is not None and calls["n"] >= args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no tell(): a crash mid-search
        calls["n"] += 1
        time.sleep(args.sleep)
    return original(self, key, assignment)


search.Search._measure = measure
model = keras.models.load_model(args.model)
with np.load(args.data) as archive:
    data = (archive["x"], archive["y"])
result = autoprec.tune(model, data, budget="0.5%", target="mixed_float16", n_trials=args.n_trials, seed=0,
                       storage=args.storage, study_name=args.study, verbose=0)
if args.out:
    result.policy.save(args.out)
print("done", len(result.trials))
sys.exit(0)
