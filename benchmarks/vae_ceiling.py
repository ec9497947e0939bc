"""Can the bundled VAE draw a subject? Round-trip renders of a design through it and read them with the probe.

DreamBooth cannot teach what the VAE cannot decode: with a 4x downsampling factor, two-colour stripes or dots
narrower than a latent cell come back as their blend. Use this before adding a subject.

    python benchmarks/vae_ceiling.py star:red:striped:yellow --size 0.42 0.7     # the first subject: colour 0%
    python benchmarks/vae_ceiling.py star:red:striped:purple square:blue:dotted:orange --size 0.55 0.75
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delora_diffusion.embedded import default_model_path, load_probe, world

KEYS = ("shape", "color", "pattern", "accent")


def design(text: str) -> world.Scene:
    """``shape:color:pattern:accent`` to a scene template."""
    parts = text.split(":")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected shape:color:pattern:accent, e.g. star:red:striped:blue"
        )
    shape, color, pattern, accent = parts
    for name, value in (("shape", shape), ("color", color), ("pattern", pattern), ("color", accent)):
        if value not in world.CHOICES[name]:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {value!r} is not a {name}; choose from {world.CHOICES[name]}"
            )
    return world.Scene(shape, color, pattern, "white", accent=accent)


@torch.no_grad()
def ceiling(
    vae, probe, template: world.Scene, size: tuple[float, float], n: int, seed: int
) -> dict[str, float]:
    """Fraction of round-tripped renders (random size, position, background) whose attributes the probe finds."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        scene = world.rejitter(template, rng, size)
        scenes.append(
            world.Scene(**{**scene.__dict__, "background": str(rng.choice(list(world.BACKGROUNDS)))})
        )
    x = world.to_tensor([world.render(s) for s in scenes])
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    predicted = probe.predict(decoded)
    return {k: float(np.mean([predicted[k][i] == getattr(s, k) for i, s in enumerate(scenes)])) for k in KEYS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("designs", nargs="+", type=design, help="shape:color:pattern:accent")
    p.add_argument(
        "--size", nargs=2, type=float, default=(0.55, 0.75), help="object size range (fraction of side)"
    )
    p.add_argument("--n", type=int, default=48, help="renders per design")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=default_model_path())
    args = p.parse_args(argv)
    low, high = args.size
    if not 0 < low <= high < 1:
        p.error(f"--size {low:g} {high:g}: give a range 0 < low <= high < 1 (fractions of the image side).")
    if args.n < 1:
        p.error("--n must be at least 1.")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(args.model), subfolder="vae").eval()
    probe = load_probe()
    print("| design | size | " + " | ".join(KEYS) + " |")
    print("| --- | --- |" + " ---: |" * len(KEYS))
    for template in args.designs:
        scores = ceiling(vae, probe, template, tuple(args.size), args.n, args.seed)
        name = f"{template.color} {template.shape}, {template.accent} {template.pattern}"
        cells = " | ".join(f"{scores[k]:.0%}" for k in KEYS)
        print(f"| {name} | {args.size[0]:g}–{args.size[1]:g} | {cells} |")


if __name__ == "__main__":
    main()
