"""The pipeline side of the service: model labels, loading a pipeline, its native size, one generation.

Kept apart from :mod:`.service` (which holds state, the lock and the adapters) because none of this needs the
service's state: each function takes the pipeline or the model it works on. No Gradio.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .inputs import GenerationRequest, clamp_size

Progress = Callable[[float, str], None]


def model_labels(models: Sequence[str]) -> dict[str, str]:
    """label -> model: a hub id as itself, a local path by its folder name (made unique)."""
    labels: dict[str, str] = {}
    for model in models:
        local = os.path.isabs(model) or os.path.lexists(model)
        base = (Path(model).name or "model") if local else model
        label, n = base, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels[label] = model
    return labels


def load_pipeline(model: str, dtype: Any, device: str) -> Any:
    """``DiffusionPipeline.from_pretrained`` with our methods installed, on `device`, progress bars off.

    Raises what diffusers raises (the service turns OSError and ValueError into a message without paths).
    """
    from diffusers import DiffusionPipeline

    import delora_diffusion  # noqa: F401  (adds load_delora_weights & co to every pipeline)

    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(pipe: Any) -> tuple[int, int]:
    """The (width, height) the pipeline's model was trained at (512² when its config does not say)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    if not isinstance(sample, int):
        return 512, 512
    side = clamp_size(sample * factor, "size")
    return side, side


def generate_one(
    pipe: Any, request: GenerationRequest, progress: Progress | None, done: int, total: int, label: str
) -> Any:
    """One image of `request` with whatever is set on `pipe` now; progress counts steps `done` of `total`."""
    import torch

    def on_step_end(_pipe: Any, step: int, _timestep: Any, _kwargs: dict) -> dict:
        if progress is not None:
            progress((done + step + 1) / total, f"{label}: step {step + 1}/{request.steps}")
        return {}

    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.inference_mode():
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            generator=generator,
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
    return output.images[0]
