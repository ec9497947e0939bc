"""diffusers integration: ``pipe.load_delora_weights`` & co on every ``DiffusionPipeline``.

One generic implementation: it discovers the pipeline's denoiser (``unet`` or ``transformer``) and text
encoders (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``) and works on whichever exist, so SD, SDXL,
SD3, Flux and their img2img / inpaint siblings all get the same methods. Each method is a thin wrapper
around a module-level function taking the pipeline first (``load_delora_weights(pipe, ...)``).

Loading validates everything (file, architecture, layer names, shapes, values) before it touches the
pipeline, and rolls back on any later failure, so a failed load leaves the pipeline exactly as it was.
Adapters live beside diffusers' own LoRA (PEFT) layers on the same modules, in either loading order.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .io import planner
from .model import adapter_weights as _adapter_weights
from .model import (
    delora_configs,
    delora_norm_report,
    get_delora_adapter_names,
    iter_delora_layers,
    merge_delora,
    remove_delora,
    unmerge_delora,
)
from .model import delora_scale as _module_scale
from .model import disable_delora as _disable
from .model import enable_delora as _enable
from .model import set_delora_adapters as _set_adapters
from .model import set_delora_scale as _set_scale
from .util import check_adapter_name, finite_number

W_NORM_TOLERANCE = planner.W_NORM_TOLERANCE


def delora_components(pipe: Any) -> dict[str, nn.Module]:
    """The components that can carry adapters (denoiser and text encoders) that this pipeline has."""
    found = {}
    for name in io.COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            found[name] = module
    return found


def _with_adapters(pipe: Any, adapter_name: str | None = None) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in delora_components(pipe).items()
        if any(True for _ in iter_delora_layers(module, adapter_name))
    }


def get_list_delora_adapters(pipe: Any) -> dict[str, list[str]]:
    """Adapter names per component, like diffusers' ``get_list_adapters``."""
    return {name: get_delora_adapter_names(module) for name, module in _with_adapters(pipe).items()}


def _all_adapter_names(pipe: Any) -> list[str]:
    names: list[str] = []
    for per_component in get_list_delora_adapters(pipe).values():
        names += [n for n in per_component if n not in names]
    return names


def _require(pipe: Any, adapter_name: str | None) -> None:
    if adapter_name is not None and adapter_name not in _all_adapter_names(pipe):
        raise ValueError(
            f"No DeLoRA adapter named {adapter_name!r} in this pipeline; it has {_all_adapter_names(pipe)}."
        )


def _metadata_store(pipe: Any) -> dict[str, dict[str, Any]]:
    return pipe.__dict__.setdefault("_delora_metadata", {})


def load_delora_weights(
    pipe: Any,
    pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    weight_name: str | None = None,
    adapter_name: str | None = None,
    subfolder: str | None = None,
    component: str | None = None,
    **hub_kwargs: Any,
) -> str:
    """Load a DeLoRA adapter into the pipeline's components and return its adapter name.

    Sources: a directory (ours, found without weight_name, or a PEFT DeLoRA adapter), a ``.safetensors``
    file, a state dict, or a hub repo id (``hub_kwargs`` go to huggingface_hub: revision, cache_dir, ...).
    A PEFT adapter goes to the component whose class it records, or to `component`. Everything is checked
    (:mod:`delora_diffusion.io.planner`) before the pipeline changes; a failure leaves it as it was.
    """
    data = io.load_adapter(
        pretrained_model_name_or_path_or_dict, weight_name, subfolder, component=component, **hub_kwargs
    )
    name = check_adapter_name(adapter_name or data.metadata.get("adapter_name") or "default")
    if name in _all_adapter_names(pipe):
        raise ValueError(
            f"This pipeline already has a DeLoRA adapter named {name!r}; pass another adapter_name=... or "
            "call unload_delora_weights() first."
        )
    plans = planner.plan_load(delora_components(pipe), data, component, owner=type(pipe).__name__)
    planner.apply_plans(plans, name)
    for plan in plans:
        for message in plan.warnings:
            warnings.warn(f"{data.source}: {message}", UserWarning, stacklevel=3)
    metadata = dict(data.metadata)
    metadata.update(source=data.source, kind=data.kind, components=[p.component for p in plans])
    metadata["configs"] = {p.component: p.config.to_dict() for p in plans}
    metadata["base_model"] = io.shareable_model_name(metadata.get("base_model"))  # older files held paths
    if isinstance(metadata.get("training_args"), dict):
        metadata["training_args"] = io.shareable_args(metadata["training_args"])
    _metadata_store(pipe)[name] = metadata
    return name


