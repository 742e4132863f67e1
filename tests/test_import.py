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


def test_no_module_level_import_cycle():
    """Dependencies point down the pipeline: no autoprec module imports, at module level, one that imports it back."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    deps: dict[str, set[str]] = {}
    for path in (root / "autoprec").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autoprec"):
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("autoprec")}
        deps[name] = found
    deps = {k: {d for d in v if d in deps and d != k} for k, v in deps.items()}
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(deps[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*stack[stack.index(dep) :], module, dep])
            if dep not in state:
                visit(dep, [*stack, module])
        state[module] = 2

    for module in sorted(deps):
        if module not in state:
            visit(module, [])
    assert len(deps) > 30
