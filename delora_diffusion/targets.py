"""Finding the modules to adapt: presets per architecture and the matching rules.

A target list entry matches a module when it equals the module's full name or its dotted tail (a regex, as
in PEFT: ``"to_q"`` matches ``...attn1.to_q``). A plain string that is not a preset name is a regex over the
full module name.
"""

from __future__ import annotations

import re

from torch import nn

from .config import DeLoRAConfig, name_matches

_ATTN = ["to_q", "to_k", "to_v", r"to_out\.0"]
_JOINT_ATTN = _ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_UNET_PROJ = ["attentions\\.\\d+\\.proj_in", "attentions\\.\\d+\\.proj_out"]
_FF = [r"ff\.net\.0\.proj", r"ff\.net\.2"]
_UNET_CONV = [r"resnets\.\d+\.conv1", r"resnets\.\d+\.conv2"]

PRESETS: dict[str, list[str]] = {
    # SD1.x/2.x and SDXL UNets: attention projections by default; the rest are opt-ins.
    "unet": _ATTN,
    "unet-proj": _ATTN + _UNET_PROJ,
    "unet-ff": _ATTN + _FF,
    "unet-conv": _ATTN + _UNET_CONV,
    "unet-all": _ATTN + _UNET_PROJ + _FF + _UNET_CONV,
    # MMDiT: SD3 joint blocks; Flux double blocks (joint) and single blocks (to_q/k/v only).
    "sd3": _JOINT_ATTN,
    "sd3-all": _JOINT_ATTN + _FF + [r"ff_context\.net\.0\.proj", r"ff_context\.net\.2"],
    "flux": _JOINT_ATTN,
    "flux-all": _JOINT_ATTN
    + _FF
    + [
        r"ff_context\.net\.0\.proj",
        r"ff_context\.net\.2",
        "proj_mlp",
        r"single_transformer_blocks\.\d+\.proj_out",
    ],
    # PixArt / Sana style DiTs: self- and cross-attention projections.
    "dit": _ATTN,
    "dit-all": _ATTN + _FF + [r"ff\.conv_inverted", r"ff\.conv_point"],
    # Text encoders.
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip-all": ["q_proj", "k_proj", "v_proj", "out_proj", r"mlp\.fc1", r"mlp\.fc2"],
    "t5": [r"SelfAttention\.q", r"SelfAttention\.k", r"SelfAttention\.v", r"SelfAttention\.o"],
}

# Model class name -> default preset, used when target_modules is None.
AUTO_PRESETS: dict[str, str] = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "Flux2Transformer2DModel": "flux",
    "PixArtTransformer2DModel": "dit",
    "SanaTransformer2DModel": "dit",
    "DiTTransformer2DModel": "dit",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "T5EncoderModel": "t5",
}

SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def resolve_patterns(model: nn.Module, target_modules: list[str] | str | None) -> list[str] | str:
    """Turn a preset name, ``None`` (auto) or a list into what the matcher uses."""
    if target_modules is None:
        preset = AUTO_PRESETS.get(type(model).__name__)
        if preset is None:
            raise ValueError(
                f"No DeLoRA preset for {type(model).__name__}; pass target_modules (a preset among "
                f"{sorted(PRESETS)}, a list of module-name suffixes, or a regex)."
            )
        return PRESETS[preset]
    if isinstance(target_modules, str) and target_modules in PRESETS:
        return PRESETS[target_modules]
    return target_modules


def module_matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name_matches(name, pattern) for pattern in patterns)


def _is_adapter_internal(name: str) -> bool:
    """Modules that belong to an adapter (ours or PEFT's) are never targets themselves."""
    parts = name.split(".")
    return any(p == "delora" or p.startswith(("lora_", "delora_")) for p in parts)


def _unwrap(module: nn.Module) -> nn.Module:
    """A PEFT tuner layer (e.g. diffusers' own LoRA) wraps the frozen layer; DeLoRA attaches to that."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and type(module).__module__.startswith("peft.") else module


def find_targets(model: nn.Module, config: DeLoRAConfig) -> list[tuple[str, nn.Module]]:
    """Return ``(name, layer)`` for every module the config adapts; raise a clear error otherwise."""
    patterns = resolve_patterns(model, config.target_modules)
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or _is_adapter_internal(name) or name.endswith(".base_layer"):
            continue
        if not module_matches(name, patterns) or module_matches(name, config.exclude_modules):
            continue
        layer = _unwrap(module)
        if not isinstance(layer, SUPPORTED_TYPES):
            raise TypeError(
                f"DeLoRA target {name!r} in {type(model).__name__} is a {type(module).__name__}; only nn.Linear "
                f"and nn.Conv2d can be adapted. Narrow target_modules (e.g. {name + '.0'!r} for a ModuleList)."
            )
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise TypeError(
                f"DeLoRA target {name!r} is a grouped Conv2d (groups={layer.groups}); only groups=1 is supported. "
                "Add it to exclude_modules."
            )
        found.append((name, layer))
    if not found:
        candidates = [n for n, m in model.named_modules() if isinstance(_unwrap(m), SUPPORTED_TYPES)]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"DeLoRA target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
            f"Its adaptable modules include: {shown}. Presets: {sorted(PRESETS)}."
        )
    return found
