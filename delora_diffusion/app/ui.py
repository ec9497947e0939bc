"""The Gradio face of :class:`~delora_diffusion.app.service.AppService`: layout and wiring only.

Each handler turns component values into one service call and its result into component updates; every rule
(what is valid, what is loaded, what λ is) lives in the service.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .inputs import (
    ADAPTER_SLOTS,
    DEFAULT_SWEEP,
    GUIDANCE_RANGE,
    IMAGES_RANGE,
    MAX_PROMPT_CHARS,
    SCALE_RANGE,
    SCALE_STEP,
    SEED_RANGE,
    SIZE_MULTIPLE,
    SIZE_RANGE,
    STEPS_RANGE,
    WEIGHT_RANGE,
    AppError,
    GenerationRequest,
    check_adapter_slots,
    make_request,
    parse_sweep_values,
)
from .outputs import generate_batch, push_history
from .schedulers import scheduler_choices
from .service import AppService

CSS = """
#base-image img, #adapted-image img, #sweep-image img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""
DELETE_CACHE = (600, 3600)
"""Gradio deletes its cached files (generated images) older than an hour every ten minutes, and all at exit."""
INTRO = (
    "## DeLoRA diffusion\nBase and adapted images from the same seed. The λ scale multiplies every layer's λ: "
    "1 is the adapter as trained, 0 the base model. Plain LoRA files (marked LoRA) load beside DeLoRA ones, "
    "for comparison; the scale multiplies their weights."
)
# Lossless PNGs (the browser shows exactly the generated pixels), scaled up for small models.
_SHOWN: dict[str, Any] = {"format": "png", "type": "pil", "interactive": False, "height": 320}


def disable_telemetry() -> None:
    """No analytics calls from a local app."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class _Controls:
    """The components handlers read or write (filled in section by section)."""

    model: Any = None
    dropdowns: list[Any] | None = None
    slot_inputs: list[Any] | None = None
    scale: Any = None
    problems: Any = None
    prompt: Any = None
    negative: Any = None
    generate: Any = None
    sweep: Any = None
    seed: Any = None
    randomize: Any = None
    steps: Any = None
    guidance: Any = None
    width: Any = None
    height: Any = None
    sampler: Any = None
    count: Any = None
    gallery: Any = None
    history: Any = None
    sweep_values: Any = None
    rescan: Any = None
    upload: Any = None
    base_img: Any = None
    adapted_img: Any = None
    status: Any = None
    sweep_img: Any = None
    info: Any = None

    def request_inputs(self) -> list[Any]:
        """In the order :func:`_request_from` unpacks them."""
        head = [self.model, self.scale, self.prompt, self.negative, self.seed, self.randomize, self.steps]
        return [*head, self.guidance, self.width, self.height, self.sampler, self.count, *self.slot_inputs]

    def info_inputs(self) -> list[Any]:
        return [self.model, self.scale, *self.slot_inputs]


def adapter_choices(service: AppService) -> list[tuple[str, str]]:
    """The adapter dropdowns' options: '(none)', then every listed adapter by its label."""
    return [("(none)", "")] + [(service.adapter_label(a), a) for a in service.list_adapters()]


def _inert(text: str) -> str:
    return text.replace("`", "'").replace("\n", " ")


def problems_text(service: AppService) -> str:
    """Unreadable entries of the adapters dir, each with its reason (empty when there are none)."""
    bad = service.unreadable
    if not bad:
        return ""
    lines = [f"**Skipped {len(bad)} unreadable entr{'y' if len(bad) == 1 else 'ies'} in the adapters dir:**"]
    lines += [f"- `{_inert(name)}`: {_inert(reason)}" for name, reason in sorted(bad.items())]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- layout


def _adapter_section(gr: Any, service: AppService, c: _Controls) -> None:
    labels = list(service.model_labels)
    c.model = gr.Dropdown(
        choices=labels,
        value=labels[0],
        allow_custom_value=service.allow_hub_models,
        label="Model",
        info="A model given with --model" + (", or a hub id (org/name)" if service.allow_hub_models else ""),
        elem_id="model",
    )
    names = service.list_adapters()
    c.dropdowns, c.slot_inputs = [], []
    for i in range(ADAPTER_SLOTS):
        with gr.Row(equal_height=True):
            dd = gr.Dropdown(
                choices=adapter_choices(service),
                value=names[0] if (i == 0 and names) else "",
                label=f"Adapter {i + 1}",
                elem_id=f"adapter-{i}",
                scale=3,
            )
            wt = gr.Slider(
                *WEIGHT_RANGE, value=1.0, step=0.05, label="weight", elem_id=f"weight-{i}", scale=2
            )
        c.dropdowns.append(dd)
        c.slot_inputs += [dd, wt]
    c.problems = gr.Markdown(problems_text(service), elem_id="adapter-problems")
    c.scale = gr.Slider(
        *SCALE_RANGE,
        value=1.0,
        step=SCALE_STEP,
        label="λ scale",
        info="1 = as trained, 0 = base model (multiplies LoRA weights too)",
        elem_id="lambda-scale",
    )


