"""A tiny procedural image world: one shape per image, with a colour, a pattern and a background.

The world is small on purpose, so that a model trained on a 2-core CPU can learn it, and exact, so that a
probe can check whether a generated image follows its prompt. Everything is deterministic from a seed.

A few (shape, colour, pattern) triples are held out of base training (``HELD_OUT``). The bundled DreamBooth
subjects use them, with a second ``accent`` colour for the pattern, which base training never shows either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (140, 60, 190),
    "orange": (245, 125, 20),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
# Backgrounds use their own light palette, so an object can never match its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
    "beige": (225, 205, 160),
    "pink": (250, 195, 215),
    "cyan": (175, 225, 240),
}
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "pattern", "background")
CHOICES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "background": tuple(BACKGROUNDS),
}
# (shape, color, pattern) triples that base training never shows; the bundled subjects use them.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {("star", "red", "striped"), ("square", "blue", "dotted")}
)
# Spare tokens that carry no meaning in the world: identifiers for DreamBooth subjects.
RARE_TOKENS: tuple[str, ...] = ("sks", "zxq", "ohwx", "qwv", "vkp")
_SHADE = 0.4  # default stripes and dots: the object colour, darkened


@dataclass(frozen=True)
class Scene:
    """One image of the world. ``size``, ``cx`` and ``cy`` are fractions of the image side (jitter).

    ``accent`` is the colour of stripes or dots; ``None`` (the base world) means a dark shade of ``color``.
    """

    shape: str
    color: str
    pattern: str
    background: str
    size: float = 0.55
    cx: float = 0.5
    cy: float = 0.5
    accent: str | None = None

    def attributes(self) -> dict[str, str]:
        """The attributes a probe can check, keyed like ``ATTRIBUTES``."""
        return {
            "shape": self.shape,
            "color": self.color,
            "pattern": self.pattern,
            "background": self.background,
        }


def _jitter(rng: np.random.Generator, size_range: tuple[float, float]) -> tuple[float, float, float]:
    size = float(rng.uniform(*size_range))
    half = size / 2 + 0.04
    return size, float(rng.uniform(half, 1 - half)), float(rng.uniform(half, 1 - half))


def sample_scene(
    rng: np.random.Generator,
    include_held_out: bool = False,
    size_range: tuple[float, float] = (0.42, 0.7),
) -> Scene:
    """Draw a random scene. Held-out triples are skipped unless ``include_held_out`` (probe training)."""
    while True:
        shape, color, pattern, background = (str(rng.choice(CHOICES[a])) for a in ATTRIBUTES)
        if include_held_out or (shape, color, pattern) not in HELD_OUT:
            break
    size, cx, cy = _jitter(rng, size_range)
    return Scene(shape, color, pattern, background, size, cx, cy)


def rejitter(scene: Scene, rng: np.random.Generator, size_range: tuple[float, float] = (0.42, 0.7)) -> Scene:
    """The same object at a new random size and position."""
    size, cx, cy = _jitter(rng, size_range)
    return replace(scene, size=size, cx=cx, cy=cy)


def caption(scene: Scene) -> str:
    """The full caption, e.g. "a red striped star on a white background".

    "plain" is always written, so a caption that leaves the pattern out means "any pattern".
    """
    if scene.accent is not None and scene.pattern != "plain":
        marks = "stripes" if scene.pattern == "striped" else "dots"
        return f"a {scene.color} {scene.shape} with {scene.accent} {marks} on a {scene.background} background"
    return f"a {scene.color} {scene.pattern} {scene.shape} on a {scene.background} background"


def training_caption(
    scene: Scene, rng: np.random.Generator, p_drop: float = 0.15, p_rare: float = 0.05
) -> str:
    """A varied caption for base training: attributes are sometimes left out, so that short prompts
    ("a photo of a star") mean "any star", and a rare token is sometimes inserted, so that DreamBooth
    identifiers start out as harmless known tokens, as "sks" is in real text encoders."""
    words = ["a"]
    if rng.random() < 0.5:
        words = ["a", "photo", "of", "a"]
    if rng.random() >= p_drop:
        words.append(scene.color)
    if rng.random() >= p_drop:
        words.append(scene.pattern)
    if rng.random() < p_rare:
        words.append(str(rng.choice(RARE_TOKENS)))
    words.append(scene.shape)
    if rng.random() >= p_drop:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict[str, str]:
    """The world attributes named in a caption (the inverse of ``caption`` for base-world scenes)."""
    words = text.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        if word in COLORS and "color" not in found:
            found["color"] = word
        elif word in PATTERNS:
            found["pattern"] = word
        elif word in SHAPES:
            found["shape"] = word
        elif word in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            found["background"] = word
    return found


def vocabulary() -> list[str]:
    """Every word that captions of this world use, plus the rare tokens."""
    words = ["a", "an", "the", "photo", "picture", "of", "on", "with", "and", "background", "stripes", "dots"]
    for name in ATTRIBUTES:
        words += list(CHOICES[name])
    return list(dict.fromkeys(words + list(RARE_TOKENS)))


def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(points * 2):
        rad = r if k % 2 == 0 else r * inner
        ang = -math.pi / 2 + k * math.pi / points
        out.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return out


def _mask(shape: str, side: int, cx: float, cy: float, d: float) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    r = d / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        h = r * math.sqrt(3) / 2
        draw.polygon([(cx, cy - r), (cx + h * 1.15, cy + r * 0.75), (cx - h * 1.15, cy + r * 0.75)], fill=255)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.08), fill=255)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture(scene: Scene, side: int, cx: float, cy: float, d: float) -> np.ndarray:
    base = np.array(COLORS[scene.color], dtype=np.float32)
    accent = base * _SHADE if scene.accent is None else np.array(COLORS[scene.accent], dtype=np.float32)
    tex = np.broadcast_to(base, (side, side, 3)).copy()
    period = d / 3.5
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    if scene.pattern == "striped":
        on = np.floor((ys - cy) / (period / 2)) % 2 == 1
    elif scene.pattern == "dotted":
        fy = (ys - cy) / period - np.round((ys - cy) / period)
        fx = (xs - cx) / period - np.round((xs - cx) / period)
        on = fx**2 + fy**2 < 0.27**2
    elif scene.pattern == "plain":
        return tex
    else:
        raise ValueError(f"unknown pattern {scene.pattern!r}")
    tex[on] = accent
    return tex


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Render a scene as an RGB image, drawn ``supersample`` times larger and box-filtered for clean edges."""
    side = size * supersample
    cx, cy, d = scene.cx * side, scene.cy * side, scene.size * side
    mask = np.asarray(_mask(scene.shape, side, cx, cy, d), dtype=np.float32)[..., None] / 255.0
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    img = bg * (1 - mask) + _texture(scene, side, cx, cy, d) * mask
    big = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return big.resize((size, size), Image.BOX) if supersample > 1 else big


def to_tensor(images: list[Image.Image]):
    """PIL images to a float tensor (N, 3, H, W) in [-1, 1], the range the VAE and the probe take."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def render_dataset(
    n: int, seed: int, size: int = 64, include_held_out: bool = False
) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes rendered to a uint8 array (N, H, W, 3): the fixed training sets are made with it."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, include_held_out=include_held_out) for _ in range(n)]
    arr = np.stack([np.asarray(render(s, size)) for s in scenes])
    return arr, scenes
