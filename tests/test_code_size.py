"""House style, checked: no function in autoprec/ over 60 lines, no class over 200 (an AST count)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "autoprec"
MAX_FUNCTION, MAX_CLASS = 60, 200


def _spans():
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield path.relative_to(ROOT.parent), node, node.end_lineno - start + 1


def test_functions_and_classes_stay_small():
    too_long = [f"{path}:{node.lineno} {node.name} ({length} lines)" for path, node, length in _spans()
                if length > (MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION)]
    assert not too_long, "over the house limits:\n" + "\n".join(too_long)


@pytest.mark.parametrize("limit", [MAX_FUNCTION])
def test_the_count_sees_nested_functions(limit):
    spans = {node.name: length for _, node, length in _spans()}
    assert "tune" in spans and spans["tune"] <= limit
