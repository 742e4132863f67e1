"""JAX pieces: gradients at intermediate layer outputs through zero "taps".

JAX has no tape to watch an intermediate tensor with. Instead each watched
output ``t`` becomes ``t + tap`` with ``tap`` a zero array passed in as an
argument: the gradient of the loss with respect to ``tap`` is the gradient at
``t``. A first call records the taps' shapes; the variables are passed in
through ``keras.StatelessScope`` so that their gradients flow too; a last
plain call leaves the caller's forward with concrete arrays, not tracers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def gradient_pass(forward: Callable, loss_fn: Callable, x: Any, y: Any, variables: list) -> tuple:
    import jax
    import jax.numpy as jnp
    import keras

    shapes: list = []

    def record(tensor):
        shapes.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    forward(x, record)  # shapes of the watched outputs for this batch

    def loss_of(taps, values):
        slots = iter(taps)

        def watch(tensor):
            return tensor + next(slots)

        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            predictions = forward(x, watch)
            loss = loss_fn(y, predictions)
        return loss, predictions

    taps = [jnp.zeros(shape, dtype) for shape, dtype in shapes]
    values = [v.value for v in variables]
    (loss, predictions), (tap_grads, var_grads) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
        taps, values
    )
    # The caller may keep tensors its forward saw; leave it with concrete ones, not tracers.
    forward(x, lambda tensor: tensor)
    return predictions, loss, list(tap_grads), list(var_grads)
