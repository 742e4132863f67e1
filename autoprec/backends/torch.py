"""PyTorch pieces: gradients at intermediate layer outputs with ``torch.autograd.grad``.

Keras's torch variables are ``torch.nn.Parameter``s and every layer output that
depends on one carries autograd history, so the watched outputs are
differentiated directly; an output that depends on no variable (and so has no
history) is made a leaf that requires a gradient, as a tape would watch it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def gradient_pass(forward: Callable, loss_fn: Callable, x: Any, y: Any, variables: list) -> tuple:
    import torch

    watched: list = []

    def watch(tensor):
        if not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_(True)
        watched.append(tensor)
        return tensor

    with torch.enable_grad():
        predictions = forward(x, watch)
        loss = loss_fn(y, predictions)
        targets = [*watched, *(v.value for v in variables)]
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads, strict=True)]
    return predictions, loss, grads[: len(watched)], grads[len(watched) :]
