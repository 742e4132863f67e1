"""autoprec.measure and ``autoprec measure``: policies confirmed where they will train, every figure with its device."""

import numpy as np
import pytest
from conftest import MODEL_BUILDERS, small_data, trained

import autoprec
from autoprec.cli import EXIT_OK, EXIT_USER_ERROR, main
from autoprec.errors import ArgumentError, AutoprecError
from autoprec.graph import build_graph


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    model = trained(MODEL_BUILDERS["functional"]())
    x, y = small_data(256)
    result = autoprec.tune(model, (x, y), budget="2%", target="mixed_bfloat16", device="gpu", n_trials=4, verbose=0)
    path = tmp_path_factory.mktemp("measure") / "policy.json"
    result.policy.save(path)
    return model, (x, y), result, path


def test_measure_confirms_a_policy_with_its_real_drop_and_the_device(tuned):
    model, data, result, path = tuned
    every16 = {u.path: "mixed_float16" for u in build_graph(model).units}
    table = autoprec.measure(model, data, {"tuned": path, "all-float16": every16}, budget="2%", steps=3)
    assert list(table["policy"]) == ["float32", "tuned", "all-float16"]
    assert table.loc[0, "speedup"] == pytest.approx(1.0)
    assert (table["step_ms"] > 0).all() and (table["speedup"] > 0).all()
    tuned_row = table.set_index("policy").loc["tuned"]
    assert abs(tuned_row["drop"] - result.drop) < 1e-9  # the same real policies on the same data
    assert tuned_row["layers_16bit"] == sum(v != "float32" for v in dict(result.policy.items()).values())
    assert bool(tuned_row["within_budget"]) and tuned_row["allowed_drop"] == pytest.approx(0.02)
    assert table.attrs["device"] and (table["device"] == table.attrs["device"]).all()
    assert "cpu" in table.attrs["device"] or "gpu" in table.attrs["device"]


def test_measure_refuses_what_it_cannot_measure(tuned, tmp_path):
    model, data, _, path = tuned
    with pytest.raises(ArgumentError, match="at least one policy"):
        autoprec.measure(model, data, [])
    with pytest.raises(ArgumentError, match="steps"):
        autoprec.measure(model, data, path, steps=0)
    with pytest.raises(AutoprecError, match="no_such_layer"):
        autoprec.measure(model, data, {"no_such_layer": "mixed_float16"}, steps=1)
    import keras

    bare = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)])  # never compiled
    with pytest.raises(ArgumentError, match="compiled"):
        autoprec.measure(bare, data, path)


def test_cli_measure_on_the_training_machine(tuned, tmp_path, capsys):
    model, (x, y), _, path = tuned
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "measured.csv"
    argv = ["measure", str(tmp_path / "m.keras"), "--policy", str(path), "--data", str(tmp_path / "d.npz")]
    assert main([*argv, "--budget", "2%", "--steps", "2", "-o", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "Device: " in printed and "policy.json" in printed
    import pandas as pd

    frame = pd.read_csv(out)
    assert list(frame["policy"]) == ["float32", "policy.json"] and frame["device"].notna().all()
    assert main(["measure", str(tmp_path / "m.keras"), "--policy", str(tmp_path / "none.json"), "--data",
                 str(tmp_path / "d.npz")]) == EXIT_USER_ERROR  # fmt: skip
    assert "no such file" in capsys.readouterr().err
