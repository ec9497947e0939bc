"""From live modules to an adapter file: the one step of the io package that takes nn.Modules.

:func:`save_delora_file` collects each component's adapter tensors and configs and hands plain tensors to
:func:`delora_diffusion.io.format.write_delora_file`. Metadata is what a user would share: a base model that is
a local folder is recorded by its folder name, and absolute paths in the training arguments by their last
part (the full paths stay in the run's local ``training_args.json``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .format import canonical_layer_name, write_delora_file


def unwrap_model(module: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers, so names and classes are the model's own."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def shareable_model_name(value: str | os.PathLike | None) -> str | None:
    """A model or folder as a user would share it: a hub id as given, a local path by its folder name only."""
    if value is None or not os.fspath(value):
        return None
    text = os.fspath(value)
    path = Path(text).expanduser()
    try:
        local = path.is_absolute() or path.exists()
    except OSError:
        local = True
    return (path.resolve().name or text) if local else text


def shareable_args(args: dict[str, Any]) -> dict[str, Any]:
    """Training arguments with every absolute or home-relative path cut to its folder or file name."""
    return {
        key: shareable_model_name(value)
        if isinstance(value, str) and (value.startswith("~") or os.path.isabs(value))
        else value
        for key, value in args.items()
    }


def adapter_tensors(
    module: nn.Module, adapter_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """One component's adapter as file tensors (``"<layer>.<tensor>"``) and its conv kernel shapes."""
    from ..model import iter_delora_layers

    tensors: dict[str, torch.Tensor] = {}
    conv_shapes: dict[str, list[int]] = {}
    for layer_name, base, _, adapter in iter_delora_layers(module, adapter_name):
        layer = canonical_layer_name(layer_name)
        if base.weight.ndim > 2:
            conv_shapes[layer] = list(base.weight.shape)
        for key, tensor in adapter.file_tensors().items():
            tensors[f"{layer}.{key}"] = tensor.detach().cpu().contiguous().clone()
    return tensors, conv_shapes


def exact_relative_bounds(module: nn.Module, adapter_name: str, config: Any) -> Any:
    """`config` with its per-layer rho written as exact, escaped layer names (what the loader may match).

    The loader never runs a pattern a file brings; literal layer names are the one exception it accepts, so a
    rho set per layer by any pattern comes back on exactly the same layers.
    """
    import dataclasses
    import re

    from ..model import iter_delora_layers

    if config.relative_bound is None or not config.relative_bound_pattern:
        return config
    exact = {
        re.escape(canonical_layer_name(name)): layer.relative_bound
        for name, _, _, layer in iter_delora_layers(module, adapter_name)
        if layer.relative_bound != config.relative_bound
    }
    return dataclasses.replace(config, relative_bound_pattern=exact)


def save_delora_file(
    path: str | os.PathLike,
    components: dict[str, nn.Module],
    adapter_name: str = "default",
    base_model: str | None = None,
    training_args: dict | None = None,
    *,
    pipeline_class: str | None = None,
) -> Path:
    """Write the adapter `adapter_name` of each component into one safetensors file, atomically.

    Components without that adapter are skipped; at least one must have it. The file is first written next
    to its destination and then renamed over it, so a crash never leaves a half-written adapter behind. A layer
    whose bound is absurd (:data:`~delora_diffusion.io.format.MAX_FILE_RELATIVE_BOUND`) is refused by name.
    """
    from .. import __version__
    from ..model import delora_configs

    per_component: dict[str, dict[str, torch.Tensor]] = {}
    configs, classes, conv_shapes = {}, {}, {}
    for component, module in components.items():
        if module is None:
            continue
        module = unwrap_model(module)
        if "." in component or not component:
            raise ValueError(f"Component names must be non-empty and without '.', got {component!r}.")
        tensors, convs = adapter_tensors(module, adapter_name)
        if not tensors:
            continue
        config = delora_configs(module).get(adapter_name)
        if config is None:
            raise ValueError(
                f"{component} has DeLoRA layers named {adapter_name!r} but no recorded DeLoRAConfig; "
                "create adapters with inject_delora (or load_delora_weights) so the config is known."
            )
        per_component[component], configs[component] = (
            tensors,
            exact_relative_bounds(module, adapter_name, config),
        )
        classes[component] = type(module).__name__
        if convs:
            conv_shapes[component] = convs
    if not per_component:
        raise ValueError(
            f"No component has a DeLoRA adapter named {adapter_name!r}; nothing to save. "
            f"Components given: {sorted(k for k, v in components.items() if v is not None)}."
        )
    metadata = {
        "library_version": __version__,
        "adapter_name": adapter_name,
        "component_classes": classes,
        "conv_shapes": conv_shapes,
        "base_model": shareable_model_name(base_model),
        "pipeline_class": pipeline_class,
        "training_args": None if training_args is None else shareable_args(training_args),
    }
    return write_delora_file(path, per_component, configs, metadata)
