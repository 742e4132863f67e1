import os
import subprocess
import sys

import pytest

PACKAGES = ["autoprec", "autoprec.profiling", "autoprec.search", "autoprec.verify", "autoprec.report"]


@pytest.mark.parametrize("name", PACKAGES)
def test_import_is_cheap(name):
    """`import autoprec` (or one of its packages) pulls in neither TensorFlow, Keras, Optuna nor matplotlib."""
    heavy = "('tensorflow', 'keras', 'optuna', 'matplotlib', 'pandas')"
    code = f"import sys, {name}; print(sorted(m for m in {heavy} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_names_resolve():
    import autoprec

    for name in autoprec.__all__:
        assert getattr(autoprec, name) is not None
    assert callable(autoprec.tune) and callable(autoprec.profile) and callable(autoprec.apply_policy)


@pytest.mark.parametrize("name", PACKAGES)
def test_type_checking_imports_match_the_lazy_exports(name):
    """The ``if TYPE_CHECKING:`` re-exports (read by type checkers and the API docs) name what ``_EXPORTS`` resolves."""
    import ast
    import importlib
    import pathlib

    package = importlib.import_module(name)
    tree = ast.parse(pathlib.Path(package.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    imported = {}
    for node in block.body:
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name}: re-export it as `{alias.name} as {alias.name}`"
            imported[alias.name] = f"{node.module}.{alias.name}" if node.module == "autoprec" else node.module
    assert imported == package._EXPORTS
    for public in package.__all__:
        assert getattr(package, public) is not None


def test_the_api_reference_renders_every_public_name():
    import pathlib
    import re

    import autoprec

    api = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"
    rendered = set(re.findall(r"^::: autoprec\.(\w+)$", api.read_text(), flags=re.M))
    packages = {p.split(".")[1] for p in PACKAGES[1:]}
    assert rendered == set(autoprec.__all__) | packages
