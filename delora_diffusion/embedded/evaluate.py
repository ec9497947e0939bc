"""Prompt-following accuracy of a text-to-image model on the world, read by the probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import world
from .probe import Probe, load_probe


def eval_scenes(n: int, seed: int = 0) -> list[world.Scene]:
    """The fixed evaluation captions: ``n`` random base-world scenes (held-out triples excluded)."""
    rng = np.random.default_rng(10_000 + seed)
    return [world.sample_scene(rng) for _ in range(n)]


def attribute_accuracy(
    predicted: dict[str, list[str]], scenes: list[world.Scene], attributes: tuple[str, ...] = world.ATTRIBUTES
) -> dict[str, float]:
    """Fraction of images whose predicted attribute matches the scene's, per attribute, plus "all four"."""
    hits = {a: [p == getattr(s, a) for p, s in zip(predicted[a], scenes)] for a in attributes}
    out = {a: float(np.mean(v)) for a, v in hits.items()}
    out["all"] = float(np.mean([all(h[i] for h in hits.values()) for i in range(len(scenes))]))
    return out


@torch.no_grad()
def evaluate_base_model(
    model: str | Path | object | None = None,
    n: int = 200,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch_size: int = 50,
    probe: Probe | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """Generate one image per caption of ``eval_scenes(n, seed)`` and score it with the probe.

    ``model`` is a pipeline or a path (default: the bundled model). Returns per-attribute accuracy
    (shape, color, pattern, background) and "all" (every attribute right).
    """
    from diffusers import StableDiffusionPipeline

    from . import default_model_path

    pipe = model
    if pipe is None or isinstance(pipe, (str, Path)):
        pipe = StableDiffusionPipeline.from_pretrained(str(pipe or default_model_path()))
        pipe.set_progress_bar_config(disable=True)
    probe = probe or load_probe()
    scenes = eval_scenes(n, seed)
    predicted: dict[str, list[str]] = {a: [] for a in world.ATTRIBUTES}
    for i in range(0, n, batch_size):
        chunk = scenes[i : i + batch_size]
        images = pipe(
            [world.caption(s) for s in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed + i),
            output_type="pt",
        ).images
        pred = probe.predict(images * 2 - 1)
        for a in world.ATTRIBUTES:
            predicted[a] += pred[a]
    acc = attribute_accuracy(predicted, scenes)
    if verbose:
        print(
            f"prompt following, {n} captions, {num_inference_steps} steps, guidance {guidance_scale}, seed {seed}:"
        )
        print("  " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    return acc
