"""The bundled DreamBooth subjects: novel objects the base model has never seen.

Each subject is a held-out (shape, colour, pattern) triple (``world.HELD_OUT``) whose stripes or dots have an
``accent`` colour, which base training never shows. Its folder holds the training images, a ``heldout/`` folder
of other views for similarity metrics, and ``subject.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import world

SUBJECTS_DIR = Path(__file__).parent / "subjects"
DEFAULT_SUBJECT = "striped_star"
# name -> (instance token, Scene template). Backgrounds, sizes and positions vary per image.
SPECS: dict[str, tuple[str, world.Scene]] = {
    "striped_star": ("sks", world.Scene("star", "red", "striped", "white", accent="purple")),
    "dotted_square": ("zxq", world.Scene("square", "blue", "dotted", "white", accent="orange")),
}
N_TRAIN, N_HELDOUT = 5, 4
# Subjects are drawn larger than base-world objects (0.42-0.7 of the side), so that their stripes and dots are
# at least one latent cell wide: the bundled VAE has a 4x downsampling factor, and thinner two-colour marks
# decode as a blend (red with yellow stripes came back orange).
SUBJECT_SIZE_RANGE = (0.55, 0.75)


@dataclass(frozen=True)
class Subject:
    """A bundled subject: where its images are, its prompts, and the attributes a probe should find."""

    name: str
    path: Path
    token: str
    class_noun: str
    instance_prompt: str
    class_prompt: str
    attributes: dict[str, str]
    image_paths: list[Path] = field(default_factory=list)
    heldout_paths: list[Path] = field(default_factory=list)
    validation_prompts: list[str] = field(default_factory=list)

    def images(self) -> list[Image.Image]:
        """The training images, as RGB PIL images."""
        return [Image.open(p).convert("RGB") for p in self.image_paths]

    def heldout_images(self) -> list[Image.Image]:
        """Other views of the subject, never trained on: references for subject similarity."""
        return [Image.open(p).convert("RGB") for p in self.heldout_paths]


def _views(
    template: world.Scene, n: int, rng: np.random.Generator, backgrounds: list[str]
) -> list[world.Scene]:
    views = []
    for i in range(n):
        scene = world.rejitter(template, rng, SUBJECT_SIZE_RANGE)
        views.append(world.Scene(**{**scene.__dict__, "background": backgrounds[i % len(backgrounds)]}))
    return views


def write_subjects(out_dir: str | Path = SUBJECTS_DIR, seed: int = 0) -> list[Path]:
    """Render every subject in ``SPECS`` into ``out_dir/<name>/`` (deterministic from ``seed``)."""
    paths = []
    for k, (name, (token, template)) in enumerate(SPECS.items()):
        rng = np.random.default_rng(seed * 1000 + k)
        folder = Path(out_dir) / name
        (folder / "heldout").mkdir(parents=True, exist_ok=True)
        backgrounds = [str(b) for b in rng.permutation(list(world.BACKGROUNDS))]
        train = _views(template, N_TRAIN, rng, backgrounds)
        heldout = _views(template, N_HELDOUT, rng, backgrounds[::-1])
        for i, scene in enumerate(train):
            world.render(scene).save(folder / f"{i:02d}.png")
        for i, scene in enumerate(heldout):
            world.render(scene).save(folder / "heldout" / f"{i:02d}.png")
        noun = template.shape
        meta = {
            "name": name,
            "token": token,
            "class_noun": noun,
            "instance_prompt": f"a photo of {token} {noun}",
            "class_prompt": f"a photo of a {noun}",
            "attributes": {**template.attributes(), "accent": template.accent},
            "description": world.caption(template).replace(" on a white background", ""),
            "images": [f"{i:02d}.png" for i in range(N_TRAIN)],
            "heldout_images": [f"heldout/{i:02d}.png" for i in range(N_HELDOUT)],
            "validation_prompts": [
                f"a photo of {token} {noun} on a {b} background" for b in world.BACKGROUNDS
            ],
        }
        del meta["attributes"]["background"]
        (folder / "subject.json").write_text(json.dumps(meta, indent=2) + "\n")
        paths.append(folder)
    return paths


def list_subjects(root: str | Path = SUBJECTS_DIR) -> list[str]:
    """Names of the subjects bundled under ``root``."""
    return sorted(p.parent.name for p in Path(root).glob("*/subject.json"))


def load_subject(name: str = DEFAULT_SUBJECT, root: str | Path = SUBJECTS_DIR) -> Subject:
    """Read a subject's ``subject.json``; image paths are absolute."""
    folder = Path(root) / name
    meta_file = folder / "subject.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no subject {name!r} in {root}; bundled: {list_subjects(root)}")
    meta = json.loads(meta_file.read_text())
    return Subject(
        name=meta["name"],
        path=folder,
        token=meta["token"],
        class_noun=meta["class_noun"],
        instance_prompt=meta["instance_prompt"],
        class_prompt=meta["class_prompt"],
        attributes=meta["attributes"],
        image_paths=[folder / f for f in meta["images"]],
        heldout_paths=[folder / f for f in meta["heldout_images"]],
        validation_prompts=meta["validation_prompts"],
    )


def default_subject() -> Subject:
    """The subject that examples, tests and benchmarks use unless told otherwise."""
    return load_subject(DEFAULT_SUBJECT)