def _prompt_section(gr: Any, c: _Controls) -> None:
    c.prompt = gr.Textbox(label="Prompt", max_length=MAX_PROMPT_CHARS, elem_id="prompt", lines=2)
    c.negative = gr.Textbox(label="Negative prompt", max_length=MAX_PROMPT_CHARS, elem_id="negative")
    with gr.Row():
        c.generate = gr.Button("Generate", variant="primary", elem_id="generate")
        c.sweep = gr.Button("λ sweep", elem_id="sweep")


def _settings_section(gr: Any, c: _Controls, size: tuple[int, int], steps: int, guidance: float) -> None:
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            c.seed = gr.Number(
                value=0,
                precision=0,
                minimum=SEED_RANGE[0],
                maximum=SEED_RANGE[1],
                label="Seed",
                elem_id="seed",
            )
            c.randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="randomize")
        with gr.Row():
            c.steps = gr.Slider(*STEPS_RANGE, value=steps, step=1, label="Steps", elem_id="steps")
            c.guidance = gr.Slider(
                *GUIDANCE_RANGE, value=guidance, step=0.5, label="Guidance", elem_id="guidance"
            )
        with gr.Row():
            c.width = gr.Slider(
                *SIZE_RANGE, value=size[0], step=SIZE_MULTIPLE, label="Width", elem_id="width"
            )
            c.height = gr.Slider(
                *SIZE_RANGE, value=size[1], step=SIZE_MULTIPLE, label="Height", elem_id="height"
            )
        with gr.Row():
            c.sampler = gr.Dropdown(choices=scheduler_choices(), value="", label="Sampler", elem_id="sampler")
            c.count = gr.Slider(
                *IMAGES_RANGE, value=1, step=1, label="Images (seed, seed + 1, ...)", elem_id="count"
            )
        c.sweep_values = gr.Textbox(
            value=DEFAULT_SWEEP, label="λ values for the sweep", elem_id="sweep-values"
        )


def _more_adapters_section(gr: Any, service: AppService, c: _Controls) -> None:
    with gr.Accordion("More adapters", open=False):
        c.rescan = gr.Button("Rescan adapters dir", size="sm", elem_id="rescan")
        c.upload = gr.File(
            label=f"Upload a DeLoRA or LoRA file (.safetensors, ≤ {service.max_upload_bytes / 2**20:g} MiB)",
            file_types=[".safetensors"],
            type="filepath",
            height=120,
            elem_id="upload",
        )


def _output_section(gr: Any, c: _Controls) -> None:
    with gr.Row():
        c.base_img = gr.Image(label="Base (adapters off)", elem_id="base-image", **_SHOWN)
        c.adapted_img = gr.Image(label="Adapted", elem_id="adapted-image", **_SHOWN)
    c.status = gr.Markdown(elem_id="status")
    c.sweep_img = gr.Image(label="λ sweep", elem_id="sweep-image", **(_SHOWN | {"height": 240}))
    c.gallery = gr.Gallery(
        label="History (this session; click an image to download its PNG)",
        format="png",
        columns=4,
        height=260,
        elem_id="gallery",
    )
    c.history = gr.State([])
    c.info = gr.Markdown(elem_id="adapter-info")


# --------------------------------------------------------------------------------------------- handlers


def _slots(values: Sequence[Any]) -> list[tuple[Any, Any]]:
    return [(values[2 * i], values[2 * i + 1]) for i in range(ADAPTER_SLOTS)]


def _request_from(values: Sequence[Any]) -> GenerationRequest:
    m, s, p, n, sd, rnd, st, g, ww, hh, sampler, count, *rest = values
    return make_request(m, _slots(rest), s, p, n, sd, bool(rnd), st, g, ww, hh, sampler, count)


