#!/usr/bin/env bash
# The autoprec command line end to end on a saved model and .npz data:
# layers, profile, tune, apply, report.
#
# It first saves what you would bring: a trained Keras model (the digits CNN
# of autoprec.demo) and its training and validation data as .npz files with
# arrays x and y. Then every subcommand runs once, as you would type it.
#
# Run it with `bash examples/cli.sh`. About 35 s on a laptop CPU,
# most of it six processes importing Keras; AUTOPREC_EXAMPLES_FAST=1 trains
# less and searches fewer trials (about 30 s).
# It works in reports/examples/cli/, or $AUTOPREC_EXAMPLES_OUT/cli/ (fast mode
# without it: a temporary directory). PYTHON picks the interpreter (default:
# the repository's .venv, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    PYTHON="$ROOT/.venv/bin/python"
    [ -x "$PYTHON" ] || PYTHON=python3
fi
FAST="${AUTOPREC_EXAMPLES_FAST:-0}"
if [ -n "${AUTOPREC_EXAMPLES_OUT:-}" ]; then BASE="$AUTOPREC_EXAMPLES_OUT"
elif [ "$FAST" = 1 ]; then BASE="$(mktemp -d)"
else BASE="$ROOT/reports/examples"; fi
WORK="$BASE/cli"
mkdir -p "$WORK"
cd "$WORK"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# `autoprec` is the installed command; this runs the same entry point with the chosen interpreter.
autoprec() { "$PYTHON" -m autoprec "$@"; }

echo "== 0. a trained model and its data, saved as model.keras, train.npz and val.npz (in $WORK)"
"$PYTHON" - "$FAST" <<'EOF'
import sys
import numpy as np
from autoprec.demo import digits_model
from autoprec.testing import digits_data, train

(x_train, y_train), (x_val, y_val) = digits_data()
train(digits_model(), x_train, y_train, epochs=2 if sys.argv[1] == "1" else 8).save("model.keras")
np.savez("train.npz", x=x_train, y=y_train)
np.savez("val.npz", x=x_val, y=y_val)
EOF

echo "== 1. the graph: paths, FLOPs, which layers are decisions, which are pinned"
autoprec layers model.keras

echo "== 2. per-layer sensitivity to bfloat16 (top 8 rows; the whole table in profile.csv)"
autoprec profile model.keras --data val.npz --target mixed_bfloat16 --top 8 -o profile.csv --verbose 0

echo "== 3. the search under a budget of half a point of accuracy, with a short training check"
TRIALS=20; STEPS=30; [ "$FAST" = 1 ] && TRIALS=8 && STEPS=10
status=0
# --overwrite: this script may be run again in the same folder; without it a second run refuses to replace run/.
autoprec tune model.keras --data val.npz --budget 0.5% --target auto --trials "$TRIALS" \
    --train-data train.npz --verify-train --steps "$STEPS" -o run --overwrite --verbose 0 || status=$?
# Exit codes: 0 a policy within the budget, 2 no layer could leave float32 (still a result), anything else an error.
[ "$status" -eq 0 ] || [ "$status" -eq 2 ] || exit "$status"

echo "== 4. the tuned policy put on the model: tuned.keras, same weights, per-layer policies"
autoprec apply model.keras --policy run/policy.json -o tuned.keras

echo "== 5. the report, regenerated from the saved files alone"
autoprec report run
echo "Report: $WORK/run/report.md (and report.html)"
