"""TensorFlow pieces: gradients at intermediate layer outputs with ``tf.GradientTape``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def gradient_pass(forward: Callable, loss_fn: Callable, x: Any, y: Any, variables: list) -> tuple:
    import tensorflow as tf

    watched: list = []

    with tf.GradientTape() as tape:

        def watch(tensor):
            tape.watch(tensor)
            watched.append(tensor)
            return tensor

        predictions = forward(x, watch)
        loss = loss_fn(y, predictions)
    grads = tape.gradient(loss, watched + list(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return predictions, loss, grads[: len(watched)], grads[len(watched) :]
