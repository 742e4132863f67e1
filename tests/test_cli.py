import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import MODEL_BUILDERS, small_data, trained

from autoprec import PrecisionPolicy
from autoprec.cli import EXIT_ALL_FLOAT32, EXIT_OK, EXIT_USER_ERROR, main  # forced all-float32: test_pipeline
from autoprec.graph import build_graph, keyed_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model and its data as files; once per module (the commands only read them)."""
    tmp_path = tmp_path_factory.mktemp("saved")
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
    assert (
        main(["profile", path, "--data", data, "--target", "mixed_bfloat16", "-o", str(csv), "--verbose", "0"])
        == EXIT_OK
    )
    assert csv.exists() and "metric_drop" in csv.read_text().splitlines()[0]
    assert "h1" in capsys.readouterr().out


def test_tune_and_report(saved, tmp_path):
    _, path, data = saved
    out = tmp_path / "run"
    code = main(
        [
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
            "-o",
            str(out),
            "--verbose",
            "0",
        ]
    )
    assert code in (EXIT_OK, EXIT_ALL_FLOAT32)
    meta = json.loads((out / "result.json").read_text())
    assert (code == EXIT_ALL_FLOAT32) == (meta["n_16bit"] == 0)
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == EXIT_OK
    assert (out / "report.html").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["layers", "missing.keras"], "does not exist"),
        (["tune", "{model}", "--data", "{model}", "--budget", "1%", "-o", "x"], "npz"),
        (["tune", "{model}", "--data", "{data}", "--budget", "lots", "-o", "x"], "does not parse"),
        (["apply", "{model}", "--policy", "{data}", "-o", "x.keras"], "binary"),
        (["report", "/nonexistent"], "not a directory"),
    ],
)
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


def test_subprocess_smoke():
    # `python -m autoprec layers|profile|tune|apply|report` in their own processes: examples/cli.sh, run by
    # tests/test_examples.py (each such process spends about 5 s importing Keras).
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.run(
        [sys.executable, "-m", "autoprec", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0 and "autoprec" in proc.stdout


def test_bad_arguments_fail_before_keras_is_imported(tmp_path):
    """Issue 20: bad values were reported only after TensorFlow had loaded (about 6 s)."""
    import subprocess
    import sys

    probe = (
        "import sys; from autoprec.cli import main; code = main(['tune', 'm.keras', '--data', 'd.npz', "
        "'--budget', '0.5%', '--candidates', 'float32,int9', '-o', 'out']); "
        "print(code, 'keras' in sys.modules, 'tensorflow' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert done.stdout.split() == ["1", "False", "False"], done.stdout + done.stderr[-2000:]
    assert "candidates" in done.stderr and "int9" in done.stderr


def test_every_tune_option_a_shell_needs_has_a_flag_with_help():
    from autoprec.cli import build_parser

    parser = build_parser()
    tune = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("tune"))
    flags = {opt: action for action in tune._actions for opt in action.option_strings}
    for flag in (
        "--metric",
        "--keep-float32",
        "--force-16bit",
        "--candidates",
        "--objective",
        "--device",
        "--target",
        "--trials",
        "--study-name",
        "--seed",
        "--granularity",
        "--overwrite",
        "--max-fallbacks",
        "--cost",
    ):
        assert flag in flags and flags[flag].help, flag


USER_LAYERS = """
import keras


@keras.saving.register_keras_serializable("user_layers")
class SoftmaxNoMax(keras.layers.Layer):
    def call(self, x):
        e = keras.ops.exp(x)
        return e / keras.ops.sum(e, axis=-1, keepdims=True)
"""


def _cli(*argv, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "autoprec", *argv], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.slow
def test_models_with_custom_layers_and_variable_length_inputs_from_keras_files(tmp_path, capsys):
    """Issue 25: a user's custom layer (registered by their module) and a variable-length attention model, from .keras files."""
    module = tmp_path / "user_layers.py"
    module.write_text(USER_LAYERS)
    sys.path.insert(0, str(tmp_path))
    try:
        import user_layers
    finally:
        sys.path.remove(str(tmp_path))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype("float32")
    y = np.argmax(x[:, :4], axis=1).astype("int32")
    i = keras.Input((16,))
    h = keras.layers.Dense(4, name="logits")(keras.layers.Dense(32, name="d1")(i))
    h = user_layers.SoftmaxNoMax(name="custom")(keras.layers.Rescaling(20.0, name="sharpen")(h))  # exp past 11: inf
    custom = keras.Model(i, keras.layers.Dense(4, activation="softmax", name="out")(h))
    custom.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    custom.fit(x, y, epochs=10, verbose=0)
    custom.save(tmp_path / "custom.keras")
    np.savez(tmp_path / "d.npz", x=x, y=y)

    tokens = keras.Input((None,), dtype="int32")
    e = keras.layers.Embedding(32, 16, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(2, 8, name="mha")(e, e)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(a)
    attention = keras.Model(tokens, keras.layers.Dense(2, name="out")(pooled))
    t = rng.integers(0, 32, size=(600, 12)).astype("int32")
    labels = (t < 8).mean(axis=1) > 0.25
    attention.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    attention.fit(t[:300], labels[:300], epochs=15, verbose=0)
    attention.save(tmp_path / "attention.keras")
    np.savez(tmp_path / "t.npz", x=t[300:], y=labels[300:].astype("int32"))

    missing = _cli("layers", str(tmp_path / "custom.keras"))
    assert missing.returncode == EXIT_USER_ERROR and "Traceback" not in missing.stderr
    assert "--import" in missing.stderr and "not registered" in missing.stderr

    # With --import the same file loads: the tune below runs in its own process (one fewer Keras import than
    # listing it first).
    # The rest in this process (each subprocess imports Keras anew): main() returns the exit code, and a traceback
    # would fail the test as an exception.
    capsys.readouterr()
    assert main(["layers", str(tmp_path / "custom.keras"), "--import", "no_such_module_here"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no_such_module_here" in err and "Traceback" not in err

    out = tmp_path / "tuned"
    tuned = _cli(
        "tune",
        str(tmp_path / "custom.keras"),
        "--import",
        str(module),
        "--data",
        str(tmp_path / "d.npz"),
        "--budget",
        "1%",
        "--target",
        "mixed_float16",
        "--device",
        "gpu",
        "--trials",
        "6",
        "-o",
        str(out),
    )
    assert tuned.returncode in (EXIT_OK, EXIT_ALL_FLOAT32), tuned.stderr
    assert "Traceback" not in tuned.stderr
    policy = json.loads((out / "policy.json").read_text())
    assert {r["path"]: r["policy"] for r in policy["layers"]}["custom"] == "float32"

    assert main(["layers", str(tmp_path / "attention.keras")]) == EXIT_OK
    out = tmp_path / "tuned_attention"
    code = main(
        [
            "tune",
            str(tmp_path / "attention.keras"),
            "--data",
            str(tmp_path / "t.npz"),
            "--budget",
            "1%",
            "--metric",
            "accuracy",
            "--target",
            "mixed_bfloat16",
            "--device",
            "gpu",
            "--trials",
            "4",
            "-o",
            str(out),
        ]
    )
    assert code in (EXIT_OK, EXIT_ALL_FLOAT32), capsys.readouterr().err
    assert (out / "report.md").exists()
