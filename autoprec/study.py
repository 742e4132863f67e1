"""The Optuna study behind a search: its storage, its race-free creation, what it records, its trials table.

A study records what its trials were judged under: the decision keys and
formats, the float32 baseline, the metric and a fingerprint of the data. A
study resumed for other keys, data or metric is refused with a
:class:`StudyError`; one resumed under another budget is re-judged (the
stored drops are kept, verdicts are recomputed), and says so.

>>> storage = open_storage("runs/study.log")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

from autoprec.errors import ArgumentError, OutputError, StudyError, describe
from autoprec.files import check_parent

logger = logging.getLogger("autoprec")

_DRIVERS = {"postgresql": ("psycopg2", "pip install 'autoprec[distributed]'"), "mysql": ("pymysql", "pip install pymysql")}


def open_storage(storage: Any) -> Any:
    """An Optuna storage from a URL (``sqlite:///x.db``, ``postgresql://...``) or a journal file path.

    Raises:
        OutputError: the journal or SQLite file's directory does not exist.
        ArgumentError: the storage is of another type, or its database driver is not installed.
    """
    import optuna

    if storage is None or not isinstance(storage, (str, os.PathLike)):
        if storage is not None and not isinstance(storage, optuna.storages.BaseStorage):
            raise ArgumentError(f"Expected storage as a URL, a journal file path or an Optuna storage. "
                                f"Received: storage={describe(storage)}.")
        return storage
    text = os.fspath(storage)
    if "://" not in text:
        from optuna.storages.journal import JournalFileBackend

        check_parent(text, what="study journal")
        return optuna.storages.JournalStorage(JournalFileBackend(text))
    scheme = text.split("://", 1)[0].split("+", 1)[0]
    if scheme == "sqlite" and text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        check_parent(text[len("sqlite:///"):], what="SQLite study database")
    driver = _DRIVERS.get(scheme)
    if driver is not None and "+" not in text.split("://", 1)[0]:
        try:
            __import__(driver[0])
        except ImportError:
            raise ArgumentError(f"Expected the {driver[0]} driver for storage={text.split('@')[-1]!r}. It is not "
                                f"installed: {driver[1]}.") from None
    return optuna.storages.RDBStorage(text)


def open_study(name: str, storage: Any, sampler: Any, *, attempts: int = 6) -> Any:
    """Create the study or load it, retrying when several workers create the schema at the same instant.

    Two processes starting together on an empty PostgreSQL database race to
    create Optuna's tables and types; the loser gets an IntegrityError or a
    "duplicate" error. Both are transient: the retry finds the schema made.
    """
    import optuna

    for attempt in range(attempts):
        try:
            return optuna.create_study(study_name=name, storage=open_storage(storage), direction="maximize",
                                       load_if_exists=True, sampler=sampler)
        except Exception as exc:  # sqlalchemy errors differ by driver; only races are retried
            if attempt == attempts - 1 or not _is_creation_race(exc):
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def _is_creation_race(exc: Exception) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(k in text for k in ("integrityerror", "duplicate", "already exists", "unique constraint",
                                   "duplicatedstudyerror", "database is locked"))


def fail_orphans(study: Any) -> list[int]:
    """Mark FAIL the trials left RUNNING by a worker of this machine that no longer exists (killed mid-trial).

    A trial records its worker (``host:pid``) when it starts. A worker on
    another machine cannot be checked from here and is left alone.
    """
    import socket

    import optuna

    from autoprec.files import process_alive

    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        name, _, pid = worker.rpartition(":")
        if name == host and pid.isdigit() and not process_alive(int(pid)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            failed.append(trial.number)
    if failed:
        logger.info("autoprec: marked %d trial(s) of a killed worker as failed: %s.", len(failed), failed)
    return failed


def record_or_check(study: Any, facts: dict[str, Any], *, budget: str) -> None:
    """Record what this study is judged under, or check a resumed study describes the same search.

    Raises:
        StudyError: the stored study was made for other decisions, formats, data, metric or baseline.
    """
    attrs = study.user_attrs
    if not attrs.get("keys"):
        for key, value in {**facts, "budgets": [budget]}.items():
            study.set_user_attr(key, value)
        return
    fix = f"Pass a new study_name= (or another storage) to start afresh; the stored study {study.study_name!r} is kept."
    if attrs.get("keys") != facts["keys"] or list(attrs.get("choices", ())) != list(facts["choices"]):
        raise StudyError(f"Expected the stored study {study.study_name!r} to search the same decisions and formats. "
                         f"Received a study made for another model, granularity or candidates. {fix}")
    for key, what in (("fingerprint", "evaluation data"), ("metric", "metric")):
        if key in attrs and attrs[key] != facts[key]:
            raise StudyError(f"Expected the stored study {study.study_name!r} to be judged on the same {what}. Received "
                             f"{what} that differ from the run that made it: its stored drops would mean something else. {fix}")
    baseline = facts["baseline"]
    if abs(float(attrs.get("baseline", baseline)) - baseline) > 1e-6 * max(1.0, abs(baseline)):
        raise StudyError(f"Expected the stored study {study.study_name!r} to share this run's float32 baseline "
                         f"({baseline:.6g}); it recorded {attrs.get('baseline')}. The data or weights changed. {fix}")
    budgets = list(attrs.get("budgets", []))
    if budget not in budgets:
        logger.info("autoprec: study %r was made under budget %s; its stored drops are judged again under %s.",
                    study.study_name, budgets[-1] if budgets else "?", budget)
        study.set_user_attr("budgets", budgets + [budget])


def trials_frame(study: Any, keys: list[str], measured: dict[int, float] | None = None):
    """One row per trial, from ``study.trials_dataframe()``, with the float32 decisions named."""
    import pandas as pd

    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    if frame.empty:
        return pd.DataFrame(columns=["trial", "state", "phase", "speedup_estimate", "drop", "feasible"])
    frame = frame.rename(columns={"number": "trial", "value": "speedup_estimate"})
    frame.columns = [c[len("user_attrs_"):] if c.startswith("user_attrs_") else c for c in frame.columns]
    params = [f"params_{k}" for k in keys]
    frame["float32_units"] = [
        ";".join(k for k, p in zip(keys, params) if p in frame and row.get(p, "float32") == "float32") if any(
            p in frame and isinstance(row.get(p), str) for p in params) else ""
        for row in frame.to_dict("records")
    ]
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("params_")])
    frame["state"] = frame["state"].astype(str).str.replace("TrialState.", "", regex=False)
    frame["measured_speedup"] = frame["trial"].map(measured or {})
    for column in ("phase", "drop", "feasible", "rejected"):
        if column not in frame:
            frame[column] = None
    return frame
