"""TensorFlow pieces: gradients at intermediate layer outputs with ``tf.GradientTape``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def without_graph_optimizer() -> Iterator[None]:
    """TensorFlow's grappler off for the functions instantiated inside (a global option, restored after)."""
    import tensorflow as tf

    before = bool(tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False))
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})
