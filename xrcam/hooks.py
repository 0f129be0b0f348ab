"""The one hook helper: capture stage outputs, and put a model's state back as it was.

- :func:`capture` registers forward hooks on named submodules and yields the dict they fill with each
  module's output during the block; the hooks are removable handles, removed on exit even on error.
- :func:`model_state` sets eval/train mode (optionally dropout alone active) and freezes parameters for
  the block, restoring every module's own ``training`` flag and every parameter's ``requires_grad``.
- :func:`stage_shapes` is the spatial size of each stage's output for a given input size (one no-grad
  forward of a zero image), what the results layout records as ``map_shapes``.

Example::

    with model_state(model, training=False), capture(model, ["layer3", "layer4"], detach=True) as acts:
        logits = model(images)
    acts["layer4"].shape   # (B, K, h, w)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from xrcam.errors import XrcamConfigError

__all__ = ["capture", "model_state", "stage_shapes"]


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], *, detach: bool = False) -> Iterator[dict[str, Tensor]]:
    """Yield ``{layer: output}`` filled by forward hooks on ``model.get_submodule(layer)`` for each layer.

    ``detach=True`` stores detached outputs (no graph kept alive). A later forward in the block
    overwrites the earlier outputs. An unknown layer is an :class:`~xrcam.errors.XrcamConfigError`.
    """
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name in layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise XrcamConfigError(f"layer {name!r} not found in {type(model).__name__}") from None

            def hook(_module: nn.Module, _inputs, output: Tensor, name: str = name) -> None:
                store[name] = output.detach() if detach else output

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def model_state(
    model: nn.Module, *, training: bool | None = False, dropout: bool = False, frozen: bool = False
) -> Iterator[nn.Module]:
    """Run the block with ``model.train(training)`` (``None``: leave modes alone), dropout layers active
    when ``dropout``, and parameters frozen when ``frozen``; every flag is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()] if frozen else []
    try:
        if training is not None:
            model.train(training)
        if dropout:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.train()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def stage_shapes(
    model: nn.Module,
    size: tuple[int, int],
    layers: Sequence[str],
    *,
    device: torch.device | str | None = None,
) -> dict[str, tuple[int, int]]:
    """``{layer: (h, w)}`` of each layer's output for ``(3, *size)`` inputs (one forward, eval mode)."""
    if device is None:
        device = next(model.parameters()).device
    with model_state(model, training=False), capture(model, layers, detach=True) as outputs, torch.no_grad():
        model(torch.zeros(1, 3, *size, device=device))
    return {layer: tuple(outputs[layer].shape[-2:]) for layer in layers}
