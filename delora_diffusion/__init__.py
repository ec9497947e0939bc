"""DeLoRA (Decoupled Low-rank Adaptation) for diffusion models.

``import delora_diffusion`` is all it takes for diffusers pipelines to gain ``load_delora_weights`` & co.
"""

from . import io, pipeline  # pipeline adds load_delora_weights & co to DiffusionPipeline
from .config import DeLoRAConfig
from .io import WEIGHT_NAME, DeLoRAFileError, read_delora_file, save_delora_file
from .model import (
    delora_configs,
    delora_norm_report,
    delora_parameters,
    delora_scale,
    disable_delora,
    enable_delora,
    get_delora_adapter_names,
    get_delora_scale,
    inject_delora,
    iter_delora_layers,
    merge_delora,
    remove_delora,
    set_delora_adapters,
    set_delora_scale,
    unmerge_delora,
)
from .targets import PRESETS

__version__ = "0.1.0"

__all__ = [
    "WEIGHT_NAME",
    "DeLoRAFileError",
    "io",
    "pipeline",
    "read_delora_file",
    "save_delora_file",
    "PRESETS",
    "DeLoRAConfig",
    "delora_configs",
    "delora_norm_report",
    "delora_parameters",
    "delora_scale",
    "disable_delora",
    "enable_delora",
    "get_delora_adapter_names",
    "get_delora_scale",
    "inject_delora",
    "iter_delora_layers",
    "merge_delora",
    "remove_delora",
    "set_delora_adapters",
    "set_delora_scale",
    "unmerge_delora",
]
