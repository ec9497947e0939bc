"""Per-family training strategies, and detecting the family from a pipeline's model_index.json."""

from __future__ import annotations

import argparse

from ..util import TrainingConfigError
from .base import Family, ModelInfo, Noised, load_component, read_model_index, read_vae_scale_factor
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)
}
_BY_PIPELINE = {pipe: cls.name for cls in FAMILIES.values() for pipe in cls.pipeline_classes}


def detect_family(index: dict) -> str:
    """The family name ("sd", "sdxl", "sd3", "flux") of a pipeline from its model_index.json ``_class_name``."""
    class_name = index.get("_class_name", "?")
    if class_name not in _BY_PIPELINE:
        raise TrainingConfigError(
            f"Unsupported pipeline class {class_name!r}; this script trains {sorted(_BY_PIPELINE)}."
        )
    return _BY_PIPELINE[class_name]


def inspect_model(args: argparse.Namespace) -> tuple[ModelInfo, Family]:
    """Read the model's index and VAE config (no weights) to pick the strategy."""
    path = str(args.pretrained_model_name_or_path)
    index, local_dir = read_model_index(path, args)
    name = detect_family(index)
    info = ModelInfo(path, index, name, read_vae_scale_factor(path, local_dir, args), local_dir)
    return info, FAMILIES[name](info)


__all__ = [
    "FAMILIES",
    "Family",
    "ModelInfo",
    "Noised",
    "detect_family",
    "inspect_model",
    "load_component",
]