class _Handlers:
    """One method per event; each is a thin call into the service, with AppError shown as a Gradio error."""

    def __init__(self, gr: Any, service: AppService) -> None:
        self.gr = gr
        self.service = service

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except AppError as err:
                raise self.gr.Error(str(err)) from None

        return functools.wraps(fn)(wrapped)

    def generate(self, *values: Any, progress: Any) -> tuple:
        *values, history = values
        request = _request_from(values)
        results = generate_batch(self.service, request, progress=lambda f, d: progress(f, desc=d))
        text = self.service.adapter_info(request.model, request.adapters, request.scale)
        first = results[0]
        new = [(r.adapted, f"seed {r.request.seed}, λ scale {r.request.scale:g}") for r in results]
        history = push_history(history, new)
        message = first.message
        if len(results) > 1:
            message = f"{len(results)} images, seeds {request.seed} to {results[-1].request.seed}. {message}"
        return first.base, first.adapted, request.seed, message, text, history, history

    def sweep(self, *values: Any, progress: Any) -> tuple:
        *rest, text = values
        notes: list[str] = []
        lambdas = parse_sweep_values(text, notes)
        request = _request_from(rest)
        grid, _ = self.service.sweep(request, lambdas, progress=lambda f, d: progress(f, desc=d))
        shown = ", ".join(f"{v:g}" for v in lambdas)
        return (
            grid,
            request.seed,
            f"λ sweep {shown} at seed {request.seed}. " + " ".join([*request.notes, *notes]),
        )

    def scale(self, m: Any, s: Any, *rest: Any) -> str:
        """A λ slider move: one set_delora_scale, and the panel from the cached report."""
        chosen = check_adapter_slots(_slots(rest))
        value = self.service.set_scale(m, chosen, s)
        return self.service.adapter_info(m, chosen, value)

    def select(self, m: Any, s: Any, *rest: Any) -> str:
        """A change of adapters or weights: load what is new, activate, and show the panel."""
        return self.service.select(m, check_adapter_slots(_slots(rest)), s)

    def model(self, m: Any, s: Any, *rest: Any) -> tuple:
        ww, hh = self.service.native_size(m)
        return self.gr.update(value=ww), self.gr.update(value=hh), self.select(m, s, *rest)

    def _choices(self, current: Sequence[Any]) -> list[Any]:
        names = self.service.list_adapters()
        opts = adapter_choices(self.service)
        return [self.gr.update(choices=opts, value=c if c in names else "") for c in current]

    def upload(self, file: Any, *current: Any) -> tuple:
        gr = self.gr
        if not file:
            return (gr.skip(), gr.skip(), *[gr.skip()] * ADAPTER_SLOTS)
        path = Path(file if isinstance(file, str) else getattr(file, "name", file))
        from gradio.utils import get_upload_folder

        in_cache = path.resolve().is_relative_to(Path(get_upload_folder()).resolve())
        name = self.service.add_upload(path, consume=in_cache)  # gradio's copy is deleted either way
        current = list(current)
        if name not in current:
            empty = [i for i, c in enumerate(current) if not c]
            current[empty[0] if empty else 0] = name
        shown = self.service.adapter_label(name)
        return f"Uploaded and validated: {shown}", None, *self._choices(current)

    def rescan(self, *current: Any) -> tuple:
        found = self.service.rescan()
        bad = self.service.unreadable
        status = f"Found {len(found)} adapter(s) in {self.service.adapters_dir.name}."
        if bad:
            status += f" {len(bad)} unreadable entr{'y' if len(bad) == 1 else 'ies'} skipped (listed above)."
        return status, problems_text(self.service), *self._choices(current)


def _wire(gr: Any, demo: Any, service: AppService, c: _Controls) -> None:
    h = _Handlers(gr, service)
    tracker = gr.Progress()  # Gradio injects progress into handlers whose parameter defaults to a Progress

    def generate(*values: Any, progress: Any = tracker) -> tuple:
        return h.guard(h.generate)(*values, progress=progress)

    def sweep(*values: Any, progress: Any = tracker) -> tuple:
        return h.guard(h.sweep)(*values, progress=progress)

    inputs = c.request_inputs()
    outputs = [c.base_img, c.adapted_img, c.seed, c.status, c.info, c.gallery, c.history]
    c.generate.click(generate, [*inputs, c.history], outputs, concurrency_id="gpu")
    c.sweep.click(sweep, [*inputs, c.sweep_values], [c.sweep_img, c.seed, c.status], concurrency_id="gpu")
    quiet = {"trigger_mode": "always_last", "show_progress": "hidden"}
    c.scale.change(h.guard(h.scale), c.info_inputs(), c.info, **quiet)
    for component in c.slot_inputs:
        component.change(h.guard(h.select), c.info_inputs(), c.info, **quiet)
    c.model.change(h.guard(h.model), c.info_inputs(), [c.width, c.height, c.info])
    c.upload.upload(h.guard(h.upload), [c.upload, *c.dropdowns], [c.status, c.upload, *c.dropdowns])
    c.rescan.click(h.guard(h.rescan), c.dropdowns, [c.status, c.problems, *c.dropdowns])
    demo.load(h.guard(h.select), c.info_inputs(), c.info)


def build_ui(service: AppService, default_steps: int = 20, default_guidance: float = 7.5) -> Any:
    """The Gradio Blocks for `service`: the layout by section, then the wiring."""
    disable_telemetry()
    import gradio as gr

    c = _Controls()
    size = service.native_size(service.models[0])
    with gr.Blocks(title="DeLoRA diffusion", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                _adapter_section(gr, service, c)
                _prompt_section(gr, c)
                _settings_section(gr, c, size, default_steps, default_guidance)
                _more_adapters_section(gr, service, c)
            with gr.Column(scale=2):
                _output_section(gr, c)
        _wire(gr, demo, service, c)
    return demo
