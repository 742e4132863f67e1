"""Beyond one process: workers sharing a study on a real PostgreSQL server, and models under tf.distribute.

The PostgreSQL tests start their own server (tests/pgserver.py) and skip,
saying what to install, where its binaries are missing; with
AUTOPREC_REQUIRE_POSTGRES=1 (as .ci/run sets) they fail instead.
"""

import itertools
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest
from conftest import MODEL_BUILDERS, THREE_WAY, small_data, trained
from pgserver import REQUIRE, PostgresServer, Unavailable
from test_search import DROP, KEYS, estimate, outcome

import autoprec
from autoprec.cli import EXIT_ALL_FLOAT32, EXIT_OK, EXIT_USER_ERROR, main
from autoprec.errors import ArgumentError
from autoprec.search import study as study_module
from autoprec.search.plan import Search, Space, make_sampler
from autoprec.search.study import evaluated_trials, heartbeat, open_storage, open_study, reap

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
STATE = optuna.trial.TrialState
_names = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        server.start()
    except Unavailable as exc:
        server.stop()
        if os.environ.get(REQUIRE):
            pytest.fail(f"PostgreSQL is required here ({REQUIRE} is set) but cannot start: {exc}")
        pytest.skip(f"no PostgreSQL server can start here: {exc}")
    yield server
    server.stop()


@pytest.fixture()
def pg_url(postgres):
    """A fresh, empty database: Optuna's schema is not there yet."""
    return postgres.create_database(f"autoprec_{os.getpid()}_{next(_names)}")


# -- storage URLs and drivers (no server) ---------------------------------------------------------


def test_a_missing_driver_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # an import of it now fails, as if not installed
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ArgumentError, match=r"psycopg2 or psycopg driver.*autoprec\[distributed\]") as caught:
        open_storage("postgresql://alice:secret@db.example/autoprec")
    assert "secret" not in str(caught.value)


def test_urls_name_an_installed_driver():
    pytest.importorskip("psycopg2")
    assert study_module._with_driver("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert study_module._with_driver("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert study_module._with_driver("sqlite:///x.db") == "sqlite:///x.db"


def test_an_unreachable_server_is_a_user_error(tmp_path):
    pytest.importorskip("psycopg2")
    with pytest.raises(ArgumentError, match="reachable database"):
        open_storage(f"postgresql://postgres@/none?host={tmp_path}&port=1")


# -- PostgreSQL: creation races, a shared plan, dead workers --------------------------------------

RACER = """
import sys, time
import optuna, sqlalchemy, psycopg2  # imported before the start line, so that only opening races
from autoprec.search.plan import make_sampler
from autoprec.search.study import open_study, record_or_check
url, start, order = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(",")
late = time.time() > start
time.sleep(max(0.0, start - time.time()))
study = open_study("race", url, make_sampler(0))
facts = {"keys": ["a", "b"], "choices": ["float32", "mixed_float16"], "order": order, "baseline": 0.9,
         "fingerprint": "f", "metric": "accuracy"}
print(",".join(record_or_check(study, facts, budget="1%")), "late" if late else "on time")
"""


@pytest.mark.slow
def test_workers_started_at_the_same_instant_on_an_empty_database_all_come_up(pg_url):
    """Without the advisory lock, two of four such processes died on CREATE TYPE studydirection (measured)."""
    start = time.time() + 4  # the imports take about 2 s on 2 cores
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, pg_url, str(start), order],
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for order in ("a,b", "b,a", "a,b", "b,a")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    lines = [out.split() for out, _ in outs]
    assert len({order for order, *_ in lines}) == 1  # every worker follows the first worker's order
    assert sum(when == "on" for _, when, *_ in lines) >= 2  # the race was really run
    assert len(optuna.get_all_study_names(storage=open_storage(pg_url))) == 1


def _worker_search(url, name, n_trials, calls, lock):
    def evaluate(assignment):
        with lock:
            calls.append(tuple(sorted(assignment.items())))
        time.sleep(0.05)  # long enough for the workers to interleave
        return outcome(sum(DROP.get(k, 0.0) for k, v in assignment.items() if v != "float32"))

    study = open_study(name, url, make_sampler(0))
    keys = KEYS[:6]  # test_search's problem, smaller: the plan reaches its TPE rounds within 14 trials
    space = Space(
        keys, ("float32", "mixed_float16"), "mixed_float16", tuple(sorted(keys, key=lambda k: -DROP.get(k, 0.0)))
    )
    return Search(space, evaluate, estimate, lambda d: d <= 0.005 + 1e-12, 0.005, study, n_trials=n_trials, poll=0.1)


