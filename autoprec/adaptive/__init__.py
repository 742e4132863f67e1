"""Adaptive precision during training: a Keras callback that moves layers between 16-bit and float32.

A policy tuned before training is a snapshot; activations and gradients drift
as weights grow. :class:`AdaptivePrecision` starts from a policy and watches
``model.fit`` cheaply. Every step it reads the loss Keras has already logged
(a Python float by then): a loss that turns non-finite triggers a check at
once. Every ``check_every`` steps it checks: it reads the LossScaleOptimizer's
scale and the steps it skipped (``optimizer.iterations`` counts applied steps
only), and samples the range statistics of every layer's activations and
gradients on one batch of ``data``, with the code ``profile`` uses
(:mod:`autoprec.profiling.stats`). That pass is traced once, in float32 whatever the
layers' policies (they are switched to float32 while it traces), so it sees
what a 16-bit layer *would* face and a policy change never retraces it.

Rules (thresholds in :class:`AdaptiveOptions`). A 16-bit layer reads its inputs
and writes its outputs in 16-bit, forward and backward, so it is judged on its
own output and its producers' outputs. Gradients are judged at the loss scale of
the last check without skipped steps, capped at the optimizer's initial scale.

- **Promote** a 16-bit layer when an activation there reaches ``promote_at``
  (0.5) of the format's largest finite value, before it overflows; when more than
  ``flush_share`` (1%) of the nonzero activations or gradients flush to zero; or,
  after ``skip_limit`` (3) skipped steps, when its gradients overflow even at the
  lowered scale. Skipped steps or a non-finite loss that no statistic explains
  return the layers on probation (``RETRY_FAILED``), else the 16-bit layer
  closest to the limits.
- **Demote** (``demote=True``) a float32 layer once its activations stayed under
  ``demote_at`` (1/16) of the largest finite value, with no flush and no
  overflowing gradient, for ``patience`` (3) checks in a row. It is then on
  probation for ``patience`` checks, and any promotion starts a ``cooldown``
  (10 checks) before it is tried again.

A change sets the policies in place and rebuilds the train function
(``make_train_function(force=True)``): the next step runs the new policy from the
same weights and optimizer state. It costs one retrace of the train step.

**Loss scaling.** Keras cannot swap the optimizer in the middle of ``fit``
without changing the object ``fit`` steps and ``model.save`` writes, so the
callback never wraps or unwraps one: when float16 layers may appear (the start
policy has some, or ``demote=True`` towards float16) the model must be compiled
with a ``keras.optimizers.LossScaleOptimizer``, else ``on_train_begin`` raises
:class:`~autoprec.errors.ArgumentError`. A policy left without float16 layers
keeps it: with float32 gradients it never skips, so it is harmless. The callback
only sets its scale: back to the last healthy value after a promotion that
followed skipped steps or a non-finite loss (the promoted layer caused the
halvings), and down to the initial scale when float16 layers return (it keeps
doubling while no layer needs it).

**Cost.** A check is one forward/backward pass on one batch, so the overhead
is about a step's time every ``check_every`` (100) steps, 1-4% measured by
``benchmarks/bench_adaptive.py``; between checks the callback compares a float.

**Subclassed models** have no graph to sample per-layer statistics from, and
on JAX and PyTorch the statistics pass is not sampled (a ``jax.jit`` trace would
keep the weights of its first call; TensorFlow is the tested backend). There
the policies are still set in place, but the callback acts on the training
signals alone: a non-finite loss or ``skip_limit`` skipped steps return every
16-bit layer to float32, and ``demote=True`` is refused.

>>> import numpy as np, keras, autoprec
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"), keras.layers.Dense(1, name="out")])
>>> model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), "mse")
>>> x, y = np.ones((64, 4), "float32"), np.ones((64, 1), "float32")
>>> callback = autoprec.AdaptivePrecision({"h": "mixed_float16"}, data=(x, y), check_every=2, verbose=0)
>>> _ = model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
>>> callback.policy["h"], len(callback.history)
('mixed_float16', 0)
"""

from autoprec.adaptive.callback import AdaptivePrecision
from autoprec.adaptive.rules import (
    CHECK_COLUMNS,
    CHECKS_FILE,
    EVENT_COLUMNS,
    HISTORY_FILE,
    POLICY_FILE,
    AdaptiveOptions,
    Change,
    Event,
    Judge,
)
from autoprec.adaptive.sampler import Sampler, float32_policies

__all__ = [
    "AdaptivePrecision",
    "AdaptiveOptions",
    "Change",
    "Event",
    "Judge",
    "Sampler",
    "float32_policies",
    "HISTORY_FILE",
    "CHECKS_FILE",
    "POLICY_FILE",
    "EVENT_COLUMNS",
    "CHECK_COLUMNS",
]
