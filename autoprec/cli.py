"""The ``autoprec`` command: a thin layer over the public functions.

Exit codes: 0 success; 1 user error (bad arguments or files, one line on
stderr naming the file and the fix, never a traceback); 2 when no layer
could leave float32 within the budget (the result is all float32); 3 when
the verified result is over the budget after every fallback allowed; 130
when interrupted (Ctrl-C), with the hint to resume.

>>> main(["--version"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

EXIT_OK, EXIT_USER_ERROR, EXIT_ALL_FLOAT32, EXIT_INFEASIBLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _load_model(path: str, *, unsafe: bool, imports: list[str] | None = None) -> Any:
    from autoprec.files import check_model_file, import_modules, load_model_file

    check_model_file(path)  # a wrong path fails before the user's modules (and Keras) are imported
    import_modules(imports or [])
    return load_model_file(path, safe_mode=not unsafe)


def _check_npz_path(path: str) -> None:
    from autoprec.errors import DataError

    if not os.path.isfile(path):
        raise DataError(
            f"Expected a NumPy .npz file with arrays 'x' and 'y'. Received {path!r}, which "
            f"{'is a directory' if os.path.isdir(path) else 'does not exist'}."
        )


def _load_npz(path: str) -> tuple:
    import zipfile

    import numpy as np

    from autoprec.errors import DataError

    _check_npz_path(path)
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"Expected a NumPy .npz archive with arrays 'x' and 'y' (np.savez('{path}', x=x, y=y)). "
            f"Received {path!r}, which is not one (a .npy holds one array; a truncated .npz is not a zip)."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:  # never unpickle an untrusted file
            x, y = _npz_part(archive, "x"), _npz_part(archive, "y")
            if x is None or y is None:
                raise DataError(
                    f"Expected the NumPy .npz file {path!r} to hold arrays named 'x' and 'y' "
                    f"(np.savez(path, x=x, y=y)), or one per named input as 'x/<input name>'. Received arrays "
                    f"{sorted(archive.files)}."
                )
            weights = _npz_part(archive, "sample_weight")
            return (x, y) if weights is None else (x, y, weights)
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"Expected a readable NumPy .npz file with arrays 'x' and 'y'. Received {path!r}: {exc}."
        ) from None


_DATA_HELP = "DATA.npz with arrays x (or x/<input name>) and y, optionally sample_weight (evaluation data)"


def _npz_part(archive: Any, name: str) -> Any:
    """The array ``name`` of an .npz archive, or a dict of the arrays ``name/<key>`` (a model's named inputs or
    outputs), or None.

    >>> import io, numpy as np
    >>> buffer = io.BytesIO(); np.savez(buffer, **{"x/token_ids": np.zeros(2), "y": np.ones(2)}); _ = buffer.seek(0)
    >>> archive = np.load(buffer)
    >>> sorted(_npz_part(archive, "x")), _npz_part(archive, "sample_weight") is None
    (['token_ids'], True)
    """
    if name in archive.files:
        return archive[name]
    named = {key[len(name) + 1 :]: archive[key] for key in archive.files if key.startswith(name + "/")}
    return named or None


def _cmd_layers(args: argparse.Namespace) -> int:
    from autoprec.graph import build_graph

    frame = build_graph(_load_model(args.model, unsafe=args.unsafe, imports=args.imports)).to_frame()
    _print_frame(frame[["path", "class", "role", "params", "flops", "decision_unit", "pinned", "policy"]])
    return EXIT_OK


def _cmd_apply(args: argparse.Namespace) -> int:
    from autoprec.apply import apply_policy
    from autoprec.errors import OutputError
    from autoprec.files import check_parent
    from autoprec.policy import PrecisionPolicy

    if not args.output.endswith(".keras"):
        raise OutputError(
            f"Expected -o to name a .keras file. Received {args.output!r}; Keras saves models as NAME.keras."
        )
    check_parent(args.output, what="model file")
    model = _load_model(args.model, unsafe=args.unsafe, imports=args.imports)
    policy = PrecisionPolicy.load(args.policy)
    tuned = apply_policy(model, policy)
    tuned.save(args.output)
    print(f"wrote {args.output}: {policy!r}")
    return EXIT_OK


def _cmd_measure(args: argparse.Namespace) -> int:
    """Time training steps of each policy against float32 here, and score their drop: the deployment check."""
    from autoprec.files import check_model_file, check_parent

    check_model_file(args.model)
    _check_npz_path(args.data)
    from autoprec.errors import DataError

    for path in args.policy:
        if not os.path.isfile(path):
            raise DataError(
                f"Expected a policy JSON file (policy.json from autoprec tune). Received {path!r}: no such file."
            )
    if args.output:
        check_parent(args.output, what="measurement CSV")
    from autoprec.verify.measured import measure

    model = _load_model(args.model, unsafe=args.unsafe, imports=args.imports)
    frame = measure(
        model,
        _load_npz(args.data),
        list(args.policy),
        steps=args.steps,
        metric=args.metric,
        budget=args.budget,
        confidence=args.confidence,
    )
    print(f"Device: {frame.attrs['device']} ({args.steps} training steps per variant, interleaved)")
    _print_frame(frame.drop(columns=["device"]))
    if args.output:
        frame.to_csv(args.output, index=False)
        print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_profile(args: argparse.Namespace) -> int:
    from autoprec.files import check_parent
    from autoprec.profiling.sensitivity import profile
    from autoprec.profiling.stats import ACT_ABSMAX, ACT_OVERFLOW

    if args.output:
        check_parent(args.output, what="profile CSV")
    model = _load_model(args.model, unsafe=args.unsafe, imports=args.imports)
    frame = profile(model, _load_npz(args.data), target=args.target, method=args.method, verbose=args.verbose)
    if args.output:
        frame.to_csv(args.output, index=False)
        print(f"wrote {args.output}")
    columns = [
        c
        for c in (
            "path",
            "class",
            "kind",
            "metric_drop",
            "ablation",
            "group_drop",
            "output_error",
            "score",
            ACT_ABSMAX,
            ACT_OVERFLOW,
            "sqnr_db",
        )
        if c in frame
    ]
    _print_frame(frame[columns].head(args.top))
    if "ablation" in frame and frame["ablation"].astype(str).str.startswith("cleared").any():
        print(
            "metric_drop is empty (NaN) for a layer 'cleared in a group': the layers were switched to 16-bit together "
            "and the group lost no more than the tolerance (group_drop), so none was measured alone."
        )
    return EXIT_OK


def _tune_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The model, the evaluation data and the training data (or None) that ``tune`` reads, loaded and checked."""
    model = _load_model(args.model, unsafe=args.unsafe, imports=args.imports)
    return model, _load_npz(args.data), _load_npz(args.train_data) if args.train_data else None


