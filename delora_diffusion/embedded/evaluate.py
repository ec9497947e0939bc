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
    guidance_scale: float = 7.5,
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


def subject_prompts(
    subject, backgrounds: tuple[str, ...] = tuple(world.BACKGROUNDS)
) -> list[tuple[str, str]]:
    """(prompt, background) pairs that put the subject in new contexts: "a photo of sks star on a pink background"."""
    return [(f"a photo of {subject.token} {subject.class_noun} on a {b} background", b) for b in backgrounds]


def drift_prompts(subject, n: int = 6, seed: int = 0) -> list[str]:
    """Prompts not about the subject: its class prompt, and base-world captions (as PEFT's "a photo of cat")."""
    return [subject.class_prompt] + [world.caption(s) for s in eval_scenes(n - 1, seed=seed + 500)]


def _generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
    """Images in [-1, 1], one per prompt, each from its own fixed seed so base and adapted runs pair up."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt"
    )
    return out.images * 2 - 1


@torch.no_grad()
def subject_scores(
    pipe,
    subject,
    probe: Probe | None = None,
    per_prompt: int = 2,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
) -> dict[str, float]:
    """How well a personalized pipeline renders its subject in new contexts, read by the probe.

    - ``subject_similarity``: mean cosine between probe embeddings of the generations and of the subject's
      held-out views (stands in for DINOv2 similarity);
    - ``subject_attributes``: fraction of generations whose shape, colour and pattern all match;
    - ``accent_accuracy``: fraction whose stripe/dot colour matches (the probe's weakest head, kept apart);
    - ``background_accuracy``: fraction whose background follows the prompt (prompt fidelity).
    """
    probe = probe or load_probe()
    pairs = [p for p in subject_prompts(subject) for _ in range(per_prompt)]
    images = _generate(pipe, [p for p, _ in pairs], seed, steps, guidance)
    reference = probe.embed(subject.heldout_images())
    similarity = float((probe.embed(images) @ reference.T).mean())
    predicted = probe.predict(images)
    keys = ("shape", "color", "pattern")
    hits = [all(predicted[k][i] == subject.attributes[k] for k in keys) for i in range(len(pairs))]
    accent = [predicted["accent"][i] == subject.attributes["accent"] for i in range(len(pairs))]
    background = [predicted["background"][i] == b for i, (_, b) in enumerate(pairs)]
    return {
        "subject_similarity": similarity,
        "subject_attributes": float(np.mean(hits)),
        "accent_accuracy": float(np.mean(accent)),
        **{f"{k}_accuracy": float(np.mean([v == subject.attributes[k] for v in predicted[k]])) for k in keys},
        "background_accuracy": float(np.mean(background)),
    }


@torch.no_grad()
def drift(
    base_images: torch.Tensor,
    adapted_images: torch.Tensor,
    probe: Probe | None = None,
) -> float:
    """PEFT's drift: ``(1 - mean cosine(base, adapted)) / 2`` over same-prompt, same-seed pairs; in [0, 1]."""
    probe = probe or load_probe()
    cos = (probe.embed(base_images) * probe.embed(adapted_images)).sum(-1)
    return float((1 - cos.mean()) / 2)


def generate_for_drift(pipe, subject, steps: int = 20, guidance: float = 5.0, seed: int = 0) -> torch.Tensor:
    """The drift prompts' generations; call once on the base pipeline and once on each adapted one."""
    return _generate(pipe, drift_prompts(subject, seed=seed), seed, steps, guidance)
