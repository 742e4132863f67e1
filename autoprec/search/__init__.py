"""The search: the decision space, the cost model, the plan of trials and the Optuna study that records them.

- :mod:`autoprec.search.space`: the decisions (a layer, a block) and the formats each may take;
- :mod:`autoprec.search.cost`: the cost model that estimates a policy's speed-up on a device;
- :mod:`autoprec.search.plan`: the plan of candidates (all 16-bit first, then sensitive-first prefixes,
  TPE, local moves) and its sampler;
- :mod:`autoprec.search.study`: the Optuna study: storage, resuming, sharing between workers, the trials table.

>>> from autoprec.search import CostModel, DecisionSpace, WorkerResult  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoprec._lazy import exports

if TYPE_CHECKING:
    from autoprec.search.cost import CostModel as CostModel
    from autoprec.search.cost import Device as Device
    from autoprec.search.plan import Search as Search
    from autoprec.search.plan import WorkerResult as WorkerResult
    from autoprec.search.plan import make_sampler as make_sampler
    from autoprec.search.space import DecisionSpace as DecisionSpace
    from autoprec.search.space import build_space as build_space
    from autoprec.search.study import open_study as open_study
    from autoprec.search.study import trials_frame as trials_frame

_EXPORTS = {
    "DecisionSpace": "autoprec.search.space",
    "build_space": "autoprec.search.space",
    "CostModel": "autoprec.search.cost",
    "Device": "autoprec.search.cost",
    "Search": "autoprec.search.plan",
    "WorkerResult": "autoprec.search.plan",
    "make_sampler": "autoprec.search.plan",
    "open_study": "autoprec.search.study",
    "trials_frame": "autoprec.search.study",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = exports(__name__, _EXPORTS)
