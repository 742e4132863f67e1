import os
import subprocess
import sys


def test_import_is_cheap():
    """`import autoprec` pulls in neither TensorFlow, Keras, Optuna nor matplotlib."""
    code = "import sys, autoprec; print(sorted(m for m in ('tensorflow','keras','optuna','matplotlib','pandas') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_names_resolve():
    import autoprec

    for name in autoprec.__all__:
        assert getattr(autoprec, name) is not None
    assert callable(autoprec.tune) and callable(autoprec.profile) and callable(autoprec.apply_policy)
