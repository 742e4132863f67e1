"""What the examples share (not an example itself): the fast mode, and where an example writes.

``AUTOPREC_EXAMPLES_FAST=1`` shrinks data, epochs and trials so that the test
suite can run every example. ``AUTOPREC_EXAMPLES_OUT=DIR`` sends the output
there; without it, the fast mode writes to a temporary directory, never into
the repository, and a full run writes under the repository's ``reports/``.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no start-up chatter

FAST = os.environ.get("AUTOPREC_EXAMPLES_FAST") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def output_path(name: str, default: str = "reports/examples") -> str:
    """The path ``name`` under the examples' output directory (created): see the module docstring."""
    base = os.environ.get("AUTOPREC_EXAMPLES_OUT") or (
        tempfile.mkdtemp(prefix="autoprec-example-") if FAST else os.path.join(ROOT, default)
    )
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, name)
