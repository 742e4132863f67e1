import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from autoprec import PrecisionPolicy
from autoprec.cli import EXIT_ALL_FLOAT32, EXIT_OK, EXIT_USER_ERROR, main  # forced all-float32: test_pipeline
from autoprec.graph import build_graph, keyed_layers

from conftest import MODEL_BUILDERS, small_data, trained


@pytest.fixture()
def saved(tmp_path):
    model = trained(MODEL_BUILDERS["functional"]())
    path = tmp_path / "m.keras"
    model.save(path)
    x, y = small_data()
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    return model, str(path), str(data)


def test_layers(saved, capsys):
    _, path, _ = saved
    assert main(["layers", path]) == EXIT_OK
    out = capsys.readouterr().out
    assert "h1" in out and "PINNED_OUTPUT" in out and "decision_unit" in out


def test_apply(saved, tmp_path, capsys):
    model, path, _ = saved
    g = build_graph(model)
    policy = PrecisionPolicy(g.resolve({"h1": "mixed_float16"}), target="mixed_float16", layers=g.layer_facts())
    policy.save(tmp_path / "p.json")
    out = tmp_path / "out.keras"
    assert main(["apply", path, "--policy", str(tmp_path / "p.json"), "-o", str(out)]) == EXIT_OK
    loaded = keras.models.load_model(out)
    assert keyed_layers(loaded)["h1"].compute_dtype == "float16"
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)


def test_profile(saved, tmp_path, capsys):
    _, path, data = saved
    csv = tmp_path / "p.csv"
    assert main(["profile", path, "--data", data, "--target", "mixed_bfloat16", "-o", str(csv), "--verbose", "0"]) == EXIT_OK
    assert csv.exists() and "metric_drop" in csv.read_text().splitlines()[0]
    assert "h1" in capsys.readouterr().out


def test_tune_and_report(saved, tmp_path):
    _, path, data = saved
    out = tmp_path / "run"
    code = main(["tune", path, "--data", data, "--budget", "2%", "--target", "mixed_bfloat16", "--trials", "6", "-o", str(out), "--verbose", "0"])
    assert code in (EXIT_OK, EXIT_ALL_FLOAT32)
    meta = json.loads((out / "result.json").read_text())
    assert (code == EXIT_ALL_FLOAT32) == (meta["n_16bit"] == 0)
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == EXIT_OK
    assert (out / "report.html").exists()


@pytest.mark.parametrize("argv, message", [
    (["layers", "missing.keras"], "does not exist"),
    (["tune", "{model}", "--data", "{model}", "--budget", "1%", "-o", "x"], "npz"),
    (["tune", "{model}", "--data", "{data}", "--budget", "lots", "-o", "x"], "does not parse"),
    (["apply", "{model}", "--policy", "{data}", "-o", "x.keras"], "binary"),
    (["report", "/nonexistent"], "not a directory"),
])
def test_user_errors_exit_1(saved, argv, message, capsys):
    _, path, data = saved
    argv = [a.format(model=path, data=data) for a in argv]
    assert main(argv) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_1(capsys):
    assert main(["tune"]) == EXIT_USER_ERROR
    assert main(["frobnicate"]) == EXIT_USER_ERROR


def test_unsafe_model_needs_flag(tmp_path, capsys):
    inputs = keras.Input((3,))
    out = keras.layers.Lambda(lambda t: t * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, out).save(path)
    assert main(["layers", str(path)]) == EXIT_USER_ERROR
    assert "--unsafe" in capsys.readouterr().err
    assert main(["layers", str(path), "--unsafe"]) == EXIT_OK


def test_subprocess_smoke(saved):
    _, path, _ = saved
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.run([sys.executable, "-m", "autoprec", "layers", path], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "h1" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "autoprec", "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "autoprec" in proc.stdout