def _tune_options(args: argparse.Namespace, train: Any) -> dict[str, Any]:
    options = dict(
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
        metric=args.metric,
        keep_float32=tuple(args.keep_float32),
        force_16bit=tuple(args.force_16bit),
        objective=args.objective,
        device=args.device,
        cost=args.cost,
        max_fallbacks=args.max_fallbacks,
        batch_size=args.batch_size,
        nonfinite_inputs=args.nonfinite_inputs,
        confidence=_confidence(args.confidence),
        holdout=args.holdout if args.holdout == "auto" else _holdout(args.holdout),  # "none" -> None
    )
    if args.candidates:
        options["candidates"] = tuple(c.strip() for c in args.candidates.split(",") if c.strip())
    if args.higher_is_better is not None:
        options["higher_is_better"] = args.higher_is_better == "yes"
    return options


def _float(text: str, flag: str) -> float:
    from autoprec.errors import ArgumentError

    try:
        return float(text)
    except ValueError:
        raise ArgumentError(f"Expected {flag} as a number (e.g. 0.95) or none. Received: {text!r}.") from None


def _confidence(text: str) -> float | str | None:
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    return _float(text, "--confidence")


def _holdout(text: str) -> float | None:
    return None if text.lower() in ("none", "0") else _float(text, "--holdout")


