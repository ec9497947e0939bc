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
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import functional, io
from .config import DeLoRAConfig
from .model import (
    adapter_weights,
    delora_configs,
    delora_norm_report,
    get_delora_adapter_names,
    inject_delora,
    iter_delora_layers,
    merge_delora,
    remove_delora,
    unmerge_delora,
)
from .model import (
    disable_delora as _disable,
)
from .model import (
    enable_delora as _enable,
)
from .model import (
    set_delora_adapters as _set_adapters,
)
from .model import (
    set_delora_scale as _set_scale,
)
from .targets import SUPPORTED_TYPES, find_targets

W_NORM_TOLERANCE = 1e-2
"""Relative change of the column norms above which a load warns that the base model differs."""


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


# --- validation: a plan per component, built before anything changes -----------------------------------------
@dataclass
class _Plan:
    component: str
    module: nn.Module
    config: DeLoRAConfig  # the adapter's own config (recorded after loading)
    inject_config: DeLoRAConfig  # selects exactly the file's layers with the file's ranks
    layers: dict[str, dict[str, torch.Tensor]]
    warnings: list[str]


def _adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Canonical layer name -> frozen Linear/Conv2d, looking through PEFT (diffusers LoRA) wrappers."""
    layers: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        parts = name.split(".")
        if any(p == "delora" or p.startswith(("lora_", "delora_")) for p in parts):
            continue
        base = getattr(sub, "base_layer", None)
        if isinstance(base, nn.Module) and type(sub).__module__.startswith("peft."):
            sub = base
            while isinstance(getattr(sub, "base_layer", None), nn.Module):
                sub = sub.base_layer
        if isinstance(sub, SUPPORTED_TYPES):
            layers.setdefault(io.canonical_layer_name(name), sub)
    return layers


def _plan_component(
    component: str,
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    config: DeLoRAConfig,
    expected_class: str | None,
    source: str,
) -> _Plan:
    """Check the adapter against the live module: architecture, layer names, shapes, coverage."""
    actual_class = type(module).__name__
    if expected_class and expected_class != actual_class:
        raise io.DeLoRAFileError(
            f"{source!r} was made for another architecture: its {component!r} adapter is for a {expected_class}, "
            f"but this pipeline's {component} is a {actual_class}. Load it into a pipeline of the model it was "
            "trained on."
        )
    layers = io.validate_tensors(tensors, component, paper_init=config.init == "paper", source=source)
    available = _adaptable_layers(module)
    unknown = sorted(set(layers) - set(available))
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise io.DeLoRAFileError(
            f"{source!r} has keys for layers that {component} ({actual_class}) does not have: {shown} "
            f"({len(unknown)} unknown). The adapter was made for another architecture or component."
        )
    problems: list[str] = []
    drift = 0
    for name, named in layers.items():
        weight = available[name].weight
        out_features, in_features = weight.shape[0], weight[0].numel()
        rank = named["delora_A"].shape[0]
        expected = {
            "delora_A": (rank, in_features),
            "delora_B": (out_features, rank),
            "delora_w_norm": (in_features,),
        }
        for key, shape in expected.items():
            found = tuple(named[key].shape)
            if found != shape:
                raise io.DeLoRAFileError(
                    f"Shape mismatch in {source!r} at layer {component}.{name}: {key} should be {shape} for this "
                    f"model's {tuple(weight.shape)} weight, but the file has {found}. The adapter was made for "
                    "a model with other layer sizes."
                )
        w_file = named["delora_w_norm"].float()
        w_now = functional.column_norms(weight).cpu()
        if (w_now - w_file).abs().max() > W_NORM_TOLERANCE * max(w_file.abs().max().item(), 1e-12):
            drift += 1
    try:
        targets = {io.canonical_layer_name(n) for n, _ in find_targets(module, config)}
    except (TypeError, ValueError):
        targets = set(layers)  # the recorded targets do not resolve here; the layer check above decides
    missing = sorted(targets - set(layers))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise io.DeLoRAFileError(
            f"{source!r} is missing keys: its config targets {len(missing)} layer(s) of {component} that have "
            f"no tensors in the file ({shown}). The file is incomplete; re-save the adapter."
        )
    if drift:
        problems.append(
            f"{drift} of {len(layers)} {component} layers have column norms that differ from the ones recorded "
            "in the adapter: it was trained on another base model (or a LoRA is fused). It still loads; the "
            "results may differ from training."
        )
    ranks = {name: named["delora_A"].shape[0] for name, named in layers.items()}
    inject_config = DeLoRAConfig.from_dict(
        {
            **config.to_dict(),
            "target_modules": io.exact_targets(list(layers)),
            "exclude_modules": None,
            "rank": config.rank,
            "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
            "lambda_pattern": {},
        }
    )
    return _Plan(component, module, config, inject_config, layers, problems)


def _route(pipe: Any, data: io.AdapterData, component: str | None) -> dict[str, str]:
    """Map the adapter's components to the pipeline's: identity for our files, found for PEFT adapters."""
    available = delora_components(pipe)
    mapping: dict[str, str] = {}
    for comp in data.tensors:
        if comp:
            if component and component != comp and len(data.tensors) == 1:
                mapping[comp] = component
            else:
                mapping[comp] = comp
            continue
        if component:
            mapping[comp] = component
            continue
        wanted = data.metadata.get("component_classes", {}).get(comp)
        candidates = [n for n, m in available.items() if type(m).__name__ == wanted] if wanted else []
        if not candidates:
            candidates = list(available)
        fitting = []
        first_error: Exception | None = None
        for name in candidates:
            try:
                _plan_component(
                    name, available[name], data.tensors[comp], data.config(comp), None, data.source
                )
                fitting.append(name)
            except io.DeLoRAFileError as err:
                first_error = first_error or err
        if len(fitting) == 1:
            mapping[comp] = fitting[0]
        elif not fitting:
            raise io.DeLoRAFileError(
                f"The PEFT adapter {data.source!r} (base model class {wanted or 'unknown'}) fits none of this "
                f"pipeline's components {list(available)}; pass component=... if you know it. "
                f"First problem: {first_error}"
            )
        else:
            raise io.DeLoRAFileError(
                f"The PEFT adapter {data.source!r} fits several components {fitting}; pass component=... "
                f"(e.g. component={fitting[0]!r}) to choose."
            )
    for target in mapping.values():
        if target not in available:
            raise io.DeLoRAFileError(
                f"{data.source!r} has an adapter for {target!r}, but this {type(pipe).__name__} has no such "
                f"component (it has {list(available)}). The adapter was made for another architecture."
            )
    return mapping


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
    A PEFT adapter goes to the component whose class it records, or to `component`.
    """
    data = io.load_adapter(
        pretrained_model_name_or_path_or_dict, weight_name, subfolder, component=component, **hub_kwargs
    )
    name = adapter_name or data.metadata.get("adapter_name") or "default"
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"Adapter names must be non-empty strings without '.', got {name!r}.")
    if name in _all_adapter_names(pipe):
        raise ValueError(
            f"This pipeline already has a DeLoRA adapter named {name!r}; pass another adapter_name=... or "
            "call unload_delora_weights() first."
        )
    mapping = _route(pipe, data, component)
    available = delora_components(pipe)
    classes = data.metadata.get("component_classes", {})
    plans = [
        _plan_component(
            target, available[target], data.tensors[comp], data.config(comp), classes.get(comp), data.source
        )
        for comp, target in mapping.items()
    ]
    _apply(plans, name)
    for plan in plans:
        for message in plan.warnings:
            warnings.warn(f"{data.source}: {message}", UserWarning, stacklevel=3)
    metadata = dict(data.metadata)
    metadata.update(source=data.source, kind=data.kind, components=[p.component for p in plans])
    metadata["configs"] = {p.component: p.config.to_dict() for p in plans}
    _metadata_store(pipe)[name] = metadata
    return name


