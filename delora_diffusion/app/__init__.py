"""The Gradio app, in rooms: rules for inputs, the adapters dir, the info panel, the service, the UI, the server.

- :mod:`.inputs`: ranges, clamping, :class:`GenerationRequest`, the per-request work budget. No Gradio.
- :mod:`.adapters`: listing the adapters dir (bad entries are reported, never fatal). No Gradio.
- :mod:`.lora`: plain LoRA files beside DeLoRA ones (kind from the header, summary, diffusers' loader).
- :mod:`.uploads`: checking an uploaded adapter file. :mod:`.models`: loading a pipeline, one generation.
- :mod:`.info`: the info panel's cached report and text. No Gradio.
- :mod:`.service`: :class:`AppService`, everything the app does. No Gradio, so tests and scripts call it.
- :mod:`.ui`: the Gradio layout and wiring, thin over the service.
- :mod:`.server`: flags, the origin guard, temp-dir cleanup, :func:`main` (``delora-diffusion app``).

Gradio is an optional extra: importing this package, the service or the inputs never imports it.
"""

from __future__ import annotations

from typing import Any

from .info import format_adapter_info
from .inputs import (
    ADAPTER_SLOTS,
    DEFAULT_MAX_WORK,
    MAX_PROMPT_CHARS,
    SEED_RANGE,
    AppError,
    GenerationRequest,
    clamp_number,
    make_request,
    parse_sweep_values,
)
from .service import DEFAULT_ADAPTERS_DIR, AppService, GenerationResult

_LAZY = {"build_ui": "ui", "build_parser": "server", "main": "server"}


def __getattr__(name: str) -> Any:
    """``build_ui``, ``build_parser`` and ``main`` import Gradio's side only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTER_SLOTS",
    "DEFAULT_ADAPTERS_DIR",
    "DEFAULT_MAX_WORK",
    "MAX_PROMPT_CHARS",
    "SEED_RANGE",
    "AppError",
    "AppService",
    "GenerationRequest",
    "GenerationResult",
    "build_parser",
    "build_ui",
    "clamp_number",
    "format_adapter_info",
    "main",
    "make_request",
    "parse_sweep_values",
]
