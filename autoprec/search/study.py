"""The Optuna study behind a search: its storage, its race-free creation, what it records, how workers share it.

A study records what its trials were judged under: the decision keys and
formats, the float32 baseline, the metric, a fingerprint of the data and the
sensitivity order the search follows. A study resumed for other keys, data
or metric is refused with a :class:`StudyError`; one resumed under another
budget is re-judged (the stored drops are kept, verdicts are recomputed),
and says so.

Several worker processes, on one machine or on many, may share one study.
They take turns through :func:`study_lock` to claim trials (a PostgreSQL
advisory lock, or a file lock beside a journal or SQLite file), and
:func:`reap` fails the trials of workers that died mid-trial: at once for a
dead process on this machine, and after :data:`GRACE_SECONDS` without a
heartbeat for one elsewhere (server storages record a heartbeat every
:data:`HEARTBEAT_SECONDS` while a trial runs, see :func:`heartbeat`).

>>> storage = open_storage("postgresql://user@db.example/autoprec")  # doctest: +SKIP
>>> _redact("postgresql://user:secret@db.example:5432/s")
'postgresql://***@db.example:5432/s'
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from autoprec.errors import ArgumentError, StudyError, describe
from autoprec.files import check_parent

logger = logging.getLogger("autoprec")

HEARTBEAT_SECONDS = 5  # how often a running trial on a server storage says that its worker is alive
GRACE_SECONDS = 30  # a trial silent for longer belongs to a dead worker on another machine
INSTALL = "pip install 'autoprec[distributed]'"
# dialect -> its drivers as (SQLAlchemy name, module), the preferred one first; and how to install one.
_DRIVERS = {
    "postgresql": ((("psycopg2", "psycopg2"), ("psycopg", "psycopg")), INSTALL),
    "mysql": ((("pymysql", "pymysql"),), "pip install pymysql"),
}
_SCHEMA_LOCK = 0x6175746F70726563  # "autoprec": the advisory lock held while Optuna creates its tables
_local_locks: dict[int, threading.Lock] = {}
_warned: set[str] = set()


def _redact(url: str) -> str:
    """The URL without its user and password, for messages."""
    head, _, rest = url.partition("://")
    return f"{head}://***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url


def _with_driver(text: str) -> str:
    """The URL with an installed driver named, ``postgres://`` spelled ``postgresql://``.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3 even where only
    psycopg2 (what ``autoprec[distributed]`` installs) is present, and refuses
    the short ``postgres://`` many hosts print; naming the driver avoids both.
    """
    import importlib

    head, _, rest = text.partition("://")
    dialect, _, driver = head.partition("+")
    dialect = "postgresql" if dialect == "postgres" else dialect
    if dialect not in _DRIVERS:
        return text
    drivers, install = _DRIVERS[dialect]
    wanted = [(d, m) for d, m in drivers if d == driver] if driver else list(drivers)
    for name, module in wanted:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return f"{dialect}+{name}://{rest}"
    if driver and not wanted:
        return f"{dialect}+{driver}://{rest}"  # a driver we do not know: SQLAlchemy says if it is missing
    names = " or ".join(m for _, m in wanted)
    raise ArgumentError(
        f"Expected the {names} driver for storage={_redact(text)!r}. Received: it is not installed. "
        f"Install it with {install}."
    )


def open_storage(storage: Any) -> Any:
    """An Optuna storage from a URL (``sqlite:///x.db``, ``postgresql://...``) or a journal file path.

    On PostgreSQL, Optuna's tables are created under an advisory lock, so
    workers started at the same instant on an empty database all come up.

    Raises:
        OutputError: the journal or SQLite file's directory does not exist.
        ArgumentError: the storage is of another type, its database driver is
            not installed, or its server cannot be reached.

    Example:
        >>> open_storage("runs/study.log")  # doctest: +SKIP
    """
    spec = _resolve(storage)
    if not isinstance(spec, str):
        return spec
    with _created_once(spec):
        return _rdb_storage(spec)


def check_storage(storage: Any) -> None:
    """Refuse a storage that cannot work, without creating or connecting to anything (tune calls it first).

    Raises:
        ArgumentError: not a URL, a journal path or an Optuna storage; an unknown database; a missing driver.
        OutputError: the journal or SQLite file's directory does not exist.

    >>> check_storage("notadb://x")
    Traceback (most recent call last):
    ...
    autoprec.errors.ArgumentError: Expected storage to be a database URL ...
    """
    if storage is None:
        return
    if not isinstance(storage, (str, os.PathLike)):
        _resolve(storage)  # an Optuna storage instance, or the typed error
        return
    text = os.fspath(storage)
    if "://" not in text:
        check_parent(text, what="study journal")
        return
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        check_parent(text[len("sqlite:///") :], what="SQLite study database")
    url = _with_driver(text)
    try:
        import sqlalchemy.engine

        sqlalchemy.engine.make_url(url).get_dialect()
    except Exception as exc:  # sqlalchemy: ArgumentError for a malformed URL, NoSuchModuleError for an unknown database
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArgumentError(
            f"Expected storage to be a database URL SQLAlchemy knows (sqlite:///study.db, "
            f"postgresql://user:pw@host/db) or a journal file path (study.log). Received: "
            f"storage={_redact(text)!r} ({first})."
        ) from None


def _resolve(storage: Any) -> Any:
    """None, an Optuna storage (a journal file's included), or an RDB URL with its driver named."""
    import optuna

    if storage is None or not isinstance(storage, (str, os.PathLike)):
        if storage is not None and not isinstance(storage, optuna.storages.BaseStorage):
            raise ArgumentError(
                f"Expected storage as a URL, a journal file path or an Optuna storage. "
                f"Received: storage={describe(storage)}."
            )
        return storage
    text = os.fspath(storage)
    if "://" not in text:
        from optuna.storages.journal import JournalFileBackend

        check_parent(text, what="study journal")
        return optuna.storages.JournalStorage(JournalFileBackend(text))
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        check_parent(text[len("sqlite:///") :], what="SQLite study database")
    return _with_driver(text)


def _unreachable(url: str, exc: BaseException) -> ArgumentError:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return ArgumentError(
        f"Expected a reachable database at storage={_redact(url)!r}. Received: {first}. Start the "
        "server, or check the host, port, user, password and database name in the URL."
    )


def _rdb_storage(url: str) -> Any:
    import optuna
    import sqlalchemy.exc

    server = url.startswith(("postgresql", "mysql"))
    # Heartbeats let a worker fail the trials of a dead worker on another machine (see reap()).
    beat: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS} if server else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, **beat)
    except ImportError as exc:
        raise ArgumentError(
            f"Expected a database driver for storage={_redact(url)!r}. Received: {exc.__cause__ or exc}. "
            f"Install the driver the URL names ({INSTALL} for PostgreSQL)."
        ) from None
    except sqlalchemy.exc.OperationalError as exc:
        if not server:
            raise  # SQLite's "database is locked" is a creation race: open_study retries it
        raise _unreachable(url, exc) from None