def _apply(plans: list[_Plan], name: str) -> None:
    """Inject and fill every planned component; on any failure undo all of it."""
    flags = {p.component: [(q, q.requires_grad) for q in p.module.parameters()] for p in plans}
    done: list[_Plan] = []
    try:
        for plan in plans:
            inject_delora(plan.module, plan.inject_config, name)
            done.append(plan)
            with torch.no_grad():
                for layer_name, _, _, adapter in iter_delora_layers(plan.module, name):
                    named = plan.layers[io.canonical_layer_name(layer_name)]
                    for key, target in adapter.file_tensors().items():
                        target.copy_(named[key].to(device=target.device, dtype=target.dtype))
            for param, flag in flags[plan.component]:
                param.requires_grad_(flag)
            for _, _, _, adapter in iter_delora_layers(plan.module, name):
                adapter.requires_grad_(False)
            delora_configs(plan.module)[name] = plan.config
    except BaseException:
        for plan in done:
            if any(True for _ in iter_delora_layers(plan.module, name)):
                remove_delora(plan.module, name)
            for param, flag in flags[plan.component]:
                param.requires_grad_(flag)
        raise


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
    """``with pipe.delora_scale(0.5): ...``; the previous per-adapter scales come back afterwards."""
    _require(pipe, adapter_name)
    previous = [
        (module, key, adapter.scale)
        for module in _with_adapters(pipe, adapter_name).values()
        for _, _, key, adapter in iter_delora_layers(module, adapter_name)
    ]
    set_delora_scale(pipe, scale, adapter_name)
    try:
        yield pipe
    finally:
        seen = set()
        for module, key, old in previous:
            if (id(module), key) not in seen:
                seen.add((id(module), key))
                _set_scale(module, old, key)