def _check_tune_args(args: argparse.Namespace) -> None:
    """Every argument tune will validate, validated now: before Keras or TensorFlow is imported, and before any file
    is read. The training data stands in as its path; the files are only checked to exist."""
    from autoprec.options import TuneOptions

    options = _tune_options(args, args.train_data)
    if options.get("target") == "auto":
        options["target"] = None  # "auto" reads this machine (a GPU? TensorFlow); the rest is checked without it
    TuneOptions.create(options.pop("budget"), **options)
    from autoprec.files import check_model_file

    check_model_file(args.model)
    for path in (args.data, args.train_data):
        if path:
            _check_npz_path(path)


def _check_output(path: str, *, overwrite: bool) -> None:
    """A result directory is replaced only when asked: a second run must not silently overwrite the first."""
    from autoprec.errors import OutputError

    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        held = sorted(os.listdir(path))
        raise OutputError(
            f"Expected -o to name a new or empty directory. Received {path!r}, which already holds "
            f"{', '.join(held[:4])}{' ...' if len(held) > 4 else ''}. Pass --overwrite to replace that "
            "result, or another -o."
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"Expected -o to name a directory. Received {path!r}, which is a file.")


def _cmd_search_only(args: argparse.Namespace) -> int:
    """A worker: add trials to the shared study, verify and write nothing (the run without --search-only does)."""
    from autoprec.errors import ArgumentError
    from autoprec.search.study import open_storage
    from autoprec.tuner import tune

    if not args.storage:
        raise ArgumentError(
            "Expected --storage URL (and --study-name) with --search-only: a worker adds trials to a "
            "shared study. Received no --storage."
        )
    if args.output:
        print(f"autoprec: --search-only writes nothing; -o {args.output} is left alone.", file=sys.stderr)
    _check_tune_args(args)
    open_storage(args.storage)
    model, data, train = _tune_inputs(args)
    result = tune(model, data, **_tune_options(args, train), search_only=True)
    print(result.summary())
    return EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    from autoprec.errors import ArgumentError
    from autoprec.files import DirectoryLock
    from autoprec.search.study import open_storage
    from autoprec.tuner import tune

    if args.search_only:
        return _cmd_search_only(args)
    if not args.output:
        raise ArgumentError(
            "Expected -o DIR for the policy, the reports and the tuned model. Received no -o (only a "
            "--search-only worker writes nothing)."
        )
    # Everything that can be checked before the search is: the arguments (before any heavy import), the output
    # directory (and its lock, held for the whole run), the storage, the files.
    _check_tune_args(args)
    with DirectoryLock(args.output):
        _check_output(args.output, overwrite=args.overwrite)
        if args.storage:
            open_storage(args.storage)
        model, data, train = _tune_inputs(args)
        try:
            result = tune(model, data, **_tune_options(args, train))
        except BaseException as exc:
            if not interrupted(exc):
                raise
            resume = (
                f"resume with the same --storage {args.storage} --study-name {args.study_name or '(the default)'}"
                if args.storage
                else "pass --storage FILE --study-name NAME to make a search resumable"
            )
            print(f"autoprec: interrupted; {resume}. Finished trials are kept in the storage.", file=sys.stderr)
            return EXIT_INTERRUPTED
        result.save(args.output, lock=False)  # this run holds the lock
    print(result.summary())
    print(f"wrote {args.output}")
    if not result.feasible:
        print(
            f"autoprec: the verified result is over the budget: {result.verification.get('why', '')}", file=sys.stderr
        )
        return EXIT_INFEASIBLE
    return EXIT_ALL_FLOAT32 if result.all_float32 else EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from autoprec.report.pages import write_report

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


def _add_measure(sub: Any, model_arg: Any) -> None:
    p = sub.add_parser(
        "measure",
        help="time training steps and score the drop of policies against float32 on this machine",
        description="Confirm or re-rank policies (tuned elsewhere with the cost model) on the machine that will "
        "train: measured step times, interleaved, and each policy's real drop. Every figure names this device.",
    )
    model_arg(p)
    p.add_argument("--policy", action="append", required=True, help="a policy JSON from autoprec tune; repeatable")
    p.add_argument("--data", required=True, help="DATA.npz with arrays x and y: scored, and the timed steps' batches")
    p.add_argument("--budget", default=None, help="with one, say whether each policy's drop is within it (0.5%%)")
    p.add_argument("--metric", default=None, help="the metric to score (default: the model's compiled one)")
    p.add_argument("--confidence", type=float, default=None, help="judge the drop by its upper bound (e.g. 0.95)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant (default 20)")
    p.add_argument("-o", "--output", help="write the table as CSV")
    p.set_defaults(fn=_cmd_measure)


