"""The reports: sensitivity and trial tables, plots, and the Markdown and HTML pages of a saved result.

- :mod:`autoprec.report.pages`: reads a result directory and writes ``report.md`` and ``report.html``;
- :mod:`autoprec.report.plots`: the matplotlib charts, each from a plain data record.

>>> from autoprec.report import write_report
>>> write_report("reports/demo")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoprec._lazy import exports

if TYPE_CHECKING:
    from autoprec.report.pages import Saved as Saved
    from autoprec.report.pages import load_saved as load_saved
    from autoprec.report.pages import write_report as write_report

_EXPORTS = {
    "write_report": "autoprec.report.pages",
    "load_saved": "autoprec.report.pages",
    "Saved": "autoprec.report.pages",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = exports(__name__, _EXPORTS)