def _markers(study):
    """TPE's proposals recorded without an evaluation: their place in the plan and their assignment."""
    return {
        (t.user_attrs["proposal"], tuple(sorted(t.params.items())))
        for t in study.get_trials(states=(STATE.PRUNED,))
        if "feasible" not in t.user_attrs
    }


def _complete_keys(study):
    return [tuple(sorted(t.params.items())) for t in evaluated_trials(study)]


def test_workers_share_one_plan_and_choose_what_one_worker_chooses(pg_url):
    """One worker, then three threads on another study: the same trials, none twice, exactly n_trials, one best."""
    lock, n_trials = threading.Lock(), 14  # 7 evaluated, then TPE rounds whose proposals are all pruned
    alone_calls, calls, bests = [], [], []
    alone = _worker_search(pg_url, "alone", n_trials, alone_calls, lock)
    expected = alone.run()
    searches = [_worker_search(pg_url, "shared", n_trials, calls, lock) for _ in range(3)]
    threads = [threading.Thread(target=lambda s=s: bests.append(s.run())) for s in searches]
    for t, delay in zip(
        threads, (0.0, 0.1, 0.6), strict=True
    ):  # the last joins late and replays what the others did meanwhile
        time.sleep(delay)
        t.start()
    for t in threads:
        t.join(timeout=120)
    shared = searches[0].study
    finished = shared.get_trials(states=(STATE.COMPLETE, STATE.PRUNED))
    assert len(finished) == n_trials == len(alone.study.get_trials(states=(STATE.COMPLETE, STATE.PRUNED)))
    assert len(calls) == len(set(calls)) == len(_complete_keys(shared))  # no assignment evaluated twice
    assert sorted(_complete_keys(shared)) == sorted(_complete_keys(alone.study)) == sorted(alone_calls)
    assert _markers(shared) == _markers(alone.study) and len(_markers(shared)) == n_trials - len(alone_calls)
    assert sum(s.evaluations > 0 for s in searches) >= 2
    assert all(b.assignment == expected.assignment for b in bests) and len(bests) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # a bare study.ask here
def test_a_silent_worker_elsewhere_is_failed_after_the_grace_period(pg_url, monkeypatch):
    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_module, "GRACE_SECONDS", 2)
    study = open_study("grace", pg_url, make_sampler(0))
    silent, beating = study.ask(), study.ask()
    for trial, worker in ((silent, "elsewhere:1"), (beating, "elsewhere:2")):
        trial.set_user_attr("worker", worker)  # another machine: no process of ours to look at
    with heartbeat(study, silent):
        pass  # one beat, then its worker went quiet
    with heartbeat(study, beating):
        time.sleep(3.5)
        assert reap(study) == []  # reap's own list holds dead local processes only
    states = {t.number: t.state for t in study.get_trials()}
    assert states[silent.number] == STATE.FAIL and states[beating.number] == STATE.RUNNING


