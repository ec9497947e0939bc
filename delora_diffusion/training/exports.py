"""Plain-LoRA files written next to the DeLoRA adapter, so the output dir is usable without delora-diffusion.

- ``pytorch_lora_weights.safetensors``: diffusers' name and key layout, so ``pipe.load_lora_weights(out)``
  loads it (diffusers picks that name in a folder), exact at lambda scale 1.
- ``pytorch_lora_weights_kohya.safetensors`` with ``--output_kohya_format`` (diffusers' SDXL script's name):
  ComfyUI (every family) and A1111 (SD1 / SDXL) read it.

Both come from :func:`delora_diffusion.export.to_lora_state_dict` (CLIP keys with the ``text_model.`` prefix
every reader maps) with :func:`delora_diffusion.export.lora_metadata`.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

LORA_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"


def write_lora_files(
    adapter_path: str | Path, output_dir: str | Path, kohya: bool = False, scale: float = 1.0
) -> dict[str, Path]:
    """Write the exact LoRA export(s) of `adapter_path` into `output_dir`; returns ``{format: path}``.

    T5 adapters (no LoRA reader loads them) are left out with a warning rather than failing the run.
    """
    from .. import export, io

    data = io.load_adapter(adapter_path)
    written: dict[str, Path] = {}
    for fmt, name in (("diffusers", LORA_NAME), ("kohya", KOHYA_NAME))[: 2 if kohya else 1]:
        state = export.to_lora_state_dict(data, fmt, scale, skip_unsupported=True)
        metadata = export.lora_metadata(data, fmt, scale)
        written[fmt] = io.write_safetensors_atomic(Path(output_dir) / name, state, metadata)
    logger.info("Plain LoRA export(s): %s", ", ".join(str(p) for p in written.values()))
    return written
