"""House style, checked: no function in autoprec/ over 40 logical lines, no class over 130 (a token count).

Logical lines (statements, as Python's tokenizer ends them) rather than physical ones: the formatter wraps a
long call over several lines without making the function any longer to read. The docstring is not counted.
"""

import ast
import io
import pathlib
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "autoprec"
MAX_FUNCTION, MAX_CLASS = 40, 130


def _spans():
    for path in sorted(ROOT.rglob("*.py")):
        source = path.read_text()
        ends = [
            t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NEWLINE
        ]
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = sum(start <= line <= node.end_lineno for line in ends)
                yield path.relative_to(ROOT.parent), node, length - (ast.get_docstring(node) is not None)


def test_functions_and_classes_stay_small():
    too_long = [
        f"{path}:{node.lineno} {node.name} ({length} logical lines)"
        for path, node, length in _spans()
        if length > (MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION)
    ]
    assert not too_long, "over the house limits:\n" + "\n".join(too_long)


@pytest.mark.parametrize("limit", [MAX_FUNCTION])
def test_the_count_sees_nested_functions(limit):
    spans = {node.name: length for _, node, length in _spans()}
    assert "tune" in spans and 5 <= spans["tune"] <= limit