def set_delora_adapters(
    pipe: Any, adapter_names: str | list[str], weights: float | list[float] | None = None
) -> None:
    """Make exactly these adapters active in every component, each with its weight (default 1.0)."""
    names, weights = adapter_weights(adapter_names, weights)
    for name in names:
        _require(pipe, name)
    for module in _with_adapters(pipe).values():
        present = get_delora_adapter_names(module)
        chosen = [(n, w) for n, w in zip(names, weights, strict=True) if n in present]
        _set_adapters(module, [n for n, _ in chosen], [w for _, w in chosen])


def fuse_delora(
    pipe: Any,
    scale: float | None = None,
    components: list[str] | None = None,
    adapter_names: list[str] | None = None,
) -> None:
    """Bake the active adapters (at `scale`, if given) into the weights: no per-step cost until unfused."""
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


def unload_delora_weights(pipe: Any) -> None:
    """Remove every DeLoRA adapter (unfusing first): the pipeline is the base model again."""
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
        "base_model": getattr(pipe, "name_or_path", None),
        "pipeline_class": type(pipe).__name__,
        "training_args": None,
    }


def delora_report(pipe: Any, adapter_name: str | None = None) -> list[dict[str, Any]]:
    """Per layer and adapter: component, rank, lambda, scale, the bound and the actual |dW|/|W| now."""
    _require(pipe, adapter_name)
    rows = []
    for component, module in _with_adapters(pipe, adapter_name).items():
        scales = {
            (io.canonical_layer_name(n), k): a.effective_scale
            for n, _, k, a in iter_delora_layers(module, adapter_name)
        }
        for row in delora_norm_report(module, adapter_name):
            layer = io.canonical_layer_name(row["layer"])
            rows.append(
                {"component": component, **row, "layer": layer, "scale": scales[(layer, row["adapter"])]}
            )
    return rows


# --- install on DiffusionPipeline ------------------------------------------------------------------------------
METHODS = {
    "load_delora_weights": load_delora_weights,
    "save_delora_weights": save_delora_weights,
    "set_delora_scale": set_delora_scale,
    "delora_scale": delora_scale,
    "set_delora_adapters": set_delora_adapters,
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
