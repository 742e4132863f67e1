"""The profile: how sensitive each layer is to 16-bit, and where the work is.

- :mod:`autoprec.profiling.sensitivity`: :func:`~autoprec.profiling.sensitivity.profile`, the one-pass
  score, gradient statistics and group-tested ablation;
- :mod:`autoprec.profiling.stats`: range statistics against a format, the profile's column names and the
  one hazard rule;
- :mod:`autoprec.profiling.flops`: FLOPs per layer, from real shapes, for the cost model and the report.

>>> from autoprec.profiling import hazard
>>> hazard({"act_overflow": 0.1})
<Hazard.OVERFLOW: 'overflow'>
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoprec._lazy import exports

if TYPE_CHECKING:
    from autoprec.profiling.sensitivity import profile as profile
    from autoprec.profiling.stats import Hazard as Hazard
    from autoprec.profiling.stats import hazard as hazard

_EXPORTS = {
    "profile": "autoprec.profiling.sensitivity",
    "Hazard": "autoprec.profiling.stats",
    "hazard": "autoprec.profiling.stats",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = exports(__name__, _EXPORTS)
