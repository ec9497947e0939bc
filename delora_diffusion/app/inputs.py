"""The app's input rules: ranges, clamping, the validated request, and the per-request work budget.

Every value that reaches the service from the UI passes through here, so the rules live in one place and the
UI can show a note for every value it changed. No Gradio, no torch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..util import finite_number

SCALE_RANGE = (0.0, 2.0)
SCALE_STEP = 0.05
WEIGHT_RANGE = (0.0, 2.0)
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 20.0)
SIZE_RANGE = (16, 1024)
SIZE_MULTIPLE = 8
SEED_RANGE = (0, 2**32 - 1)
MAX_PROMPT_CHARS = 1000
MAX_SWEEP_VALUES = 9
ADAPTER_SLOTS = 3
IMAGES_RANGE = (1, 8)
"""Images per click (seeds seed, seed + 1, ...); every one counts in the work budget."""
HISTORY_LENGTH = 20
"""Images the gallery keeps per browser session (newest first)."""
DEFAULT_SWEEP = "0, 0.5, 1, 1.5, 2"
DEFAULT_MAX_WORK = 512 * 512 * 100
"""Pixel-steps one request may cost (width × height × steps, summed over every image it makes).

512² × 100: two 512² images at 50 steps, or a five-value sweep at 512² and 20 steps. The sliders alone would
allow 1024² × 100 × 2 (8× more, about 70 minutes on a mid-range GPU under a lock every user shares).
"""


class AppError(ValueError):
    """A problem with the user's input; the UI shows its message instead of a traceback."""


def clamp_number(
    value: Any, bounds: tuple[float, float], name: str, notes: list[str] | None = None, integer: bool = False
) -> float | int:
    """`value` as a number inside `bounds`; out-of-range values are clamped and a note says so.

    Non-numbers, NaN and infinities are rejected: there is no sensible value to clamp them to.
    """
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise AppError(f"{name} must be a number, got {value!r}.") from None
    try:
        number = finite_number(number, name)
    except ValueError:
        kind = "a finite number" if isinstance(number, float) else "a number"
        raise AppError(f"{name} must be {kind}, got {value!r}.") from None
    lo, hi = bounds
    clamped: float | int = min(max(number, lo), hi)
    if integer:
        clamped = int(round(clamped))
    if notes is not None and not lo <= number <= hi:
        notes.append(f"{name} {value} is outside [{lo}, {hi}]: used {clamped}.")
    elif notes is not None and clamped != number:
        notes.append(f"{name} {value} is not a whole number: used {clamped}.")
    return clamped


def clamp_size(value: Any, name: str, notes: list[str] | None = None) -> int:
    """An image side: clamped to SIZE_RANGE and rounded down to a multiple of SIZE_MULTIPLE."""
    size = int(clamp_number(value, SIZE_RANGE, name, notes, integer=True))
    rounded = max(SIZE_MULTIPLE, size - size % SIZE_MULTIPLE)
    if rounded != size and notes is not None:
        notes.append(f"{name} {size} is not a multiple of {SIZE_MULTIPLE}: used {rounded}.")
    return rounded


def parse_sweep_values(text: Any, notes: list[str] | None = None) -> list[float]:
    """Comma-separated λ values for the sweep, each clamped to SCALE_RANGE; at most MAX_SWEEP_VALUES."""
    if not isinstance(text, str) or not text.strip():
        raise AppError(f"Give the λ values for the sweep, for example {DEFAULT_SWEEP!r}.")
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if len(parts) > MAX_SWEEP_VALUES:
        raise AppError(f"A sweep takes at most {MAX_SWEEP_VALUES} λ values, got {len(parts)}.")
    return [float(clamp_number(p, SCALE_RANGE, "Sweep λ", notes)) for p in parts]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation's settings, already validated and clamped (build it with :func:`make_request`)."""

    model: str
    adapters: tuple[tuple[str, float], ...]
    scale: float
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int = 64
    height: int = 64
    scheduler: str = ""
    count: int = 1
    """A sampler name from :data:`.schedulers.SCHEDULERS`, or '' for the pipeline's own."""
    notes: tuple[str, ...] = field(default=(), compare=False)


def _check_prompts(prompt: Any, negative_prompt: Any) -> tuple[str, str]:
    prompt = "" if prompt is None else prompt
    negative_prompt = "" if negative_prompt is None else negative_prompt
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise AppError("Prompts must be text.")
    if not prompt.strip():
        raise AppError("Write a prompt.")
    for label, text in (("The prompt", prompt), ("The negative prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise AppError(f"{label} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    return prompt, negative_prompt


def check_adapter_slots(
    adapters: Sequence[tuple[Any, Any]], notes: list[str] | None = None
) -> list[tuple[str, float]]:
    """The filled adapter slots as (name, weight): empty slots dropped, weights clamped, no name twice."""
    chosen: list[tuple[str, float]] = []
    for index, (name, weight) in enumerate(adapters, start=1):
        if name in (None, ""):
            continue
        if not isinstance(name, str):
            raise AppError(f"Adapter {index}: expected a name, got {name!r}.")
        if name in (n for n, _ in chosen):
            raise AppError(f"Adapter {name!r} is selected twice; give it one slot and one weight.")
        chosen.append((name, float(clamp_number(weight, WEIGHT_RANGE, f"The weight of {name!r}", notes))))
    return chosen


def make_request(
    model: Any,
    adapters: Sequence[tuple[Any, Any]],
    scale: Any,
    prompt: Any,
    negative_prompt: Any = "",
    seed: Any = 0,
    randomize_seed: bool = False,
    steps: Any = 20,
    guidance: Any = 7.5,
    width: Any = 64,
    height: Any = 64,
    scheduler: Any = "",
    count: Any = 1,
) -> GenerationRequest:
    """Validate raw UI values: clamp numbers (with notes), reject what cannot be used, pick a random seed."""
    notes: list[str] = []
    if not isinstance(model, str) or not model.strip():
        raise AppError("Choose a model.")
    prompt, negative_prompt = _check_prompts(prompt, negative_prompt)
    from .schedulers import check_scheduler

    chosen = check_adapter_slots(adapters, notes)
    if randomize_seed:
        seed = random.randint(*SEED_RANGE)
    return GenerationRequest(
        model=model.strip(),
        adapters=tuple(chosen),
        scale=float(clamp_number(scale, SCALE_RANGE, "λ scale", notes)),
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=int(clamp_number(seed, SEED_RANGE, "Seed", notes, integer=True)),
        steps=int(clamp_number(steps, STEPS_RANGE, "Steps", notes, integer=True)),
        guidance=float(clamp_number(guidance, GUIDANCE_RANGE, "Guidance", notes)),
        width=clamp_size(width, "Width", notes),
        height=clamp_size(height, "Height", notes),
        scheduler=check_scheduler(scheduler),
        count=int(clamp_number(count, IMAGES_RANGE, "Images", notes, integer=True)),
        notes=tuple(notes),
    )


def check_work(request: GenerationRequest, images: int, max_work: int, what: str = "This request") -> int:
    """The request's cost in pixel-steps (width × height × steps × images); an AppError above `max_work`.

    The budget is per request because every request holds the one pipeline lock: a single huge one would
    make every other user wait for it.
    """
    work = request.width * request.height * request.steps * images
    if work > max_work:
        raise AppError(
            f"{what} needs {request.width}×{request.height} px × {request.steps} steps × {images} image(s) = "
            f"{work:,} pixel-steps; this app allows {max_work:,} per request. Use fewer steps, a smaller size "
            "or fewer sweep values, or restart the app with a larger --max_work."
        )
    return work
