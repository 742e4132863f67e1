"""The built-in example: train the digits CNN, tune it, write a report. ``make demo`` runs it.

>>> result = run_demo("reports/demo", n_trials=40)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any


def run_demo(output: str | os.PathLike = "reports/demo", *, n_trials: int = 40, epochs: int = 8, verbose: int = 1) -> Any:
    """Train the bundled digits CNN briefly, tune it for float16 with a training check, save everything."""
    from autoprec import examples
    from autoprec.tuner import tune

    train, val = examples.digits_data()
    model = examples.train(examples.digits_model(), *train, epochs=epochs)
    if verbose:
        print(f"autoprec demo: digits CNN trained {epochs} epochs on {len(train[0])} images; tuning on {len(val[0])}.")
    result = tune(
        model, val, budget="0.5%", target="mixed_float16", n_trials=n_trials, seed=0,
        verify="train", train_data=train, steps=60, verbose=verbose,
    )
    written = result.save(output)
    if verbose:
        print(f"autoprec demo: wrote {len(written)} files under {output}/ (open report.html)")
    return result
