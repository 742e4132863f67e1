"""The study as other Optuna clients read it: optuna-dashboard's own API, constraints, names, no sentinels."""

import json
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from conftest import THREE_WAY

import autoprec

optuna_dashboard = pytest.importorskip("optuna_dashboard")


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # the test reads the API; the access log is noise
        pass


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.read().decode("utf-8")


def test_optuna_dashboard_shows_only_feasible_trials_as_best_with_a_named_objective(planted, tmp_path):
    """Issue 20: the dashboard's best trial was the all-16-bit one with NaN outputs; its objective had no name."""
    import optuna

    model, _, val, _ = planted
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = autoprec.tune(
        model,
        val,
        budget="0.5%",
        target="mixed_float16",
        candidates=THREE_WAY,
        n_trials=12,
        storage=url,
        study_name="dash",
        verbose=0,
    )
    first = result.trials.sort_values("trial").iloc[0]
    assert first["phase"] == "all_16bit" and not first["feasible"]  # an infeasible trial with the highest estimate

    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(optuna.storages.RDBStorage(url)), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_port
        studies = json.loads(_get(port, "/api/studies"))["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == "dash"]
        text = _get(port, f"/api/studies/{study['study_id']}")
    finally:
        server.shutdown()
        server.server_close()
    detail = json.loads(text)
    assert detail["objective_names"] == ["speedup_estimate"]
    assert detail["best_trials"], "the dashboard found no best trial"
    for best in detail["best_trials"]:
        attrs = {a["key"]: a["value"] for a in best["user_attrs"]}
        assert attrs["feasible"] == "True" and float(attrs["drop"]) <= 0.005, attrs  # the API serves them as text
        assert all(c <= 0 for c in best["constraints"]), best["constraints"]
    # every evaluated trial's constraint is the list every reader knows; no sentinel number, no bare Infinity
    assert "1000000000" not in text and "Infinity" not in text and "NaN" not in text
    evaluated = [t for t in detail["trials"] if any(a["key"] == "feasible" for a in t["user_attrs"])]
    assert len(evaluated) >= 3
    for trial in evaluated:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        if attrs["feasible"] == "True":
            assert trial["state"] == "Complete"
        else:
            assert trial["state"] == "Pruned" and trial["intermediate_values"]  # the estimate, kept
