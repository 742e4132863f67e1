"""Lazy public names for a package (PEP 562): each is imported from its module on first use.

Packages keep a small public face this way without importing Keras, TensorFlow or Optuna at import time, and
without import cycles between their modules.

>>> getattr_, dir_ = exports("autoprec", {"Budget": "autoprec.budget"})
>>> getattr_("Budget").__name__, dir_()
('Budget', ['Budget'])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name to the module defining it.

    A name whose module is ``package.name`` itself stands for that module.
    """

    def getattr_(name: str) -> Any:
        module_name = names.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(module_name)
        return module if module_name == f"{package}.{name}" else getattr(module, name)

    def dir_() -> list[str]:
        return sorted(names)

    return getattr_, dir_
