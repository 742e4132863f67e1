"""Named reasons for every decision, so tests, the CLI and reports filter on them.

>>> from autoprec import reasons
>>> reasons.PINNED_OUTPUT
'PINNED_OUTPUT'
"""

from __future__ import annotations

# Why a layer is pinned to float32 before any search.
PINNED_OUTPUT = "PINNED_OUTPUT"  # produces a model output: outputs stay float32
PINNED_SOFTMAX = "PINNED_SOFTMAX"  # softmax/sigmoid feeding an output; Keras computes it in the layer dtype
PINNED_USER = "PINNED_USER"  # keep_float32=[...]
PINNED_DTYPE = "PINNED_DTYPE"  # not a float32 layer to begin with (float64, int, quantized)

# Why the search left a decision unit where it is.
METRIC_DROP = "METRIC_DROP"  # in 16-bit it costs more metric than the budget allows
OVERFLOW = "OVERFLOW"  # its activations or gradients exceed the format's range
UNDERFLOW = "UNDERFLOW"  # a large share of its values flush to zero in the format
NO_GAIN = "NO_GAIN"  # float32 costs nothing measurable here (casts outweigh the gain)
LOW_PRECISION_OK = "LOW_PRECISION_OK"  # the unit runs in 16-bit
FORCED_16BIT = "FORCED_16BIT"  # force_16bit=[...]
FOLLOWS = "FOLLOWS"  # a layer without weights that takes the precision of its producers
VERIFY_FALLBACK = "VERIFY_FALLBACK"  # returned to float32 by the real-policy verification
TRAIN_FALLBACK = "TRAIN_FALLBACK"  # returned to float32 by the loss-scaled training check

PINNED = (PINNED_OUTPUT, PINNED_SOFTMAX, PINNED_USER, PINNED_DTYPE)
