"""Validation images: a pipeline around the models being trained, image grids, and the lambda sweep.

The sweep shows DeLoRA's strength knob at work: the same seeds at lambda scale 0 (the base model, exactly),
0.5, 1 (the trained adapter) and 1.5, one row per scale.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..model import delora_scale
from ..util import atomic_write
from .args import LAMBDA_SWEEP
from .families import Family
from .families.base import dtype_kwarg
from .trackers import log_images

logger = logging.getLogger(__name__)


def build_pipeline(
    family: Family, components: dict[str, Any], args: argparse.Namespace, dtype: torch.dtype
) -> Any:
    """A diffusers pipeline around already-loaded components; only the scheduler is read from disk."""
    from diffusers import DiffusionPipeline

    passed: dict[str, Any] = {}
    for name, entry in family.info.index.items():
        if name.startswith("_") or name == "scheduler":
            continue
        if name in components:
            passed[name] = components[name]
        elif isinstance(entry, list) and entry and entry[0] is not None:
            passed[name] = None  # safety checker, feature extractor, image encoder: not needed here
    if "requires_safety_checker" in family.info.index:
        passed["requires_safety_checker"] = False
    passed[dtype_kwarg()] = dtype
    pipe = DiffusionPipeline.from_pretrained(family.info.path, revision=args.revision, **passed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: Any,
    family: Family,
    prompt: str | list[str],
    args: argparse.Namespace,
    num_images: int = 1,
    seed: int | None = 0,
    num_inference_steps: int | None = None,
) -> list[Image.Image]:
    """Images for `prompt` at the training resolution, reproducible from `seed`."""
    kwargs: dict[str, Any] = dict(family.pipeline_kwargs(args))
    if args.validation_guidance_scale is not None:
        kwargs["guidance_scale"] = args.validation_guidance_scale
    generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
    # Under mixed precision the trained denoiser may hand back fp32 (accelerate's output conversion), which
    # the next half-precision step would reject; autocast keeps every step in the models' dtype.
    low = pipe.dtype in (torch.float16, torch.bfloat16)
    precision = torch.autocast(pipe.device.type, dtype=pipe.dtype) if low else contextlib.nullcontext()
    with torch.no_grad(), precision:
        return pipe(
            prompt,
            num_images_per_prompt=num_images,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=num_inference_steps or args.validation_inference_steps,
            generator=generator,
            **kwargs,
        ).images


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one image."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image, (j * w, i * h))
    return grid


def save_image(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@contextlib.contextmanager
def eval_mode(models: list[nn.Module]):
    """Evaluation mode (no module dropout) for the duration, then back to what each model was."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was):
            m.train(training)


def run_validation(
    family: Family,
    components: dict[str, Any],
    adapted: list[nn.Module],
    args: argparse.Namespace,
    dtype: torch.dtype,
    name: str,
    trackers: list[Any] = (),
    step: int = 0,
    sweep: bool = False,
    save: bool = True,
) -> dict[str, Path]:
    """Write ``validation/<name>.png`` (and, with `sweep`, ``validation/lambda_sweep.png`` and
    ``validation/prompts.png`` for ``--extra_validation_prompts``); returns the paths.

    With `save` False the images are generated and dropped: under FSDP every process must run the denoiser
    (its weights are gathered collectively) while only the main one writes.
    """
    out_dir = Path(args.output_dir) / "validation"
    pipe = build_pipeline(family, components, args, dtype)
    seed = args.seed if args.seed is not None else 0
    n = args.num_validation_images
    written: dict[str, Path] = {}
    with eval_mode(adapted):
        images = generate(pipe, family, args.validation_prompt, args, n, seed)
        if save:
            written[name] = save_image(make_grid([images]), out_dir / f"{name}.png")
            if name == "final":  # one file per image at the top, as diffusers writes them: the card's widget
                for i, image in enumerate(images):
                    written[f"final_{i}"] = save_image(image, out_dir.parent / f"image_{i}.png")
            log_images(trackers, "validation", images, step, [args.validation_prompt] * len(images))
        if sweep:
            rows = []
            for scale in LAMBDA_SWEEP:
                with contextlib.ExitStack() as stack:
                    for model in adapted:
                        stack.enter_context(delora_scale(model, scale))
                    rows.append(generate(pipe, family, args.validation_prompt, args, n, seed))
            if save:
                grid = make_grid(rows)
                written["lambda_sweep"] = save_image(grid, out_dir / "lambda_sweep.png")
                caption = "rows: lambda scale " + ", ".join(f"{s:g}" for s in LAMBDA_SWEEP)
                log_images(trackers, "lambda_sweep", [grid], step, [caption])
        if sweep and args.extra_validation_prompts:
            rows = [generate(pipe, family, p, args, n, seed) for p in args.extra_validation_prompts]
            if save:
                grid = make_grid(rows)
                written["prompts"] = save_image(grid, out_dir / "prompts.png")
                log_images(trackers, "prompts", [grid], step, ["; ".join(args.extra_validation_prompts)])
    if written:
        logger.info("Validation images: %s", ", ".join(str(p) for p in written.values()))
    return written
