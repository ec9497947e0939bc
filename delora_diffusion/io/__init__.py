"""Adapter files and sources, split by job.

- :mod:`.container`: the safetensors container (strict header check, loading, atomic writes).
- :mod:`.format`: our adapter file (docs/FORMAT.md): metadata, read, write, validation, reports from tensors.
- :mod:`.sources`: PEFT adapters, state dicts, directories and hub ids, all resolved into :class:`AdapterData`.
- :mod:`.saving`: live modules to file tensors (:func:`save_delora_file`), with shareable metadata.
- :mod:`.planner`: an adapter checked against live modules and applied all at once or not at all.

The public names are re-exported here, so ``from delora_diffusion.io import read_delora_file`` keeps working.
"""

from __future__ import annotations

from .container import DeLoRAFileError, load_tensors, read_safetensors_header, write_safetensors_atomic
from .format import (
    COMPONENTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    FROZEN_PAIR,
    MAX_FILE_RELATIVE_BOUND,
    REQUIRED,
    TENSOR_DTYPES,
    TENSOR_NAMES,
    WEIGHT_NAME,
    AdapterData,
    canonical_layer_name,
    check_bounds,
    layer_report,
    parse_metadata,
    read_delora_file,
    split_layers,
    tensor_checksum,
    validate_tensors,
    w_norm_fingerprint,
    write_delora_file,
)
from .saving import save_delora_file, shareable_args, shareable_model_name, unwrap_model
from .sources import (
    HUB_KWARGS,
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    PEFT_WEIGHT_NAME,
    from_state_dict,
    infer_config,
    load_adapter,
    looks_like_local_path,
    read_peft_adapter,
)

__all__ = [
    "COMPONENTS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FROZEN_PAIR",
    "HUB_KWARGS",
    "MAX_FILE_RELATIVE_BOUND",
    "PEFT_CONFIG_NAME",
    "PEFT_PREFIX",
    "PEFT_WEIGHT_NAME",
    "REQUIRED",
    "TENSOR_DTYPES",
    "TENSOR_NAMES",
    "WEIGHT_NAME",
    "AdapterData",
    "DeLoRAFileError",
    "canonical_layer_name",
    "check_bounds",
    "from_state_dict",
    "infer_config",
    "layer_report",
    "load_adapter",
    "load_tensors",
    "looks_like_local_path",
    "parse_metadata",
    "read_delora_file",
    "read_peft_adapter",
    "read_safetensors_header",
    "save_delora_file",
    "shareable_args",
    "shareable_model_name",
    "split_layers",
    "tensor_checksum",
    "unwrap_model",
    "validate_tensors",
    "w_norm_fingerprint",
    "write_delora_file",
    "write_safetensors_atomic",
]
