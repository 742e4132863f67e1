"""House style (STYLE.md), checked: no function in autoprec/ over 60 lines, no class over 200.

Lines as they stand in the file, from the first decorator to the last line, docstring excluded: a docstring
with an example is encouraged, and it is not code to hold in one's head.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "autoprec"
MAX_FUNCTION, MAX_CLASS = 60, 200


def _docstring_lines(node) -> int:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def _spans():
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield path.relative_to(ROOT.parent), node, node.end_lineno - start + 1 - _docstring_lines(node)


def test_functions_and_classes_stay_small():
    too_long = [
        f"{path}:{node.lineno} {node.name} ({length} lines)"
        for path, node, length in _spans()
        if length > (MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION)
    ]
    assert not too_long, "over the house limits:\n" + "\n".join(too_long)


@pytest.mark.parametrize("name", ["run", "_cmd_tune"])
def test_the_count_sees_nested_functions_and_excludes_docstrings(name):
    spans = {node.name: length for _, node, length in _spans()}
    assert name in spans and 5 <= spans[name] <= MAX_FUNCTION
