"""The sampler dropdown: a diffusers scheduler per request, set on the cached pipeline without reloading it.

Each pipeline's own scheduler is kept; another one is built once from its config
(``SchedulerClass.from_config(own.config)``, as diffusers documents) and reused. Flow-matching models (SD3,
Flux) only run their own scheduler: the DDPM-family samplers do not apply to them. No Gradio.
"""

from __future__ import annotations

from typing import Any

from .inputs import AppError

MODEL_DEFAULT = ""
"""The dropdown value for the pipeline's own scheduler."""
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
"""Sampler name (as A1111 users know it) -> (diffusers class, config overrides)."""


def scheduler_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the dropdown: the model's own first."""
    return [("Model default", MODEL_DEFAULT)] + [(name, name) for name in SCHEDULERS]


def check_scheduler(name: Any) -> str:
    """A sampler name from the dropdown: '' (the model's own) or one of :data:`SCHEDULERS`."""
    if name is None or name == MODEL_DEFAULT:
        return MODEL_DEFAULT
    if not isinstance(name, str) or name.strip() not in SCHEDULERS:
        raise AppError(f"Unknown sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}.")
    return name.strip()


def use_scheduler(pipe: Any, name: str, cache: dict[str, Any]) -> None:
    """Set the scheduler `name` on `pipe`; `cache` holds its own scheduler under '' and every one built."""
    cache.setdefault(MODEL_DEFAULT, pipe.scheduler)
    if name not in cache:
        own = cache[MODEL_DEFAULT]
        if "FlowMatch" in type(own).__name__:
            raise AppError(
                f"This model only runs its own sampler ({type(own).__name__}); choose Model default."
            )
        import diffusers

        cls_name, overrides = SCHEDULERS[check_scheduler(name)]
        cache[name] = getattr(diffusers, cls_name).from_config(own.config, **overrides)
    if pipe.scheduler is not cache[name]:
        pipe.scheduler = cache[name]
