"""Model-level DeLoRA operations: inject, merge, scale, select, remove. Small functions over the layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import fastpath, functional
from .config import DeLoRAConfig
from .hooks import attach, detach
from .layers import DeLoRAContainer, DeLoRALayer, merge_adapter, rebuild_weight, unmerge_adapter
from .targets import find_targets
from .util import DTYPES, check_adapter_name, finite_number


def iter_delora_layers(
    model: nn.Module, adapter_name: str | None = None
) -> Iterator[tuple[str, nn.Module, str, DeLoRALayer]]:
    """Yield ``(layer_name, frozen_layer, adapter_name, adapter)`` for every adapter in `model`."""
    for name, module in model.named_modules():
        adapters = module._modules.get("delora")
        if not isinstance(adapters, DeLoRAContainer):
            continue
        for key, adapter in adapters.items():
            if adapter_name is None or key == adapter_name:
                yield name, module, key, adapter


def get_delora_adapter_names(model: nn.Module) -> list[str]:
    """Adapter names in injection order."""
    return list(delora_configs(model)) or sorted({key for _, _, key, _ in iter_delora_layers(model)})


def delora_configs(model: nn.Module) -> dict[str, DeLoRAConfig]:
    """The config each adapter was injected with, by adapter name."""
    return model.__dict__.setdefault("_delora_configs", {})


def _check_new_adapter_name(model: nn.Module, adapter_name: Any) -> None:
    check_adapter_name(adapter_name)
    if any(True for _ in iter_delora_layers(model, adapter_name)):
        raise ValueError(
            f"An adapter named {adapter_name!r} is already injected in {type(model).__name__}; "
            "pick another adapter_name or remove_delora() it first."
        )


def _require_adapter(model: nn.Module, adapter_name: str) -> None:
    if not any(True for _ in iter_delora_layers(model, adapter_name)):
        names = get_delora_adapter_names(model)
        raise ValueError(
            f"No DeLoRA adapter named {adapter_name!r} in {type(model).__name__}; it has {names}."
        )


def inject_delora(model: nn.Module, config: DeLoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Add a DeLoRA adapter to the targeted layers of `model`, in place, and make it the only trainable part.

    All checks run before anything changes, and a failure half-way is rolled back, so on error the model is
    exactly as it was.
    """
    if not isinstance(config, DeLoRAConfig):
        raise TypeError(f"inject_delora expects a DeLoRAConfig, got {type(config).__name__}.")
    _check_new_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    dtype = DTYPES[config.dtype]
    created: list[nn.Module] = []
    try:
        for name, layer in targets:
            adapter = DeLoRALayer(
                layer,
                rank=config.rank_for(name),
                lambda_init=config.lambda_for(name),
                init=config.init,
                module_dropout=config.module_dropout,
                dtype=dtype,
                relative_bound=config.relative_bound_for(name),
            )
            adapter.train(layer.training)  # an eval-mode model (a loaded pipeline) never drops modules
            attach(layer)[adapter_name] = adapter
            created.append(layer)
    except BaseException:
        for layer in created:
            _drop(layer, adapter_name)
        fastpath.structure_changed()
        raise
    model.requires_grad_(False)
    for _, _, _, adapter in iter_delora_layers(model, adapter_name):
        for param in adapter.parameters():
            param.requires_grad_(True)
    delora_configs(model)[adapter_name] = config
    if "_delora_refresh_hook" not in model.__dict__:
        model.__dict__["_delora_refresh_hook"] = model.register_forward_pre_hook(fastpath.refresh_pre_hook)
    fastpath.structure_changed()
    return model


def _drop(layer: nn.Module, adapter_name: str) -> None:
    adapters: DeLoRAContainer = layer.delora
    unmerge_adapter(layer, adapters[adapter_name])
    del adapters[adapter_name]
    if len(adapters) == 0:
        detach(layer)


def remove_delora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter (or all with None), unmerging first, so the frozen weights are as before."""
    names = get_delora_adapter_names(model) if adapter_name is None else [adapter_name]
    if adapter_name is not None:
        _require_adapter(model, adapter_name)
    for name in names:
        for _, layer, _, _ in list(iter_delora_layers(model, name)):
            _drop(layer, name)
        delora_configs(model).pop(name, None)
    if not any(True for _ in iter_delora_layers(model)) and "_delora_refresh_hook" in model.__dict__:
        model.__dict__.pop("_delora_refresh_hook").remove()
        model.__dict__.pop("_delora_plan", None)
    fastpath.structure_changed()
    return model


def merge_delora(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Bake the update of the given (default: active) adapters into the frozen weights."""
    for name in adapter_names or []:
        _require_adapter(model, name)
    for _, layer, key, adapter in iter_delora_layers(model):
        chosen = (
            key in adapter_names
            if adapter_names is not None
            else adapter.active and not layer.delora.disabled
        )
        if chosen:
            merge_adapter(layer, adapter)
    return model


def unmerge_delora(model: nn.Module) -> nn.Module:
    """Take every merged update back out of the frozen weights."""
    for _, layer, _, adapter in iter_delora_layers(model):
        unmerge_adapter(layer, adapter)
    return model


def _set_run_scale(
    layer: nn.Module, adapter: DeLoRALayer, scale: float | None = None, adapter_weight: float | None = None
) -> None:
    """Change a run-time scale; a merged adapter's weight is rebuilt once from the pristine copy, so the weights
    follow (as a fresh merge at the new scale, bit for bit). If that fails, the old scale stays."""
    before = adapter.scale, adapter.adapter_weight
    if scale is not None:
        adapter.scale = scale
    if adapter_weight is not None:
        adapter.adapter_weight = adapter_weight
    if adapter.merged:
        try:
            rebuild_weight(layer)
        except BaseException:
            adapter.scale, adapter.adapter_weight = before
            raise


