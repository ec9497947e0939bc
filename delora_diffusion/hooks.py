"""The forward hook each adapted layer carries: ``y = base(x) + update``, per adapter, eager or compiled.

Which scales or folded factors an adapter uses, and when they are computed, is :mod:`.fastpath`'s business;
the update's math is :mod:`.update`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fastpath import _options, layer_scales, traced_scales
from .layers import DeLoRAContainer
from .update import apply_update


def delora_forward_hook(base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """y = base(x) + the update of every contributing adapter."""
    container: DeLoRAContainer = base._modules["delora"]
    if container.disabled:
        return output
    if torch.compiler.is_compiling():
        return _compiled_update(base, container, args[0], output)
    x = args[0]
    for layer in container._modules.values():
        if not layer.contributes():
            continue
        # Drawn from torch's CPU generator, not Python's: gradient checkpointing restores that generator
        # before it recomputes a block, so the recompute drops the same adapters as the forward did.
        if layer.training and layer.module_dropout > 0 and torch.rand(()).item() < layer.module_dropout:
            continue
        scales = layer_scales(layer)
        factors = layer.__dict__.get("_factors")
        if factors is not None and factors[0] is scales and isinstance(base, nn.Linear):
            update = _factored_update(x, factors[1], factors[2])
        else:
            update = apply_update(base, layer, x, scales, _options.recompute_hidden)
        output = output + update.to(output.dtype)
    return output


def _factored_update(x: torch.Tensor, A_f: torch.Tensor, B_f: torch.Tensor) -> torch.Tensor:
    """The update on the batched fold's factors (:class:`~delora_diffusion.fold.FoldFactors`): LoRA's two matmuls, nothing more."""
    return F.linear(F.linear(x if x.dtype == A_f.dtype else x.to(A_f.dtype), A_f), B_f)


def _compiled_update(
    base: nn.Module, container: DeLoRAContainer, x: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """The hook as dynamo traces it: the scales the eager refresh handed over, else ones computed here from
    tensors only (:func:`traced_scales`); dropout as a tensor op. No Python-side checks, so no graph breaks."""
    for layer in container._modules.values():
        if not layer.active or layer.merged:
            continue
        factors = getattr(layer, "_compiled_factors", None)
        if factors is not None and isinstance(base, nn.Linear):
            update = _factored_update(x, *factors)
        else:
            scales = getattr(layer, "_compiled_scales", None)
            if scales is None:
                scales = traced_scales([layer])[0]
            update = apply_update(base, layer, x, scales, _options.recompute_hidden)
        if layer.training and layer.module_dropout > 0:
            update = update * (torch.rand((), device=x.device) >= layer.module_dropout)
        output = output + update.to(output.dtype)
    return output


def attach(base: nn.Module) -> DeLoRAContainer:
    """Give `base` its adapter container and the forward hook (once)."""
    container = base._modules.get("delora")
    if container is None:
        container = DeLoRAContainer()
        base.add_module("delora", container)
        base._delora_hook = base.register_forward_hook(delora_forward_hook)
    return container


def detach(base: nn.Module) -> None:
    """Remove the container and hook from `base` (after its last adapter is gone)."""
    base._delora_hook.remove()
    del base._delora_hook
    del base._modules["delora"]