def _one_adapter(pipe: Any, adapter_name: str | None, purpose: str) -> str:
    """`adapter_name` checked, or the pipeline's only adapter when it is None (else a clear error)."""
    if adapter_name is None:
        names = _all_adapter_names(pipe)
        if len(names) != 1:
            raise ValueError(
                f"This pipeline has DeLoRA adapters {names}; pass adapter_name=... to choose which one {purpose}."
                if names
                else f"This pipeline has no DeLoRA adapter {purpose}."
            )
        adapter_name = names[0]
    _require(pipe, adapter_name)
    return adapter_name


def save_delora_weights(
    pipe: Any,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    training_args: dict | None = None,
    weight_name: str = io.WEIGHT_NAME,
) -> Path:
    """Save one adapter (the only one, or `adapter_name`) from every component that has it."""
    adapter_name = _one_adapter(pipe, adapter_name, "to save")
    loaded = _metadata_store(pipe).get(adapter_name, {})
    if training_args is None:
        training_args = loaded.get("training_args")
    base = loaded.get("base_model") or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    return io.save_delora_file(
        Path(save_directory) / weight_name,
        _with_adapters(pipe, adapter_name),
        adapter_name,
        base_model=base or None,
        training_args=training_args,
        pipeline_class=type(pipe).__name__,
    )


def set_delora_scale(pipe: Any, scale: float, adapter_name: str | None = None) -> None:
    """Multiply lambda by `scale` in every component (0: the base model exactly; 1: the trained adapter)."""
    _require(pipe, adapter_name)
    for module in _with_adapters(pipe, adapter_name).values():
        _set_scale(module, scale, adapter_name)


@contextlib.contextmanager
def delora_scale(pipe: Any, scale: float, adapter_name: str | None = None) -> Iterator[Any]:
    """``with pipe.delora_scale(0.5): ...``; the previous per-adapter scales come back afterwards.

    :func:`delora_diffusion.model.delora_scale` on every component that has the adapter.
    """
    _require(pipe, adapter_name)
    with contextlib.ExitStack() as stack:
        for module in _with_adapters(pipe, adapter_name).values():
            stack.enter_context(_module_scale(module, scale, adapter_name))
        yield pipe


def _component_weight(weight: Any, component: str, components: list[str]) -> float:
    """One adapter's weight for one component: a number, None (1.0), or diffusers' per-component dict."""
    if weight is None:
        return 1.0
    if isinstance(weight, Mapping):
        unknown = sorted(set(weight) - set(components))
        if unknown:
            raise ValueError(
                f"Adapter weights for unknown components {unknown}; this pipeline has {components}."
            )
        weight = weight.get(component, 1.0)
    return finite_number(weight, f"The adapter weight for {component}")


