"""What the app writes into each image it returns: A1111-style ``parameters`` text in the PNG.

A1111, ComfyUI's image loaders and most image browsers read a PNG ``tEXt`` chunk named ``parameters``:

    a photo of sks dog
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: model, DeLoRA: run1:1 (λ scale 1)

The text is kept in ``image.info``: Gradio copies text entries of ``image.info`` into the PNGs it serves and
offers for download, and :func:`save_png` does the same for a file. The model is named by its label (a folder
name or a hub id) and adapters by their listed names: never an absolute local path. Plain LoRA files get a
field of their own, ``LoRA: style.safetensors:0.8 (scale 1)``. No Gradio, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .inputs import HISTORY_LENGTH, SEED_RANGE, AppError, GenerationRequest, check_work

PARAMETERS_KEY = "parameters"
SAMPLER_NAMES = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "DDPMScheduler": "DDPM",
    "UniPCMultistepScheduler": "UniPC",
    "FlowMatchEulerDiscreteScheduler": "Euler (flow match)",
}
"""diffusers scheduler class -> the sampler name A1111 users know (others: the class name without 'Scheduler')."""


def sampler_name(scheduler: Any) -> str:
    """The A1111-style name of a diffusers scheduler (instance or class)."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    name = cls.__name__
    return SAMPLER_NAMES.get(name, name.removesuffix("Scheduler") or name)


def _field(value: str) -> str:
    """A value as A1111 writes it: quoted (JSON-style) when it holds a comma, colon-space or quote."""
    text = " ".join(str(value).split())
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',"') else text


def parameters_text(
    request: GenerationRequest,
    model: str,
    sampler: str,
    adapters: Sequence[tuple[str, float]] = (),
    scale: float | None = None,
    extra: Sequence[tuple[str, str]] = (),
    loras: Sequence[tuple[str, float]] = (),
) -> str:
    """The ``parameters`` text for one image made from `request`.

    `model` and the adapter names must already be shareable (labels, never absolute paths); `adapters` are
    the DeLoRA adapters active for this image and `loras` the plain LoRA files (both empty for the base
    image), `scale` the λ scale they ran at. A LoRA's weight on the pipeline is its weight × that scale.
    """
    lines = [request.prompt.strip()]
    if request.negative_prompt.strip():
        lines.append(f"Negative prompt: {request.negative_prompt.strip()}")
    fields = [
        ("Steps", str(request.steps)),
        ("Sampler", sampler),
        ("CFG scale", f"{request.guidance:g}"),
        ("Seed", str(request.seed)),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", model),
    ]
    used = request.scale if scale is None else scale
    if adapters:
        shown = ", ".join(f"{name}:{weight:g}" for name, weight in adapters)
        fields.append(("DeLoRA", f"{shown} (λ scale {used:g})"))
    if loras:
        shown = ", ".join(f"{name}:{weight:g}" for name, weight in loras)
        fields.append(("LoRA", f"{shown} (scale {used:g})"))
    fields += list(extra)
    lines.append(", ".join(f"{key}: {_field(value)}" for key, value in fields))
    return "\n".join(lines)


def with_parameters(image: Any, text: str) -> Any:
    """`image` with `text` as its ``parameters`` (kept in ``image.info``; written by Gradio and save_png)."""
    image.info[PARAMETERS_KEY] = text
    return image


def save_png(image: Any, path: str | Path) -> Path:
    """Write `image` as a PNG with every text entry of ``image.info`` (the parameters) as a tEXt chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            info.add_text(key, value)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def image_grid(images: Sequence[Any], labels: Sequence[str]) -> Any:
    """One row of images with a caption strip under each: the λ sweep's result.

    Captions should be ASCII: PIL's built-in font has no glyphs for λ or ×.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise AppError("Nothing to put in the grid.")
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    caption = 14
    cell = max(width, 48)
    grid = Image.new("RGB", (cell * len(images), height + caption), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        grid.paste(im.convert("RGB"), (i * cell + (cell - im.width) // 2, 0))
        draw.text((i * cell + 2, height + 1), label, fill="black")
    return grid


def generate_batch(
    service: Any, request: GenerationRequest, progress: Callable[[float, str], None] | None = None
) -> list[Any]:
    """`request.count` generations at seeds seed, seed + 1, ... (``AppService.generate`` results).

    The whole batch is checked against the work budget first: 2 images per seed with an adapter, 1 without.
    """
    per_seed = 2 if request.adapters else 1
    what = f"This {request.count}-image click"
    check_work(request, per_seed * request.count, service.max_work, what=what)
    results = []
    for i in range(request.count):
        seed = (request.seed + i) % (SEED_RANGE[1] + 1)

        def step(fraction: float, text: str, i: int = i) -> None:
            if progress is not None:
                progress((i + fraction) / request.count, f"image {i + 1}/{request.count}: {text}")

        results.append(service.generate(replace(request, seed=seed), progress=step))
    return results


def push_history(
    history: Sequence[Any] | None, images: Sequence[Any], limit: int = HISTORY_LENGTH
) -> list[Any]:
    """The gallery's history: the new `images` (in order) before what was there, at most `limit` items."""
    return [*images, *(history or [])][:limit]
