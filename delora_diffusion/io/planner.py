"""The load planner: an adapter's tensors checked against live modules, then applied all at once or not at all.

:func:`plan_load` builds one :class:`LoadPlan` per component before anything changes (architecture, layer
names, shapes, coverage, routing of PEFT adapters); :func:`apply_plans` injects and fills every planned
component and rolls all of it back on any failure, so a failed load leaves the modules exactly as they were.

Nothing a file says is ever run: the layers to adapt are the exact names found in its tensors, checked against
the module's own layer names. The only pattern matched at load is the one built here from those names with
``re.escape``; target patterns recorded in the file's config are information, never evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import functional
from ..config import DeLoRAConfig
from ..model import delora_configs, inject_delora, iter_delora_layers, remove_delora
from ..targets import SUPPORTED_TYPES
from .format import AdapterData, DeLoRAFileError, canonical_layer_name, name_list, validate_tensors
from .sources import most_common_rank

W_NORM_TOLERANCE = 1e-2
"""Relative change of the column norms above which a load warns that the base model differs."""


@dataclass
class LoadPlan:
    """What loading will do to one component, decided before any module changes."""

    component: str
    module: nn.Module
    config: DeLoRAConfig  # the adapter's own config (recorded after loading)
    inject_config: DeLoRAConfig  # selects exactly the file's layers with the file's ranks
    layers: dict[str, dict[str, torch.Tensor]]
    warnings: list[str]


def adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
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
            layers.setdefault(canonical_layer_name(name), sub)
    return layers


def exact_targets(layer_names: list[str]) -> str:
    """A target_modules regex that selects exactly these layers: literal names, escaped, nothing else."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(layer_names)) + ")"


def exact_config(config: DeLoRAConfig, layers: Mapping[str, Mapping[str, torch.Tensor]]) -> DeLoRAConfig:
    """`config` re-aimed at exactly `layers` with their ranks; every pattern the file recorded is dropped."""
    ranks = {name: named["delora_A"].shape[0] for name, named in layers.items()}
    rank = most_common_rank(ranks)
    data = config.to_dict()
    for key, value in data.items():
        if key.endswith("_pattern") and isinstance(value, dict):
            data[key] = {}
    literal = {re.escape(n) for n in layers}  # per-layer rho, saved as exact names (io.saving); nothing else
    data["relative_bound_pattern"] = {
        k: v for k, v in config.relative_bound_pattern.items() if k in literal and config.relative_bound
    }
    data.update(
        target_modules=exact_targets(list(layers)),
        exclude_modules=None,
        rank=rank,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
    )
    return DeLoRAConfig.from_dict(data)


def _check_shapes(component: str, available: dict[str, nn.Module], layers: dict, source: str) -> int:
    """Every layer's tensors fit the live weight; returns how many layers' column norms drifted."""
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
                raise DeLoRAFileError(
                    f"Shape mismatch in {source!r} at layer {component}.{name}: {key} should be {shape} for this "
                    f"model's {tuple(weight.shape)} weight, but the file has {found}. The adapter was made for "
                    "a model with other layer sizes."
                )
        w_file = named["delora_w_norm"].float()
        w_now = functional.column_norms(weight).cpu()
        if (w_now - w_file).abs().max() > W_NORM_TOLERANCE * max(w_file.abs().max().item(), 1e-12):
            drift += 1
    return drift


def plan_component(
    component: str,
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    config: DeLoRAConfig,
    expected_class: str | None,
    source: str,
) -> LoadPlan:
    """Check the adapter against the live module: architecture, layer names, shapes."""
    actual_class = type(module).__name__
    if expected_class and expected_class != actual_class:
        raise DeLoRAFileError(
            f"{source!r} was made for another architecture: its {component!r} adapter is for a {expected_class}, "
            f"but this pipeline's {component} is a {actual_class}. Load it into a pipeline of the model it was "
            "trained on."
        )
    layers = validate_tensors(tensors, component, paper_init=config.init == "paper", source=source)
    available = adaptable_layers(module)
    unknown = sorted(set(layers) - set(available))
    if unknown:
        raise DeLoRAFileError(
            f"{source!r} has keys for layers that {component} ({actual_class}) does not have: {name_list(unknown)} "
            f"({len(unknown)} unknown). The adapter was made for another architecture or component."
        )
    drift = _check_shapes(component, available, layers, source)
    problems = []
    if drift:
        problems.append(
            f"{drift} of {len(layers)} {component} layers have column norms that differ from the ones recorded "
            "in the adapter: it was trained on another base model (or a LoRA is fused). It still loads; the "
            "results may differ from training."
        )
    return LoadPlan(component, module, config, exact_config(config, layers), layers, problems)


def _route_unnamed(available: dict[str, nn.Module], data: AdapterData, comp: str) -> str:
    """A PEFT adapter without a component: the one component whose class and layer shapes it fits."""
    wanted = data.metadata.get("component_classes", {}).get(comp)
    candidates = [n for n, m in available.items() if type(m).__name__ == wanted] if wanted else []
    fitting: list[str] = []
    first_error: Exception | None = None
    for name in candidates or list(available):
        try:
            plan_component(name, available[name], data.tensors[comp], data.config(comp), None, data.source)
            fitting.append(name)
        except DeLoRAFileError as err:
            first_error = first_error or err
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        raise DeLoRAFileError(
            f"The PEFT adapter {data.source!r} (base model class {wanted or 'unknown'}) fits none of this "
            f"pipeline's components {list(available)}; pass component=... if you know it. "
            f"First problem: {first_error}"
        )
    raise DeLoRAFileError(
        f"The PEFT adapter {data.source!r} fits several components {fitting}; pass component=... "
        f"(e.g. component={fitting[0]!r}) to choose."
    )


def route(
    available: dict[str, nn.Module], data: AdapterData, component: str | None, owner: str
) -> dict[str, str]:
    """Map the adapter's components to the pipeline's: identity for our files, found for PEFT adapters."""
    mapping: dict[str, str] = {}
    for comp in data.tensors:
        if comp:
            mapping[comp] = component if component and component != comp and len(data.tensors) == 1 else comp
        else:
            mapping[comp] = component or _route_unnamed(available, data, comp)
    for target in mapping.values():
        if target not in available:
            raise DeLoRAFileError(
                f"{data.source!r} has an adapter for {target!r}, but this {owner} has no such component (it has "
                f"{list(available)}). The adapter was made for another architecture."
            )
    return mapping


def plan_load(
    available: dict[str, nn.Module], data: AdapterData, component: str | None = None, owner: str = "pipeline"
) -> list[LoadPlan]:
    """One checked plan per component the adapter goes to; raises before anything changes."""
    classes = data.metadata.get("component_classes", {})
    return [
        plan_component(
            target, available[target], data.tensors[comp], data.config(comp), classes.get(comp), data.source
        )
        for comp, target in route(available, data, component, owner).items()
    ]


def apply_plans(plans: list[LoadPlan], name: str) -> None:
    """Inject and fill every planned component as adapter `name`, frozen; on any failure undo all of it."""
    flags = {p.component: [(q, q.requires_grad) for q in p.module.parameters()] for p in plans}
    done: list[LoadPlan] = []
    try:
        for plan in plans:
            inject_delora(plan.module, plan.inject_config, name)
            done.append(plan)
            with torch.no_grad():
                for layer_name, _, _, adapter in iter_delora_layers(plan.module, name):
                    named = plan.layers[canonical_layer_name(layer_name)]
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
