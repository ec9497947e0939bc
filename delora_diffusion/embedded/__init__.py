"""The embedded default: a tiny text-to-image model trained on a procedural world, with DreamBooth subjects.

No model can be downloaded where this package is developed and tested, so it ships its own: a 64×64
Stable-Diffusion-style pipeline (``MODEL_DIR``), a probe that reads attributes off images (``load_probe``), and
novel subjects the base model never saw (``list_subjects``, ``load_subject``, ``default_subject``).
See docs/EMBEDDED.md.
"""

from __future__ import annotations

from pathlib import Path

from .probe import PROBE_DIR, Probe, load_probe
from .subjects import SUBJECTS_DIR, Subject, default_subject, list_subjects, load_subject

MODEL_DIR = Path(__file__).parent / "model"


def default_model_path() -> Path:
    """The bundled diffusers-format model: ``StableDiffusionPipeline.from_pretrained(default_model_path())``."""
    return MODEL_DIR


def evaluate_base_model(*args, **kwargs) -> dict[str, float]:
    """Per-attribute prompt-following accuracy; see ``delora_diffusion.embedded.evaluate``."""
    from .evaluate import evaluate_base_model as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = [
    "MODEL_DIR",
    "PROBE_DIR",
    "SUBJECTS_DIR",
    "Probe",
    "Subject",
    "default_model_path",
    "default_subject",
    "evaluate_base_model",
    "list_subjects",
    "load_probe",
    "load_subject",
]