@contextlib.contextmanager
def _created_once(url: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock while Optuna creates its tables, types and version rows.

    Two processes creating them at once fail with ``duplicate key value
    violates unique constraint`` on ``CREATE TYPE studydirection``: Optuna's
    ``create_all`` checks, then creates. Under the lock the second finds them.
    """
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    import sqlalchemy.exc

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        try:
            connection = engine.connect()
        except sqlalchemy.exc.OperationalError as exc:
            raise _unreachable(url, exc) from None
        with connection, _advisory(connection, _SCHEMA_LOCK):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def _advisory(connection: Any, key: int) -> Iterator[None]:
    """A session-level PostgreSQL advisory lock; the server frees it if the worker dies holding it."""
    from sqlalchemy import text

    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
    connection.commit()
    try:
        yield
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        connection.commit()


def open_study(name: str, storage: Any, sampler: Any, *, attempts: int = 6) -> Any:
    """Create the study or load it; race-free when several workers start at the same instant.

    On PostgreSQL the storage and the study are created under an advisory
    lock. Other storages retry: two processes creating a SQLite schema at once
    get "database is locked" or "already exists", and the retry finds it made.

    Example:
        >>> study = open_study("s", "postgresql://db.example/autoprec", make_sampler(0))  # doctest: +SKIP
    """
    import optuna

    spec = _resolve(storage)
    for attempt in range(attempts):
        try:
            with _created_once(spec) if isinstance(spec, str) else contextlib.nullcontext():
                opened = _rdb_storage(spec) if isinstance(spec, str) else spec
                return optuna.create_study(
                    study_name=name, storage=opened, direction="maximize", load_if_exists=True, sampler=sampler
                )
        except Exception as exc:  # sqlalchemy errors differ by driver; only races are retried
            if attempt == attempts - 1 or not _is_creation_race(exc):
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def _is_creation_race(exc: Exception) -> bool:
    if isinstance(exc, ArgumentError):
        return False
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(
        k in text
        for k in (
            "integrityerror",
            "duplicate",
            "already exists",
            "unique constraint",
            "duplicatedstudyerror",
            "database is locked",
        )
    )


# ---------------------------------------------------------------------------
# Workers sharing one study


def _backend(study: Any) -> Any:
    import optuna

    # Optuna wraps an RDBStorage in a private cache layer (_CachedStorage); the engine is on the storage inside.
    inner = getattr(study._storage, "_backend", None)
    return inner if isinstance(inner, optuna.storages.RDBStorage) else study._storage


def study_lock(study: Any) -> contextlib.AbstractContextManager:
    """A lock that one worker of ``study`` at a time holds, on any machine, to claim its next trial.

    PostgreSQL: an advisory lock keyed by the study name. A journal or
    SQLite file: an exclusive ``flock`` on a file beside it (one machine, or a
    file system whose locks work across machines). In memory: a thread lock.
    Elsewhere (MySQL) claims are not atomic across processes, and it says so.

    Example:
        >>> with study_lock(study):  # doctest: +SKIP
        ...     pass
    """
    import optuna

    backend = _backend(study)
    url = str(getattr(backend, "url", ""))
    if url.startswith("postgresql"):
        key = int.from_bytes(hashlib.blake2b(study.study_name.encode(), digest_size=8).digest(), "big", signed=True)
        return _pooled_advisory(backend.engine, key)
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else None
    path = path or getattr(getattr(backend, "_backend", None), "_file_path", None)  # JournalFileBackend's file
    if path and path != ":memory:":
        return _flock(f"{path}.autoprec-lock")
    if not isinstance(backend, optuna.storages.InMemoryStorage) and type(backend).__name__ not in _warned:
        _warned.add(type(backend).__name__)
        logger.warning(
            "autoprec: %s has no cross-process lock here; workers sharing it may evaluate an assignment "
            "twice. Use PostgreSQL, a journal file or SQLite.",
            type(backend).__name__,
        )
    return _local_locks.setdefault(id(backend), threading.Lock())


@contextlib.contextmanager
def _pooled_advisory(engine: Any, key: int) -> Iterator[None]:
    with engine.connect() as connection, _advisory(connection, key):
        yield


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock, also when the process is killed


@contextlib.contextmanager
def heartbeat(study: Any, trial: Any) -> Iterator[None]:
    """While the block runs, record that ``trial``'s worker is alive (server storages only).

    Example:
        >>> with heartbeat(study, trial):  # doctest: +SKIP
        ...     evaluate(assignment)
    """
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; the grace period covers several
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="autoprec-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reap(study: Any) -> list[int]:
    """Fail the trials of dead workers, so that another worker takes their assignments again.

    A dead process on this machine is seen at once (:func:`fail_orphans`); a
    worker elsewhere, once its trial has gone :data:`GRACE_SECONDS` without a
    heartbeat (Optuna's ``fail_stale_trials``).

    Example:
        >>> reap(study)  # doctest: +SKIP
        [3]
    """
    import optuna

    failed = fail_orphans(study)
    if getattr(study._storage, "get_heartbeat_interval", lambda: None)():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # fail_stale_trials
            optuna.storages.fail_stale_trials(study)
    return failed


def fail_orphans(study: Any) -> list[int]:
    """Mark FAIL the trials left RUNNING by a worker of this machine that no longer exists (killed mid-trial).

    A trial records its worker (``host:pid``) when it is claimed. A worker on
    another machine cannot be checked from here: :func:`reap` waits for its
    heartbeat to go stale instead.

    Example:
        >>> fail_orphans(study)  # doctest: +SKIP
        [3]
    """
    import optuna

    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        name, _, pid = worker.rpartition(":")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker failed it first
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                failed.append(trial.number)
    if failed:
        logger.info("autoprec: marked %d trial(s) of a killed worker as failed: %s.", len(failed), failed)
    return failed


def _alive(pid: int) -> bool:
    """True while the process runs; a killed child that its parent has not reaped yet (a zombie) is dead."""
    from autoprec.files import process_alive

    if not process_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here: process_alive's answer stands


# ---------------------------------------------------------------------------
# What a study records


def evaluated_trials(study: Any) -> list[Any]:
    """The study's finished trials that hold a measurement: COMPLETE (within budget) and PRUNED over it.

    A PRUNED trial without the ``feasible`` attribute is a TPE proposal skipped without an evaluation.

    Example:
        >>> [t.user_attrs["drop"] for t in evaluated_trials(study)]  # doctest: +SKIP
    """
    import optuna

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=finished) if "feasible" in t.user_attrs]


#: The study's objective by tune's ``objective=``: what each COMPLETE trial's value is.
OBJECTIVE_NAMES = {"speed": "speedup_estimate", "size": "size_ratio"}


def name_objective(study: Any, objective: str) -> None:
    """Name the study's objective (Optuna's ``metric_names``, which optuna-dashboard shows), once."""
    import optuna

    name = OBJECTIVE_NAMES.get(objective, objective)
    if study.metric_names != [name]:
        with warnings.catch_warnings():  # set_metric_names is experimental in some Optuna releases
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([name])


def record_or_check(study: Any, facts: dict[str, Any], *, budget: str) -> tuple[str, ...]:
    """Record what this study is judged under, or check a resumed study describes the same search.

    Returns the sensitivity order the study's search follows: the one recorded
    by the worker that made the study, so that every worker proposes the same
    candidates even if their profiles ranked two close layers differently.

    Raises:
        StudyError: the stored study was made for other decisions, formats, data, metric or baseline.

    Example:
        >>> order = record_or_check(study, {"keys": ["d1"], "choices": ["float32", "mixed_float16"], ...},
        ...                         budget="0.5%")  # doctest: +SKIP
    """
    with study_lock(study):  # the first of several workers starting together records; the others check
        attrs = study.user_attrs
        if not attrs.get("keys"):
            for key, value in {**facts, "budgets": [budget]}.items():
                study.set_user_attr(key, value)
            return tuple(facts.get("order", ()))
        _check_same_search(study, attrs, facts)
        budgets = list(attrs.get("budgets", []))
        if budget not in budgets:
            logger.info(
                "autoprec: study %r was made under budget %s; its stored drops are judged again under %s.",
                study.study_name,
                budgets[-1] if budgets else "?",
                budget,
            )
            study.set_user_attr("budgets", budgets + [budget])
        stored = attrs.get("order")
        # A score-only order (the profile skipped the ablation because everything met the first budget) gives way
        # to a later run's ablation order: under a tighter budget the layers that cost a little matter, and only
        # the ablation measured them. Workers started together under one budget rank alike, so they still agree.
        rerank = attrs.get("ranked_by") == "fast" and facts.get("ranked_by") not in (None, "fast")
        if not stored or rerank or sorted(stored) != sorted(facts.get("order", stored)):
            stored = facts.get("order", ())
            study.set_user_attr("order", list(stored))
            study.set_user_attr("ranked_by", facts.get("ranked_by"))
        return tuple(stored)


def agreed_ruling(study: Any, ruled_out: dict[str, tuple[str, ...]], *, budget: str) -> dict[str, tuple[str, ...]]:
    """The choices the study's search rules out (``plan.Space.ruled_out``): those the first worker under the same
    budget recorded, so that every worker proposes the same candidates; under another budget, this run's own
    (a looser budget may allow what a tighter one ruled out), recorded for the workers that follow.
    """
    with study_lock(study):
        stored = study.user_attrs.get("ruled_out")
        if isinstance(stored, dict) and stored.get("budget") == budget:
            return {k: tuple(v) for k, v in stored.get("keys", {}).items()}
        study.set_user_attr("ruled_out", {"budget": budget, "keys": {k: list(v) for k, v in ruled_out.items()}})
        return dict(ruled_out)


def _check_same_search(study: Any, attrs: dict[str, Any], facts: dict[str, Any]) -> None:
    fix = f"Pass a new study_name= (or another storage) to start afresh; the stored study {study.study_name!r} is kept."
    if attrs.get("keys") != facts["keys"] or list(attrs.get("choices", ())) != list(facts["choices"]):
        raise StudyError(
            f"Expected the stored study {study.study_name!r} to search the same decisions and formats. "
            f"Received a study made for another model, granularity or candidates. {fix}"
        )
    for key, what in (("fingerprint", "evaluation data"), ("metric", "metric")):
        if key in attrs and attrs[key] != facts[key]:
            raise StudyError(
                f"Expected the stored study {study.study_name!r} to be judged on the same {what}. Received "
                f"{what} that differ from the run that made it: its stored drops would mean something else. {fix}"
            )
    baseline = facts["baseline"]
    if abs(float(attrs.get("baseline", baseline)) - baseline) > 1e-6 * max(1.0, abs(baseline)):
        raise StudyError(
            f"Expected the stored study {study.study_name!r} to share this run's float32 baseline "
            f"({baseline:.6g}); it recorded {attrs.get('baseline')}. The data or weights changed. {fix}"
        )


def trials_frame(study: Any, keys: list[str], measured: dict[int, float] | None = None):
    """One row per trial, from ``study.trials_dataframe()``, with the float32 decisions named.

    Example:
        >>> trials_frame(study, ["d1", "d2"]).columns  # doctest: +SKIP
    """
    import pandas as pd

    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    if frame.empty:
        return pd.DataFrame(columns=["trial", "state", "phase", "speedup_estimate", "drop", "feasible"])
    frame = frame.rename(
        columns={c: "speedup_estimate" for c in frame.columns if c == "value" or c.startswith("value_")}
    )
    frame = frame.rename(columns={"number": "trial"})
    frame.columns = [c[len("user_attrs_") :] if c.startswith("user_attrs_") else c for c in frame.columns]
    params = [f"params_{k}" for k in keys]
    frame["float32_units"] = [
        ";".join(k for k, p in zip(keys, params, strict=True) if p in frame and row.get(p, "float32") == "float32")
        if any(p in frame and isinstance(row.get(p), str) for p in params)
        else ""
        for row in frame.to_dict("records")
    ]
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("params_")])
    frame["state"] = frame["state"].astype(str).str.replace("TrialState.", "", regex=False)
    frame["measured_speedup"] = frame["trial"].map(measured or {})
    # Evaluated trials hold their sample count; the PRUNED markers of skipped TPE proposals hold none.
    frame["evaluated"] = frame["samples"].notna() if "samples" in frame else False
    if "speedup_estimate" in frame:  # a PRUNED (over-budget) trial keeps its estimate as its intermediate value
        values = {t.number: t for t in study.get_trials(deepcopy=False)}
        from autoprec.search.plan import objective_value

        frame["speedup_estimate"] = [objective_value(values[n]) if n in values else math.nan for n in frame["trial"]]
    for column in ("phase", "drop", "feasible", "rejected"):
        if column not in frame:
            frame[column] = None
    return frame