def set_delora_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> nn.Module:
    """Multiply lambda by `scale` at run time (0 gives the base model exactly, 1 the trained adapter)."""
    scale = finite_number(scale, "The DeLoRA scale")
    if adapter_name is not None:
        _require_adapter(model, adapter_name)
    layers = [(layer, adapter) for _, layer, _, adapter in iter_delora_layers(model, adapter_name)]
    with _all_or_none(layers):
        for layer, adapter in layers:
            _set_run_scale(layer, adapter, scale=scale)
    return model


@contextlib.contextmanager
def _all_or_none(layers: list[tuple[nn.Module, DeLoRALayer]]) -> Iterator[None]:
    """Run-time changes over many layers, undone on all of them if one fails (a merged layer whose new weights
    are not finite): the model is then as it was, not half changed."""
    before = [(adapter.scale, adapter.adapter_weight, adapter.active) for _, adapter in layers]
    try:
        yield
    except BaseException:
        for (layer, adapter), (scale, weight, active) in reversed(list(zip(layers, before, strict=True))):
            adapter.active = active
            _set_run_scale(layer, adapter, scale=scale, adapter_weight=weight)
        raise


def get_delora_scale(model: nn.Module, adapter_name: str | None = None) -> float | None:
    """The current run-time scale of lambda (of the first matching adapter), or None without adapters."""
    for _, _, _, adapter in iter_delora_layers(model, adapter_name):
        return adapter.scale
    return None


@contextlib.contextmanager
def delora_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """``with delora_scale(unet, 0.5): ...`` and the previous per-adapter scales come back afterwards."""
    previous = {(id(a)): (layer, a, a.scale) for _, layer, _, a in iter_delora_layers(model, adapter_name)}
    set_delora_scale(model, scale, adapter_name)
    try:
        yield model
    finally:
        for layer, adapter, old in previous.values():
            _set_run_scale(layer, adapter, scale=old)


def adapter_weights(
    adapter_names: str | list[str], weights: float | list[float] | None = None
) -> tuple[list[str], list[float]]:
    """Names and one weight per name, the way diffusers' ``set_adapters`` takes them (a scalar applies to all)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None:
        weights = [1.0] * len(names)
    elif not isinstance(weights, (list, tuple)):
        weights = [weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(
            f"Got {len(names)} adapter names but {len(weights)} weights; pass one weight per name."
        )
    return names, list(weights)


def set_delora_adapters(
    model: nn.Module, adapter_names: str | list[str], weights: float | list[float] | None = None
) -> nn.Module:
    """Make exactly these adapters active, each with its weight (default 1.0); the others are switched off."""
    names, weights = adapter_weights(adapter_names, weights)
    for name in names:
        _require_adapter(model, name)
    chosen = {
        n: finite_number(w, f"The weight of adapter {n!r}") for n, w in zip(names, weights, strict=True)
    }
    layers = [(layer, key, adapter) for _, layer, key, adapter in iter_delora_layers(model)]
    with _all_or_none([(layer, adapter) for layer, _, adapter in layers]):
        for layer, key, adapter in layers:
            if key in chosen:
                _set_run_scale(layer, adapter, adapter_weight=chosen[key])
            adapter.active = key in chosen
    return model


def _set_disabled(model: nn.Module, disabled: bool) -> nn.Module:
    for _, layer, _, adapter in iter_delora_layers(model):
        if disabled:
            unmerge_adapter(layer, adapter)
        layer.delora.disabled = disabled
    return model


def disable_delora(model: nn.Module) -> nn.Module:
    """Switch every adapter off (merged ones are unmerged) until enable_delora."""
    return _set_disabled(model, True)


def enable_delora(model: nn.Module) -> nn.Module:
    return _set_disabled(model, False)


def delora_parameters(
    model: nn.Module, adapter_name: str | None = None, lr: float | None = None, lambda_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: A/B apart from lambda, so lambda can have its own learning rate.

    Only trainable parameters are returned. `lr` / `lambda_lr`, when given, set each group's learning rate.
    """
    factors: list[nn.Parameter] = []
    lambdas: list[nn.Parameter] = []
    for _, _, _, adapter in iter_delora_layers(model, adapter_name):
        factors += [p for p in (adapter.delora_A, adapter.delora_B) if p.requires_grad]
        if adapter.delora_lambda.requires_grad:
            lambdas.append(adapter.delora_lambda)
    groups = [{"params": factors, "name": "delora_AB"}, {"params": lambdas, "name": "delora_lambda"}]
    for group, value in zip(groups, (lr, lambda_lr), strict=True):
        if value is not None:
            group["lr"] = value
    return [g for g in groups if g["params"]]


def delora_norm_report(model: nn.Module, adapter_name: str | None = None) -> list[dict[str, Any]]:
    """Per layer: lambda, the guaranteed bound on |dW|_F, and the actual |dW|_F / |W|_F at the current scale."""
    rows = []
    with torch.no_grad():
        for layer_name, _, key, adapter in iter_delora_layers(model, adapter_name):
            lam = adapter.bounded_lambda().float() * adapter.effective_scale
            stats = functional.norm_stats(
                adapter.delta_weight(), lam, adapter.delora_w_norm, adapter.init == "paper"
            )
            rows.append(
                {
                    "layer": layer_name,
                    "adapter": key,
                    "rank": adapter.rank,
                    "lambda": adapter.bounded_lambda().item(),
                    "rho": adapter.relative_bound,
                    "scale": adapter.effective_scale,
                    **stats,
                }
            )
    return rows