@pytest.mark.slow
def test_three_worker_processes_one_killed_mid_trial(planted, pg_url, tmp_path):
    """A finaliser and two search-only workers, one SIGKILLed while its first trial runs.

    The study holds exactly n_trials complete trials, evaluated once each, the
    killed trial failed and run again; the finaliser's policy is that of one
    process alone with the same seed.
    """
    model, _, val, _ = planted
    n_trials = 12  # the plan's 4 sequential trials, then two rounds of 4 that the workers share
    model_path, data_path = str(tmp_path / "m.keras"), str(tmp_path / "d.npz")
    model.save(model_path)
    np.savez(data_path, x=val[0], y=val[1])
    worker = [
        sys.executable,
        os.path.join(HERE, "tune_worker.py"),
        model_path,
        data_path,
        pg_url,
        "s",
        str(n_trials),
        "--sleep",
        "0.4",
        "--barrier",
        str(tmp_path),
        "--workers",
        "3",
    ]
    procs = [
        subprocess.Popen(worker + extra, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for extra in (
            ["--out", str(tmp_path / "policy.json")],
            ["--search-only"],
            ["--search-only", "--kill-after", "0"],
        )
    ]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll(), not wait() in turn: a killed worker must be reaped, or it looks alive
    codes = [p.poll() for p in procs]
    assert codes[:2] == [0, 0] and codes[2] == -9, [p.stderr.read().decode()[-2000:] for p in procs]
    reference = autoprec.tune(
        model, val, budget="0.5%", target="mixed_float16", candidates=THREE_WAY, n_trials=n_trials, seed=0, verbose=0
    )

    study = optuna.load_study(study_name="s", storage=open_storage(pg_url))
    complete = evaluated_trials(study)
    failed = study.get_trials(states=(STATE.FAIL,))
    assert len(complete) == n_trials and not _markers(study)
    assert len(set(_complete_keys(study))) == n_trials  # no assignment evaluated twice
    assert len(failed) == 1 and tuple(sorted(failed[0].params.items())) in _complete_keys(study)  # run again
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # the finaliser and the surviving worker
    expected = reference.trials[reference.trials["evaluated"]]["float32_units"]
    by_number = {
        int(r["trial"]): r["float32_units"]
        for _, r in study_module.trials_frame(study, list(study.user_attrs["keys"])).iterrows()
    }
    assert sorted(by_number[t.number] for t in complete) == sorted(expected)
    assert autoprec.PrecisionPolicy.load(tmp_path / "policy.json") == reference.policy


# -- the worker mode, from the command line --------------------------------------------------------


@pytest.mark.slow
def test_search_only_worker_then_finaliser(tmp_path, capsys):
    model = trained(MODEL_BUILDERS["functional"]())
    path, data = str(tmp_path / "m.keras"), str(tmp_path / "d.npz")
    model.save(path)
    np.savez(data, x=small_data()[0], y=small_data()[1])
    base = [
        "tune",
        path,
        "--data",
        data,
        "--budget",
        "2%",
        "--target",
        "mixed_bfloat16",
        "--trials",
        "6",
        "--storage",
        str(tmp_path / "study.log"),
        "--study-name",
        "s",
        "--verbose",
        "0",
    ]
    assert main(base + ["--search-only"]) == EXIT_OK
    assert "searched study 's'" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert main(base) == EXIT_USER_ERROR and "Expected -o" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "run")]) in (EXIT_OK, EXIT_ALL_FLOAT32)
    stats = json.loads((tmp_path / "run" / "result.json").read_text())["stats"]
    assert stats["evaluations"] == 0  # the worker had evaluated the whole plan: the finaliser only verifies
    assert main(["tune", path, "--data", data, "--budget", "2%", "--search-only"]) == EXIT_USER_ERROR
    assert "--storage" in capsys.readouterr().err
    with pytest.raises(ArgumentError, match="search_only"):
        autoprec.tune(model, small_data(), budget="2%", search_only=True, verbose=0)


# -- tf.distribute ---------------------------------------------------------------------------------

MIRRORED = """
import json, os
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]  # two logical CPU devices: before TensorFlow starts its runtime
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np

import autoprec

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 12)).astype("float32")
y = np.argmax(x @ rng.normal(size=(12, 3)), axis=1).astype("int32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    inputs = keras.Input((12,))
    h = keras.layers.Dense(32, activation="relu", name="h1")(inputs)
    h = keras.layers.Dense(32, activation="relu", name="h2")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(h), name="mirrored")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
result = autoprec.tune(model, (x[:256], y[:256]), budget="5%", target="mixed_float16", n_trials=6, verify="train",
                       train_data=(x, y), steps=8, pretrain_steps=30, verbose=0)
tuned, local = result.model, strategy.experimental_local_results
with strategy.scope():
    tuned.fit(x, y, batch_size=32, epochs=1, steps_per_epoch=4, verbose=0)
    before = [float(v) for v in local(tuned.optimizer.dynamic_scale.value)]
    bad = x[:32].copy()
    bad[16:] = 1e6  # only the second replica's half overflows float16: both must skip the step and halve alike
    tuned.fit(bad, y[:32], batch_size=32, epochs=1, verbose=0)
    after = [float(v) for v in local(tuned.optimizer.dynamic_scale.value)]
mirrored = lambda vs: all(isinstance(v.value, tf.distribute.DistributedValues) for v in vs)
print(json.dumps({
    "float16": result.policy.uses_float16, "lso": isinstance(tuned.optimizer, keras.optimizers.LossScaleOptimizer),
    "weights": mirrored(tuned.weights), "optimizer": mirrored(tuned.optimizer.variables),
    "strategy": tuned.distribute_strategy is strategy, "pretrained": result.pretrain_steps,
    "check": bool(result.training and result.training.passed), "check_scales": len(result.training.loss_scale),
    "before": before, "after": after}))
"""


@pytest.mark.slow
def test_mirrored_strategy_model_is_tuned_emitted_and_trained_under_its_strategy():
    """Pretraining, the training check (fit) and the emitted model all run in the strategy the model was built in."""
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED],
        env={**ENV, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["float16"] and got["lso"] and got["strategy"]
    assert got["weights"] and got["optimizer"]  # mirrored variables: the clone and its optimizer stayed in scope
    assert got["pretrained"] == 30 and got["check"] and got["check_scales"] == 8
    assert got["before"] == [32768.0, 32768.0] and got["after"] == [16384.0, 16384.0]