def set_delora_adapters(
    pipe: Any,
    adapter_names: str | list[str],
    adapter_weights: float | dict | list[float | dict | None] | None = None,
    *,
    weights: float | list[float] | None = None,
) -> None:
    """Make exactly these adapters active in every component, each with its weight (default 1.0).

    Takes diffusers' ``set_adapters`` arguments: a weight per name (or one for all), where a weight may be
    None (1.0) or a dict per component (``{"unet": 0.8, "text_encoder": 0.5}``; components left out get 1.0).
    ``weights=`` is the older name of ``adapter_weights``.
    """
    if weights is not None and adapter_weights is not None:
        raise TypeError("Pass adapter_weights (diffusers' name) or weights, not both.")
    names, per_name = _adapter_weights(adapter_names, adapter_weights if weights is None else weights)
    for name in names:
        _require(pipe, name)
    components = list(delora_components(pipe))
    for component, module in _with_adapters(pipe).items():
        present = get_delora_adapter_names(module)
        chosen = [
            (n, _component_weight(w, component, components)) for n, w in zip(names, per_name, strict=True)
        ]
        chosen = [(n, w) for n, w in chosen if n in present]
        _set_adapters(module, [n for n, _ in chosen], [w for _, w in chosen])


def get_active_delora_adapters(pipe: Any) -> list[str]:
    """The adapters that are active (set by set_delora_adapters), in load order, like diffusers' method."""
    active = {
        key for m in _with_adapters(pipe).values() for _, _, key, a in iter_delora_layers(m) if a.active
    }
    return [name for name in _all_adapter_names(pipe) if name in active]


def fuse_delora(
    pipe: Any,
    scale: float | None = None,
    components: list[str] | None = None,
    adapter_names: list[str] | None = None,
    *,
    lora_scale: float | None = None,
    safe_fusing: bool = True,
) -> None:
    """Bake the active adapters (at `scale`, if given) into the weights: no per-step cost until unfused.

    ``lora_scale`` is diffusers' name for `scale`. Fusing always refuses non-finite weights, so diffusers'
    ``safe_fusing`` is accepted and always on.
    """
    if lora_scale is not None:
        if scale is not None and scale != lora_scale:
            raise ValueError(
                f"fuse_delora got scale={scale!r} and lora_scale={lora_scale!r}; pass one of them."
            )
        scale = lora_scale
    if scale is not None:
        scale = finite_number(scale, "The DeLoRA scale")
    targets = _with_adapters(pipe)
    if components is not None:
        unknown = sorted(set(components) - set(delora_components(pipe)))
        if unknown:
            raise ValueError(
                f"Unknown components {unknown}; this pipeline has {list(delora_components(pipe))}."
            )
        targets = {n: m for n, m in targets.items() if n in components}
    for name in adapter_names or []:
        _require(pipe, name)
    restore = pipe.__dict__.setdefault("_delora_fuse_scales", [])
    for module in targets.values():
        if scale is not None:
            first_scales = {}
            for _, _, key, adapter in iter_delora_layers(module):
                first_scales.setdefault(key, adapter.scale)
            restore += [(module, key, old) for key, old in first_scales.items()]
            _set_scale(module, scale)
        present = get_delora_adapter_names(module)
        merge_delora(module, None if adapter_names is None else [n for n in adapter_names if n in present])


def unfuse_delora(pipe: Any, components: list[str] | None = None) -> None:
    """Take fused updates back out of the weights (and restore the scales fuse_delora changed)."""
    for name, module in _with_adapters(pipe).items():
        if components is None or name in components:
            unmerge_delora(module)
    restore = pipe.__dict__.get("_delora_fuse_scales", [])
    for module, key, old in reversed(restore):
        if key in get_delora_adapter_names(module):
            _set_scale(module, old, key)
    restore.clear()


def delete_delora_adapters(pipe: Any, adapter_names: str | list[str]) -> None:
    """Remove these adapters from every component (unfusing them first), like diffusers' ``delete_adapters``."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for name in names:
        _require(pipe, name)
    for name in names:
        for module in _with_adapters(pipe, name).values():
            remove_delora(module, name)
        _metadata_store(pipe).pop(name, None)
    restore = pipe.__dict__.get("_delora_fuse_scales")
    if restore:
        restore[:] = [entry for entry in restore if entry[1] not in names]


def unload_delora_weights(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter, or every one with None (unfusing first): with None the pipeline is the base again."""
    if adapter_name is not None:
        delete_delora_adapters(pipe, [adapter_name])
        return
    for module in _with_adapters(pipe).values():
        remove_delora(module)
    _metadata_store(pipe).clear()
    pipe.__dict__.pop("_delora_fuse_scales", None)