def build_parser() -> argparse.ArgumentParser:
    from autoprec import __version__

    parser = argparse.ArgumentParser(
        prog="autoprec", description="Per-layer mixed precision for Keras under an accuracy budget."
    )
    parser.add_argument("--version", action="version", version=f"autoprec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="a model saved with model.save('x.keras')")
        p.add_argument("--unsafe", action="store_true", help="load with safe_mode=False (only for files you trust)")
        p.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="a module or .py file to import first: the one that registers the model's custom layers "
            "(@keras.saving.register_keras_serializable); repeatable",
        )

    p = sub.add_parser("layers", help="print the model graph: paths, FLOPs, roles, pins")
    model_arg(p)
    p.set_defaults(fn=_cmd_layers)

    p = sub.add_parser("apply", help="apply a policy JSON to a model and save the result")
    model_arg(p)
    p.add_argument("--policy", required=True, help="policy.json written by autoprec")
    p.add_argument("-o", "--output", required=True, help="where to write the .keras model")
    p.set_defaults(fn=_cmd_apply)

    from autoprec.formats import TARGETS

    targets = [*TARGETS, "auto"]
    p = sub.add_parser("profile", help="per-layer sensitivity to 16-bit")
    model_arg(p)
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--target", default="mixed_float16", choices=targets)
    p.add_argument("--method", default="full", choices=["full", "fast", "ablation"])
    p.add_argument("-o", "--output", help="write the table as CSV")
    p.add_argument("--top", type=int, default=30, help="rows to print (default 30)")
    p.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress per stage (default)")
    p.set_defaults(fn=_cmd_profile)

    _add_tune(sub.add_parser("tune", help="search per-layer precision under an accuracy budget"), model_arg, targets)

    _add_measure(sub, model_arg)

    p = sub.add_parser("report", help="regenerate report.md/report.html and plots from a saved result directory")
    p.add_argument("directory")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("demo", help="tune the bundled digits model and write a report")
    p.add_argument("-o", "--output", default="reports/demo")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress per stage (default)")
    p.set_defaults(fn=_cmd_demo)
    return parser


def _add_tune(p: argparse.ArgumentParser, model_arg: Any, targets: list[str]) -> None:
    model_arg(p)
    _add_tune_choices(p, targets)
    _add_tune_cost(p)
    _add_tune_search(p)
    _add_tune_data(p)
    p.set_defaults(fn=_cmd_tune)


def _add_tune_choices(p: argparse.ArgumentParser, targets: list[str]) -> None:
    """What the policy may hold and what it is judged on: formats, metric, pins."""
    from autoprec.formats import LOW_PRECISION, QUANTIZED_MODES

    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--budget", required=True, help="largest allowed metric drop: 0.5%%, 0.005, or '1%% relative'")
    p.add_argument(
        "--target",
        default=None,
        choices=targets,
        help="the preferred 16-bit format (default mixed_float16, or the one --candidates offers); auto: "
        "float16 on a CUDA GPU, else bfloat16",
    )
    p.add_argument(
        "--candidates",
        metavar="LIST",
        help="comma-separated formats to choose from, float32 first, e.g. float32,mixed_bfloat16,int8 "
        f"(among {', '.join(('float32', *LOW_PRECISION, *QUANTIZED_MODES))}); default float32 and --target",
    )
    p.add_argument(
        "--metric",
        help="a Keras metric name (accuracy, auc, mse...) or 'loss'; default the model's first "
        "compiled metric, else its loss",
    )
    p.add_argument(
        "--higher-is-better",
        choices=["yes", "no"],
        default=None,
        help="the metric's direction, for a metric Keras does not know",
    )
    p.add_argument(
        "--keep-float32",
        action="append",
        default=[],
        metavar="PATH",
        help="a layer path or full-match regex that stays float32 (repeatable)",
    )
    p.add_argument(
        "--force-16bit",
        action="append",
        default=[],
        metavar="PATH",
        help="a layer path or full-match regex that computes in 16-bit whatever the search finds (repeatable)",
    )


