"""One study, several workers: search wall time with 1, 2 and 4 worker processes on one PostgreSQL study.

Each run starts a fresh database on a throwaway PostgreSQL server (the tests'
``tests/pgserver.py``) and W processes of ``tests/tune_worker.py``: one
finaliser and W-1 ``search_only`` workers, held at a barrier until all have
profiled, then searching one study of ``n_trials`` trials together. The
search's wall time is read from the study: the first trial's start to the
last trial's end. With default threads the runs go 1, 2, 4 workers, with
one thread 4, 2, 1, so that drift on the machine favours no count; every
run must end with the same policy.

The ceiling. The plan's first trials (all 16-bit, then the bisection over
how many sensitive layers fall back) depend on one another and run one at a
time, whatever the worker count; the later rounds hold at most ``ROUND`` (4)
independent trials. Above that, this machine has 2 cores: a worker whose
TensorFlow spreads each evaluation over both leaves a second worker little
to take, and a third and fourth only add contention. So the table is run
twice: with TensorFlow's default threads, and with one thread per worker
(``TF_NUM_INTRAOP_THREADS=1``), where 2 workers can keep 2 cores busy.

    python benchmarks/bench_workers.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from common import table

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
BUDGET = "1%"


def _model_and_data(directory: str) -> tuple[str, str]:
    """The planted MLP at width 512, and its validation digits tiled 16x with noise: ~0.2 s per trial here."""
    from autoprec import testing

    model, _, (x, y), _ = testing.planted_mlp(width=512, epochs=8)
    rng = np.random.default_rng(0)
    x = np.concatenate([x + rng.normal(scale=0.05, size=x.shape).astype("float32") for _ in range(16)])
    y = np.tile(y, 16)
    paths = os.path.join(directory, "model.keras"), os.path.join(directory, "val.npz")
    model.save(paths[0])
    np.savez(paths[1], x=x, y=y)
    return paths


def _one_run(server, paths, workers: int, n_trials: int, threads: int | None, tag: str) -> dict:
    import optuna

    import autoprec
    from autoprec.search.study import open_storage

    url = server.create_database(tag)
    barrier = tempfile.mkdtemp(prefix="autoprec-barrier-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), TESTS]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads))
    policy = os.path.join(barrier, "policy.json")
    command = [
        sys.executable,
        os.path.join(TESTS, "tune_worker.py"),
        *paths,
        url,
        "s",
        str(n_trials),
        "--budget",
        BUDGET,
        "--barrier",
        barrier,
        "--workers",
        str(workers),
    ]
    procs = [
        subprocess.Popen(
            command + (["--search-only"] if i else ["--out", policy]),
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(workers)
    ]
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {[err[-1500:] for _, err in outs]}")
    searched = [
        dict(f.split("=") for f in line.split()[1:])
        for out, _ in outs
        for line in out.splitlines()
        if line.startswith("search ")
    ]
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    finished = [t for t in study.trials if t.datetime_complete is not None and t.state.name != "FAIL"]
    first, last = min(t.datetime_start for t in finished), max(t.datetime_complete for t in finished)
    complete = [t for t in finished if t.state.name == "COMPLETE"]
    took = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in complete}
    sequential = [t.number for t in complete if t.user_attrs.get("phase") in ("all_16bit", "fallback")]
    return {
        "workers": workers,
        "threads": threads or "default",
        "seconds": (last - first).total_seconds(),
        "evaluated": len(complete),
        "trials": len(finished),
        "sequential": len(sequential),
        "sequential_share": sum(took[n] for n in sequential) / max(sum(took.values()), 1e-9),
        "by_worker": sorted(
            sum(t.user_attrs.get("worker") == w for t in complete)
            for w in {t.user_attrs.get("worker") for t in complete}
        ),
        "cores_busy": sum(float(s["cpu_s"]) for s in searched) / max(float(s["wall_s"]) for s in searched),
        "policy": autoprec.PrecisionPolicy.load(policy),
    }


def run(workers=(1, 2, 4), n_trials: int = 24, threads=(None, 1), repeats: int = 1) -> tuple[str, list[dict]]:
    sys.path.insert(0, TESTS)
    from pgserver import PostgresServer

    from autoprec.search.plan import ROUND

    records = []
    with tempfile.TemporaryDirectory() as directory, PostgresServer() as server:
        paths = _model_and_data(directory)
        for t, thread in enumerate(threads):
            runs: dict[int, list[dict]] = {w: [] for w in workers}
            for r in range(repeats):  # 1, 2, 4, then 4, 2, 1: drift on the machine hits every count alike
                for w in workers if (t + r) % 2 == 0 else workers[::-1]:
                    runs[w].append(_one_run(server, paths, w, n_trials, thread, f"t{thread or 0}_w{w}_{r}"))
            base = statistics.median(r["seconds"] for r in runs[workers[0]])
            for w in workers:
                rec = dict(runs[w][0], seconds=statistics.median(r["seconds"] for r in runs[w]))
                rec["speedup"] = base / rec["seconds"]
                rec["same_policy"] = all(r["policy"] == rec["policy"] for rs in runs.values() for r in rs)
                records.append(rec)
    for rec in records:
        rec["ceiling"] = _ceiling(rec, records, ROUND)
    rows = [
        [
            r["threads"],
            r["workers"],
            r["seconds"],
            r["speedup"],
            r["ceiling"],
            r["cores_busy"],
            r["evaluated"],
            r["sequential"],
            "/".join(map(str, r["by_worker"])),
            r["same_policy"],
        ]
        for r in records
    ]
    text = table(
        [
            "TF threads per worker",
            "workers",
            "search wall s",
            "speed-up vs 1 worker",
            "ceiling (plan, cores)",
            "cores busy",
            "trials evaluated",
            "of them sequential",
            "evaluated per worker",
            "same policy as the others",
        ],
        rows,
    )
    return text, [{k: v for k, v in r.items() if k != "policy"} for r in records]


def _ceiling(rec: dict, records: list[dict], round_size: int) -> float:
    """Amdahl's bound: the sequential trials one at a time, the rest over as many lanes as the plan and cores allow.

    Lanes: at most the workers, at most ``ROUND``, and at most the cores over
    the cores one worker alone kept busy while it searched. The sequential
    share is that of one worker's evaluation seconds.
    """
    one = next(r for r in records if r["threads"] == rec["threads"] and r["workers"] == 1)
    lanes = min(rec["workers"], round_size, max(1.0, (os.cpu_count() or 1) / max(one["cores_busy"], 1e-9)))
    s = one["sequential_share"]  # of the evaluation time: a trial over budget stops early, so counts would mislead
    return 1.0 / (s + (1 - s) / lanes)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from common import machine

    print(machine())
    print(run()[0])