def bake_delora(pipe: Any, scale: float | None = None) -> None:
    """Fuse the active adapters permanently and drop them: plain weights, as for a full model export."""
    fuse_delora(pipe, scale=scale)
    for module in _with_adapters(pipe).values():
        for _, _, _, adapter in iter_delora_layers(module):
            adapter.merged = False  # the update stays in the weight; removal must not subtract it
        remove_delora(module)
    _metadata_store(pipe).clear()
    pipe.__dict__.pop("_delora_fuse_scales", None)


def disable_delora(pipe: Any) -> None:
    """Switch all adapters off (fused ones are unfused) until enable_delora."""
    for module in _with_adapters(pipe).values():
        _disable(module)


def enable_delora(pipe: Any) -> None:
    for module in _with_adapters(pipe).values():
        _enable(module)


def get_delora_metadata(pipe: Any, adapter_name: str | None = None) -> dict[str, Any]:
    """The metadata of an adapter (what its file recorded: configs, base model, training args, ...)."""
    adapter_name = _one_adapter(pipe, adapter_name, "to describe")
    stored = _metadata_store(pipe).get(adapter_name)
    if stored is not None:
        return dict(stored)
    modules = _with_adapters(pipe, adapter_name)
    return {
        "format": io.FORMAT_NAME,
        "format_version": io.FORMAT_VERSION,
        "adapter_name": adapter_name,
        "source": None,
        "kind": "injected",
        "components": list(modules),
        "component_classes": {n: type(m).__name__ for n, m in modules.items()},
        "configs": {n: delora_configs(m)[adapter_name].to_dict() for n, m in modules.items()},
        "base_model": io.shareable_model_name(getattr(pipe, "name_or_path", None)),
        "pipeline_class": type(pipe).__name__,
        "training_args": None,
    }


def delora_report(pipe: Any, adapter_name: str | None = None) -> list[dict[str, Any]]:
    """Per layer and adapter: component, rank, lambda, scale, the bound and the actual |dW|/|W| now."""
    _require(pipe, adapter_name)
    rows = []
    for component, module in _with_adapters(pipe, adapter_name).items():
        for row in delora_norm_report(module, adapter_name):
            rows.append({"component": component, **row, "layer": io.canonical_layer_name(row["layer"])})
    return rows


# --- install on DiffusionPipeline ------------------------------------------------------------------------------
METHODS = {
    "load_delora_weights": load_delora_weights,
    "save_delora_weights": save_delora_weights,
    "set_delora_scale": set_delora_scale,
    "delora_scale": delora_scale,
    "set_delora_adapters": set_delora_adapters,
    "get_active_delora_adapters": get_active_delora_adapters,
    "delete_delora_adapters": delete_delora_adapters,
    "fuse_delora": fuse_delora,
    "unfuse_delora": unfuse_delora,
    "unload_delora_weights": unload_delora_weights,
    "disable_delora": disable_delora,
    "enable_delora": enable_delora,
    "get_list_delora_adapters": get_list_delora_adapters,
    "get_delora_metadata": get_delora_metadata,
    "delora_report": delora_report,
}


def install(pipeline_class: type | None = None) -> None:
    """Add the methods to ``diffusers.DiffusionPipeline`` (done on ``import delora_diffusion``)."""
    if pipeline_class is None:
        from diffusers import DiffusionPipeline

        pipeline_class = DiffusionPipeline
    for name, function in METHODS.items():
        setattr(pipeline_class, name, function)


install()