def _add_tune_cost(p: argparse.ArgumentParser) -> None:
    """What the search maximises, and on which device's terms."""
    from autoprec.options import COSTS, OBJECTIVES
    from autoprec.search.cost import DEVICE_NAMES

    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=None,
        help="what the search maximises: estimated speed-up (default) or weight-size ratio (default with "
        "int8/int4 candidates)",
    )
    p.add_argument(
        "--device",
        choices=list(DEVICE_NAMES),
        default=None,
        help="where the policy will run, for the cost model: default gpu; 'this' for the machine tune runs on",
    )
    p.add_argument(
        "--cost",
        choices=list(COSTS),
        default="estimate",
        help="rank by the cost model, or also time the best candidates' real training steps here",
    )


def _add_tune_search(p: argparse.ArgumentParser) -> None:
    """How the search runs: trials, time, storage, seed, granularity, confidence, held-out part, fallbacks."""
    from autoprec.search.space import GRANULARITIES

    p.add_argument("--trials", type=int, default=60, help="the most trials the study may hold (default 60)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the search (default: no limit)")
    p.add_argument(
        "--storage",
        help="Optuna storage URL (sqlite:///x.db, postgresql://...) or a journal file path, "
        "to resume or share the search",
    )
    p.add_argument(
        "--study-name", help="study name within the storage (default: one made from the model, target, budget and seed)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the search's proposals (default 0)")
    p.add_argument(
        "--granularity",
        default="layer",
        choices=list(GRANULARITIES),
        help="one decision per layer, or per block (nested model or name prefix)",
    )
    p.add_argument(
        "--confidence",
        default="auto",
        help="judge the budget by the drop's upper bound at this confidence (e.g. 0.95); none: the drop itself; "
        "auto (default): 0.95 where the data can resolve the budget at it",
    )
    p.add_argument(
        "--holdout",
        default="none",
        help="fraction of the data the search never sees, checked at verification; auto (a fifth from 5,000 "
        "samples on), or none (default)",
    )
    p.add_argument(
        "--max-fallbacks",
        type=int,
        default=8,
        help="decisions verification may return to float32 before giving up (default 8)",
    )


def _add_tune_data(p: argparse.ArgumentParser) -> None:
    """Data, the training check, and where the result goes."""
    from autoprec.data import NONFINITE_MODES

    p.add_argument(
        "--batch-size", default="auto", type=_batch_size, help="evaluation batch size, or auto (fits memory)"
    )
    p.add_argument(
        "--nonfinite-inputs",
        choices=list(NONFINITE_MODES),
        default="raise",
        help="refuse evaluation samples holding NaN/inf (default), or drop them with a warning",
    )
    p.add_argument("--train-data", help="DATA.npz for pretraining or the training check")
    p.add_argument("--verify-train", action="store_true", help="also run a short loss-scaled training check")
    p.add_argument("--steps", type=int, default=50, help="training-check steps (default 50)")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="train a float32 copy for this many steps first (needs --train-data)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a result already in -o")
    p.add_argument(
        "-o",
        "--output",
        help="directory for policy.json, reports and the tuned model (required, except with --search-only)",
    )
    p.add_argument(
        "--search-only",
        action="store_true",
        help="a worker: add trials to the shared --storage study and "
        "exit, verifying and writing nothing; one run without it verifies and emits",
    )
    p.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress per stage (default)")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', received {text!r}") from None


def interrupted(exc: BaseException | None) -> bool:
    """A Ctrl-C, or an error a library raised while cleaning up after one.

    Optuna's journal-file lock, interrupted inside its release, raises
    FileNotFoundError from its cleanup; the user still pressed Ctrl-C.

    >>> try:
    ...     try:
    ...         raise KeyboardInterrupt
    ...     except KeyboardInterrupt:
    ...         raise FileNotFoundError("lock.rename")
    ... except OSError as exc:
    ...     interrupted(exc)
    True
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False


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
        if interrupted(exc):
            print("autoprec: interrupted.", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"autoprec: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("autoprec: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
