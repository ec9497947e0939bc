"""Plain-LoRA files written next to the DeLoRA adapter, so the output dir is usable without delora-diffusion.

- ``pytorch_lora_weights.safetensors``: diffusers' name and key layout, so ``pipe.load_lora_weights(out)``
  loads it (diffusers picks that name in a folder), exact at lambda scale 1.
- ``pytorch_lora_weights_kohya.safetensors`` with ``--output_kohya_format`` (diffusers' SDXL script's name):
  ComfyUI (every family) and A1111 (SD1 / SDXL) read it.

CLIP text encoder keys carry ``text_model.`` in both: transformers 5 flattened ``CLIPTextModel`` (its layers
are ``encoder.layers.N...``), ComfyUI only maps ``text_encoder.text_model.encoder.layers.N...`` and drops the
rest, and diffusers strips the prefix again when the model has no ``text_model`` attribute
(``diffusers/loaders/lora_base.py``), so the prefixed form is what every reader maps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LORA_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"


def clip_text_model_prefix(state: dict[str, torch.Tensor], component_classes: dict[str, str]) -> dict:
    """Diffusers-format keys of CLIP components with ``text_model.`` after the component name."""
    out = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        is_clip = component_classes.get(component, "").startswith("CLIP")
        if is_clip and not rest.startswith("text_model."):
            key = f"{component}.text_model.{rest}"
        out[key] = value
    return out


def write_lora_files(
    adapter_path: str | Path, output_dir: str | Path, kohya: bool = False, scale: float = 1.0
) -> dict[str, Path]:
    """Write the exact LoRA export(s) of `adapter_path` into `output_dir`; returns ``{format: path}``.

    T5 adapters (no LoRA reader loads them) are left out with a warning rather than failing the run.
    """
    from .. import export, io

    data = io.load_adapter(adapter_path)
    classes = data.metadata.get("component_classes", {}) or {}
    metadata = {
        "format": "pt",
        "delora_exported_from": Path(adapter_path).name,
        "delora_lambda_scale": repr(float(scale)),
        "delora_base_model": str(data.metadata.get("base_model") or ""),
    }
    written: dict[str, Path] = {}
    state = export.to_lora_state_dict(data, "diffusers", scale, skip_unsupported=True)
    state = clip_text_model_prefix(state, classes)
    written["diffusers"] = io.write_safetensors_atomic(Path(output_dir) / LORA_NAME, state, metadata)
    if kohya:
        state = export.to_lora_state_dict(data, "kohya", scale, skip_unsupported=True)
        kohya_meta = {**metadata, "ss_network_module": "networks.lora"}
        written["kohya"] = io.write_safetensors_atomic(Path(output_dir) / KOHYA_NAME, state, kohya_meta)
    logger.info("Plain LoRA export(s): %s", ", ".join(str(p) for p in written.values()))
    return written
