"""The ``autoprec`` command: a thin layer over the public functions.

Exit codes: 0 success; 1 user error (bad arguments or files); 2 when no
layer could leave float32 within the budget (the result is all float32).

>>> main(["--version"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

EXIT_OK, EXIT_USER_ERROR, EXIT_ALL_FLOAT32 = 0, 1, 2


def _load_model(path: str, *, unsafe: bool) -> Any:
    import keras

    from autoprec.errors import DataError

    if not os.path.exists(path):
        raise DataError(f"Expected a saved Keras model file. Received: {path!r}, which does not exist.")
    try:
        # safe_mode refuses lambda layers and arbitrary code in the file: a model file is untrusted input.
        return keras.models.load_model(path, safe_mode=not unsafe)
    except Exception as exc:
        raise DataError(
            f"Could not load the Keras model {path!r}: {exc}. If it contains Lambda layers and you trust "
            "its source, pass --unsafe."
        ) from None


def _load_npz(path: str) -> tuple:
    import numpy as np

    from autoprec.errors import DataError

    try:
        with np.load(path, allow_pickle=False) as archive:  # never unpickle an untrusted file
            if "x" not in archive or "y" not in archive:
                raise DataError(f"Expected {path!r} to hold arrays named 'x' and 'y'. Received: {sorted(archive.files)}.")
            return archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"Expected a NumPy .npz file with arrays 'x' and 'y'. Received {path!r}: {exc}.") from None


def _cmd_layers(args: argparse.Namespace) -> int:
    from autoprec.graph import build_graph

    model = _load_model(args.model, unsafe=args.unsafe)
    frame = build_graph(model).to_frame()
    _print_frame(frame[["path", "class", "params", "flops", "decision_unit", "pinned", "policy"]])
    return EXIT_OK


def _cmd_apply(args: argparse.Namespace) -> int:
    from autoprec.apply import apply_policy
    from autoprec.policy import PrecisionPolicy

    model = _load_model(args.model, unsafe=args.unsafe)
    policy = PrecisionPolicy.load(args.policy)
    tuned = apply_policy(model, policy)
    tuned.save(args.output)
    print(f"wrote {args.output}: {policy!r}")
    return EXIT_OK


def _cmd_profile(args: argparse.Namespace) -> int:
    from autoprec.sensitivity import profile

    model = _load_model(args.model, unsafe=args.unsafe)
    frame = profile(model, _load_npz(args.data), target=args.target, method=args.method, verbose=args.verbose)
    if args.output:
        frame.to_csv(args.output, index=False)
        print(f"wrote {args.output}")
    columns = [c for c in ("path", "class", "metric_drop", "output_error", "score", "act_absmax", "act_overflow", "sqnr_db") if c in frame]
    _print_frame(frame[columns].head(args.top))
    return EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    from autoprec.tuner import tune

    model = _load_model(args.model, unsafe=args.unsafe)
    train = _load_npz(args.train_data) if args.train_data else None
    result = tune(
        model,
        _load_npz(args.data),
        budget=args.budget,
        target=args.target,
        n_trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        seed=args.seed,
        granularity=args.granularity,
        train_data=train,
        verify="train" if args.verify_train else "eval",
        steps=args.steps,
        pretrain_steps=args.pretrain_steps,
        verbose=args.verbose,
    )
    result.save(args.output)
    print(result.summary())
    print(f"wrote {args.output}")
    return EXIT_ALL_FLOAT32 if result.all_float32 else EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from autoprec.report import write_report

    paths = write_report(args.directory)
    print("wrote " + ", ".join(str(p) for p in paths))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from autoprec.demo import run_demo

    result = run_demo(args.output, n_trials=args.trials, verbose=args.verbose)
    return EXIT_ALL_FLOAT32 if result.all_float32 else EXIT_OK


def _print_frame(frame: Any) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 500, "display.width", 160, "display.max_columns", 20):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def build_parser() -> argparse.ArgumentParser:
    from autoprec import __version__

    parser = argparse.ArgumentParser(prog="autoprec", description="Per-layer mixed precision for Keras under an accuracy budget.")
    parser.add_argument("--version", action="version", version=f"autoprec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="a model saved with model.save('x.keras')")
        p.add_argument("--unsafe", action="store_true", help="load with safe_mode=False (only for files you trust)")

    p = sub.add_parser("layers", help="print the model graph: paths, FLOPs, decision units, pins")
    model_arg(p)
    p.set_defaults(fn=_cmd_layers)

    p = sub.add_parser("apply", help="apply a policy JSON to a model and save the result")
    model_arg(p)
    p.add_argument("--policy", required=True, help="policy.json written by autoprec")
    p.add_argument("-o", "--output", required=True, help="where to write the .keras model")
    p.set_defaults(fn=_cmd_apply)

    p = sub.add_parser("profile", help="per-layer sensitivity to 16-bit")
    model_arg(p)
    p.add_argument("--data", required=True, help="DATA.npz with arrays x and y (evaluation data)")
    p.add_argument("--target", default="mixed_float16", choices=["mixed_float16", "mixed_bfloat16", "auto"])
    p.add_argument("--method", default="full", choices=["full", "fast", "ablation"])
    p.add_argument("-o", "--output", help="write the table as CSV")
    p.add_argument("--top", type=int, default=30, help="rows to print (default 30)")
    p.add_argument("--verbose", type=int, default=1)
    p.set_defaults(fn=_cmd_profile)

    p = sub.add_parser("tune", help="search per-layer precision under an accuracy budget")
    model_arg(p)
    p.add_argument("--data", required=True, help="DATA.npz with arrays x and y (evaluation data)")
    p.add_argument("--budget", required=True, help="largest allowed metric drop: 0.5%%, 0.005, or '1%% relative'")
    p.add_argument("--target", default="mixed_float16", choices=["mixed_float16", "mixed_bfloat16", "auto"])
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    p.add_argument("--storage", help="Optuna storage URL (sqlite:///x.db) or a journal file path, to resume or share")
    p.add_argument("--study-name", help="study name within the storage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--granularity", default="layer", choices=["layer", "block"])
    p.add_argument("--train-data", help="DATA.npz for pretraining or the training check")
    p.add_argument("--verify-train", action="store_true", help="also run a short loss-scaled training check")
    p.add_argument("--steps", type=int, default=50, help="training-check steps")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("-o", "--output", required=True, help="directory for policy.json, reports and the tuned model")
    p.add_argument("--verbose", type=int, default=1)
    p.set_defaults(fn=_cmd_tune)

    p = sub.add_parser("report", help="regenerate report.md/report.html and plots from a saved result directory")
    p.add_argument("directory")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("demo", help="tune the bundled digits model and write a report")
    p.add_argument("-o", "--output", default="reports/demo")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--verbose", type=int, default=1)
    p.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from autoprec.errors import AutoprecError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments; ours is 1
        return EXIT_OK if exc.code == 0 else EXIT_USER_ERROR
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", 1) else logging.WARNING, format="%(message)s")
    try:
        return args.fn(args)
    except AutoprecError as exc:
        print(f"autoprec: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
