"""Gradio app: generate with DeLoRA adapters, a λ slider, base and adapted images side by side.

All logic lives in :class:`AppService`, which knows nothing about Gradio, so tests call it directly.
:func:`build_ui` wires it to components and :func:`main` parses the flags and launches the server.

Why the service looks the way it does:

- A pipeline is loaded once per model and cached; moving the λ slider only calls ``set_delora_scale``.
- λ is state on the (shared) pipeline, so every request that sets it and generates holds one lock: two users
  generating at once each get images for their own λ.
- Adapters come only from the adapters dir (chosen by a name that is resolved inside it) or from an upload
  (``.safetensors``, size-limited, validated before it is loaded). No UI input becomes a filesystem path.
- Numeric inputs are clamped to their ranges and the UI says so; non-numbers are rejected with a message.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import random
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .io import FORMAT_NAME, WEIGHT_NAME, read_safetensors_header

DEFAULT_ADAPTERS_DIR = Path("outputs/dreambooth-delora")
"""Where ``train_scripts/dreambooth_delora.py`` writes by default (relative to the working directory)."""


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
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_SWEEP = "0, 0.5, 1, 1.5, 2"
CSS = """
#base-image img, #adapted-image img, #sweep-image img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""
UPLOAD_PREFIX = "upload:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADAPTER_DEPTH = 2  # adapters dir, plus one or two levels of sub-directories


class AppError(ValueError):
    """A problem with the user's input; the UI shows its message instead of a traceback."""


# --------------------------------------------------------------------------------------------- inputs


def clamp_number(
    value: Any, bounds: tuple[float, float], name: str, notes: list[str] | None = None, integer: bool = False
) -> float | int:
    """`value` as a number inside `bounds`; out-of-range values are clamped and a note says so.

    Non-numbers, NaN and infinities are rejected: there is no sensible value to clamp them to.
    """
    if isinstance(value, bool):
        raise AppError(f"{name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise AppError(f"{name} must be a finite number, got {value!r}.")
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
    notes: tuple[str, ...] = field(default=(), compare=False)


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
) -> GenerationRequest:
    """Validate raw UI values: clamp numbers (with notes), reject what cannot be used, pick a random seed."""
    notes: list[str] = []
    if not isinstance(model, str) or not model.strip():
        raise AppError("Choose a model.")
    prompt = "" if prompt is None else prompt
    negative_prompt = "" if negative_prompt is None else negative_prompt
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise AppError("Prompts must be text.")
    if not prompt.strip():
        raise AppError("Write a prompt.")
    for label, text in (("The prompt", prompt), ("The negative prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise AppError(f"{label} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    chosen: list[tuple[str, float]] = []
    for index, (name, weight) in enumerate(adapters, start=1):
        if name in (None, ""):
            continue
        if not isinstance(name, str):
            raise AppError(f"Adapter {index}: expected a name, got {name!r}.")
        if name in (n for n, _ in chosen):
            raise AppError(f"Adapter {name!r} is selected twice; give it one slot and one weight.")
        chosen.append((name, float(clamp_number(weight, WEIGHT_RANGE, f"The weight of {name!r}", notes))))
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
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------- images


def image_grid(images: Sequence[Any], labels: Sequence[str]) -> Any:
    """One row of images with a caption strip under each: the λ sweep's result.

    Captions should be ASCII: PIL's built-in font has no glyphs for λ or ×.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise AppError("Nothing to put in the grid.")
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    caption = 14
    cell = max(width, 48)
    grid = Image.new("RGB", (cell * len(images), height + caption), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        grid.paste(im.convert("RGB"), (i * cell + (cell - im.width) // 2, 0))
        draw.text((i * cell + 2, height + 1), label, fill="black")
    return grid


@dataclass
class GenerationResult:
    """Base and adapted images from one seed, plus what the UI should tell the user."""

    base: Any
    adapted: Any
    request: GenerationRequest
    message: str


# --------------------------------------------------------------------------------------------- service


def _adapter_key(choice: str) -> str:
    """A stable adapter_name for a choice: readable, unique, and free of the '.' adapter names forbid."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", choice).strip("_")[:40] or "adapter"
    return f"{slug}_{hashlib.sha1(choice.encode()).hexdigest()[:6]}"


def _is_delora_file(path: Path) -> bool:
    """Whether a .safetensors file says it is one of ours (its header only), so that other weights living in
    the adapters dir (a training checkpoint's optimizer or model state) are not offered as adapters."""
    try:
        _, metadata = read_safetensors_header(path)
    except (OSError, ValueError):
        return False
    return metadata.get("delora_format") == FORMAT_NAME


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class AppService:
    """Everything the app does, without Gradio: pipelines, adapters, generation, sweeps, the info panel.

    Thread-safe: one re-entrant lock covers the pipeline cache, adapter loading, λ changes and generation.
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        adapters_dir: str | Path = DEFAULT_ADAPTERS_DIR,
        device: str = "cpu",
        dtype: str = "float32",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
        max_cached_models: int = 2,
        allow_hub_models: bool = True,
    ) -> None:
        if not models:
            raise ValueError("AppService needs at least one model.")
        self.models = [str(m) for m in models]
        self.adapters_dir = Path(adapters_dir).expanduser().resolve()
        self.device = device
        self.dtype = dtype
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_cached_models = max(1, int(max_cached_models))
        self.allow_hub_models = allow_hub_models
        self.load_count = 0
        self.step_hook: Callable[[int], None] | None = None
        """Called at the end of every denoising step (tests use it to force interleavings)."""
        self._lock = threading.RLock()
        self._pipelines: OrderedDict[str, Any] = OrderedDict()
        self._loaded: dict[str, dict[str, str]] = {}  # model -> {adapter choice -> adapter_name}
        self._uploads: dict[str, Path] = {}
        self._upload_dir = Path(tempfile.mkdtemp(prefix="delora-app-uploads-"))

    # ---- models

    def resolve_model(self, model: str) -> str:
        """A model the UI may load: one given on the command line, or (if allowed) a hub id like org/name.

        Local paths come only from the command line; a hub id that names something on disk is refused.
        """
        if not isinstance(model, str) or not model.strip():
            raise AppError("Choose a model.")
        model = model.strip()
        if model in self.models:
            return model
        if (
            self.allow_hub_models
            and _HUB_ID.match(model)
            and ".." not in model
            and not os.path.lexists(model)
        ):
            return model
        raise AppError(
            f"Model {model!r} is not available: choose one of the listed models, or type a hub id such as "
            "'org/name'. Local model paths can only be given with --model."
        )

    def pipeline(self, model: str) -> Any:
        """The cached pipeline for `model`, loading it on first use (least recently used ones are dropped)."""
        model = self.resolve_model(model)
        with self._lock:
            if model in self._pipelines:
                self._pipelines.move_to_end(model)
                return self._pipelines[model]
            pipe = self._load_pipeline(model)
            self._pipelines[model] = pipe
            self._loaded[model] = {}
            self.load_count += 1
            while len(self._pipelines) > self.max_cached_models:
                old, _ = self._pipelines.popitem(last=False)
                self._loaded.pop(old, None)
            return pipe

    def _load_pipeline(self, model: str) -> Any:
        import torch
        from diffusers import DiffusionPipeline

        import delora_diffusion  # noqa: F401  (adds load_delora_weights & co to every pipeline)

        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise AppError(f"Could not load model {model!r}: {err}") from err
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def native_size(self, model: str) -> tuple[int, int]:
        """The (width, height) the model was trained at, as the size sliders' default."""
        pipe = self.pipeline(model)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
        factor = getattr(pipe, "vae_scale_factor", 8)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        if not isinstance(sample, int):
            return 512, 512
        side = clamp_size(sample * factor, "size")
        return side, side

    # ---- adapters

    def list_adapters(self) -> list[str]:
        """Names of the adapters in the adapters dir (then uploads): what the adapter dropdowns offer.

        A directory holding ``delora_weights.safetensors`` is listed by its path relative to the adapters dir
        ('.' for the adapters dir itself); any other ``.safetensors`` file whose header marks it as a DeLoRA
        adapter by its relative file path. Hidden entries and anything whose real path leaves the adapters dir
        (symlinks) are skipped.
        """
        root = self.adapters_dir
        found: list[str] = []
        if root.is_dir():
            self._scan(root, root, 0, found)
        found.sort(key=lambda n: (n != ".", n))
        return found + sorted(self._uploads)

    def adapter_label(self, name: str) -> str:
        """What the UI shows for an adapter name: the adapters dir itself ('.') by its folder name."""
        return f"{self.adapters_dir.name} (the adapters dir)" if name == "." else name

    def _scan(self, root: Path, directory: Path, depth: int, found: list[str]) -> None:
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.resolve().is_relative_to(root):
                continue
            if entry.is_dir() and depth < _ADAPTER_DEPTH:
                self._scan(root, entry, depth + 1, found)
            elif entry.is_file() and entry.suffix == ".safetensors":
                rel = entry.relative_to(root)
                if entry.name == WEIGHT_NAME:
                    found.append(rel.parent.as_posix())
                elif _is_delora_file(entry):
                    found.append(rel.as_posix())

    def resolve_adapter(self, name: str) -> Path:
        """The file or directory behind an adapter name; only listed names inside the adapters dir resolve."""
        if not isinstance(name, str) or not name:
            raise AppError("Choose an adapter.")
        if name in self._uploads:
            return self._uploads[name]
        parts = name.split("/")
        if (
            "\x00" in name
            or "\\" in name
            or ":" in name
            or Path(name).is_absolute()
            or name.startswith("~")
            or ".." in parts
        ):
            raise AppError(
                f"Adapter {name!r} is not a name inside the adapters dir; absolute paths and '..' are refused."
            )
        if name not in self.list_adapters():
            raise AppError(f"No adapter named {name!r} in {self.adapters_dir}. Rescan, or upload a file.")
        path = (self.adapters_dir / name).resolve()
        if not path.is_relative_to(self.adapters_dir):
            raise AppError(f"Adapter {name!r} resolves outside the adapters dir.")
        return path

    def add_upload(self, file_path: str | Path, original_name: str | None = None) -> str:
        """Accept an uploaded adapter: ``.safetensors`` only, under the size limit, and a valid DeLoRA file.

        The bytes are copied into a directory the app owns before they are validated, so what is loaded later
        is exactly what was checked. Returns the name the adapter dropdowns offer it under.
        """
        from .io import read_delora_file

        path = Path(file_path)
        shown = original_name or path.name
        if path.suffix.lower() != ".safetensors" or not shown.lower().endswith(".safetensors"):
            raise AppError(f"Uploads must be .safetensors files, got {shown!r}.")
        try:
            size = path.stat().st_size
        except OSError as err:
            raise AppError(f"Could not read the upload {shown!r}: {err}") from err
        if size > self.max_upload_bytes:
            raise AppError(
                f"The upload {shown!r} is {size / 2**20:.1f} MiB; the limit is "
                f"{self.max_upload_bytes / 2**20:.1f} MiB."
            )
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(shown).stem)[:40] or "adapter"
        name = f"{UPLOAD_PREFIX}{stem}-{digest.hexdigest()[:8]}"
        if name in self._uploads:
            return name
        copy = self._upload_dir / f"{digest.hexdigest()[:16]}.safetensors"
        shutil.copyfile(path, copy)
        try:
            read_delora_file(copy)
        except (ValueError, OSError) as err:
            copy.unlink(missing_ok=True)
            raise AppError(f"The upload {shown!r} is not a valid DeLoRA adapter: {err}") from err
        with self._lock:
            self._uploads[name] = copy
        return name

    def rescan(self) -> list[str]:
        """Forget loaded adapters (files may have been retrained) and list the adapters dir again.

        Models stay loaded: only the small adapter weights are read again on next use.
        """
        with self._lock:
            for model, pipe in self._pipelines.items():
                if self._loaded.get(model):
                    pipe.unload_delora_weights()
                self._loaded[model] = {}
        return self.list_adapters()

    def _adapter_name(self, model: str, pipe: Any, choice: str) -> str:
        loaded = self._loaded.setdefault(model, {})
        if choice in loaded:
            return loaded[choice]
        path = self.resolve_adapter(choice)
        key = _adapter_key(choice)
        try:
            pipe.load_delora_weights(str(path), adapter_name=key)
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise AppError(f"Could not load adapter {choice!r}: {err}") from err
        loaded[choice] = key
        return key

    def _activate(
        self, model: str, adapters: Sequence[tuple[str, float]], scale: float
    ) -> tuple[Any, list[str]]:
        """Make exactly `adapters` active at their weights, with λ scaled by `scale`. Caller holds the lock."""
        pipe = self.pipeline(model)
        names = [self._adapter_name(model, pipe, choice) for choice, _ in adapters]
        if names:
            pipe.enable_delora()
            pipe.set_delora_adapters(names, [weight for _, weight in adapters])
            pipe.set_delora_scale(scale)
        elif self._loaded.get(model):
            pipe.disable_delora()
        return pipe, names

    def set_scale(self, model: str, adapters: Sequence[tuple[str, float]], scale: Any) -> float:
        """What a slider move does: set λ's scale on the cached pipeline (no reload). Returns the used scale."""
        value = float(clamp_number(scale, SCALE_RANGE, "λ scale"))
        with self._lock:
            self._activate(self.resolve_model(model), adapters, value)
        return value

    # ---- generation

    def _generate_one(
        self,
        pipe: Any,
        request: GenerationRequest,
        progress: Callable[[float, str], None] | None,
        done: int,
        total: int,
        label: str,
    ) -> Any:
        import torch

        def on_step_end(_pipe: Any, step: int, _timestep: Any, _kwargs: dict) -> dict:
            if progress is not None:
                progress((done + step + 1) / total, f"{label}: step {step + 1}/{request.steps}")
            if self.step_hook is not None:
                self.step_hook(step)
            return {}

        generator = torch.Generator("cpu").manual_seed(request.seed)
        with torch.inference_mode():
            output = pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                width=request.width,
                height=request.height,
                generator=generator,
                output_type="pil",
                callback_on_step_end=on_step_end,
            )
        return output.images[0]

    def generate(
        self, request: GenerationRequest, progress: Callable[[float, str], None] | None = None
    ) -> GenerationResult:
        """Base (adapters off) and adapted images from the same seed; λ is held for the whole request."""
        model = self.resolve_model(request.model)
        with self._lock:
            pipe, names = self._activate(model, request.adapters, request.scale)
            total = request.steps * (2 if names else 1)
            if names:
                pipe.disable_delora()
            try:
                base = self._generate_one(pipe, request, progress, 0, total, "base")
            finally:
                if names:
                    pipe.enable_delora()
            adapted = (
                self._generate_one(pipe, request, progress, request.steps, total, f"λ × {request.scale:g}")
                if names
                else base
            )
        lines = [f"Seed {request.seed}, λ scale {request.scale:g}."]
        if not names:
            lines.append("No adapter selected: both images are the base model.")
        lines += request.notes
        return GenerationResult(base=base, adapted=adapted, request=request, message=" ".join(lines))

    def sweep(
        self,
        request: GenerationRequest,
        values: Sequence[float],
        progress: Callable[[float, str], None] | None = None,
    ) -> tuple[Any, list[Any]]:
        """The adapted image at each λ scale in `values` (same seed): a grid, and the images themselves."""
        if not request.adapters:
            raise AppError("Select an adapter for the λ sweep.")
        values = [float(clamp_number(v, SCALE_RANGE, "Sweep λ")) for v in values]
        if not values or len(values) > MAX_SWEEP_VALUES:
            raise AppError(f"A sweep takes 1 to {MAX_SWEEP_VALUES} λ values.")
        model = self.resolve_model(request.model)
        images = []
        with self._lock:
            total = request.steps * len(values)
            for i, value in enumerate(values):
                self._activate(model, request.adapters, value)
                images.append(
                    self._generate_one(
                        pipe=self.pipeline(model),
                        request=replace(request, scale=value),
                        progress=progress,
                        done=i * request.steps,
                        total=total,
                        label=f"λ × {value:g}",
                    )
                )
            self._activate(model, request.adapters, request.scale)
        return image_grid(images, [f"{v:g}" for v in values]), images

    # ---- info panel

    def adapter_info(self, model: str, adapters: Sequence[tuple[str, float]], scale: Any) -> str:
        """Markdown for the info panel: rank, λ per layer, the bound and actual ‖ΔW‖/‖W‖ now, training args."""
        value = float(clamp_number(scale, SCALE_RANGE, "λ scale"))
        if not adapters:
            return "No adapter selected."
        with self._lock:
            pipe, names = self._activate(self.resolve_model(model), adapters, value)
            reports = [pipe.delora_report(name) for name in names]
            metadata = [pipe.get_delora_metadata(name) for name in names]
        sections = []
        for (choice, weight), rows, meta in zip(adapters, reports, metadata, strict=True):
            sections.append(format_adapter_info(self.adapter_label(choice), weight, value, rows, meta))
        return "\n\n".join(sections)


# --------------------------------------------------------------------------------------------- info text


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"min {min(values):.4g} · mean {sum(values) / len(values):.4g} · max {max(values):.4g}"


def _plain(value: Any, limit: int = 200) -> str:
    """A metadata value as one line of inert text (it comes from a file, so it must not become markup)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("`", "'").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_adapter_info(
    choice: str, weight: float, scale: float, rows: Sequence[dict[str, Any]], metadata: dict[str, Any] | None
) -> str:
    """One adapter's section of the info panel, from ``delora_report`` rows and ``get_delora_metadata``."""
    metadata = metadata or {}
    ranks = sorted({int(r["rank"]) for r in rows if "rank" in r})
    lambdas = [float(r["lambda"]) for r in rows if "lambda" in r]
    relative = [float(r["relative_delta"]) for r in rows if "relative_delta" in r]
    bounds = [float(r["relative_bound"]) for r in rows if "relative_bound" in r]
    lines = [
        f"### {_plain(choice)}",
        f"- weight {weight:g}, λ scale {scale:g} ({len(rows)} layers)",
        f"- rank: {', '.join(map(str, ranks)) or 'n/a'}",
        f"- λ per layer (as trained): {_stats(lambdas)}",
        f"- bound on ‖ΔW‖/‖W‖ now: {_stats(bounds)}",
        f"- actual ‖ΔW‖/‖W‖ now: {_stats(relative)}",
    ]
    top = sorted(rows, key=lambda r: -float(r.get("relative_delta", 0.0)))[:8]
    if top:
        lines += ["", "| layer | rank | λ | bound ‖ΔW‖/‖W‖ | actual ‖ΔW‖/‖W‖ |", "|---|---|---|---|---|"]
        for r in top:
            layer = _plain(r.get("layer", "?"), 80).replace("|", "/")
            if r.get("component"):
                layer = f"{_plain(r['component'], 30)}.{layer}"
            lines.append(
                f"| {layer} | {r.get('rank', '?')} | {float(r.get('lambda', math.nan)):.4g} | "
                f"{float(r.get('relative_bound', math.nan)):.4g} | {float(r.get('relative_delta', math.nan)):.4g} |"
            )
    for key in ("base_model", "format_version"):
        if key in metadata:
            lines.append(f"\n{key}: `{_plain(metadata[key])}`")
    args = metadata.get("training_args")
    if isinstance(args, str):
        try:
            import json

            args = json.loads(args)
        except ValueError:
            pass
    if isinstance(args, dict) and args:
        lines += ["", "Training arguments:", "```"]
        lines += [f"{_plain(k, 60)}: {_plain(v)}" for k, v in sorted(args.items())]
        lines.append("```")
    elif args:
        lines += ["", f"Training arguments: `{_plain(args, 1000)}`"]
    else:
        lines += ["", "No training arguments in the metadata (not written by the training script)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- UI


def _disable_telemetry() -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def build_ui(service: AppService, default_steps: int = 20, default_guidance: float = 7.5) -> Any:
    """The Gradio Blocks for `service`. Every handler is a thin call into the service."""
    _disable_telemetry()
    import gradio as gr

    adapters = service.list_adapters()
    width, height = service.native_size(service.models[0])

    def slots(values: Sequence[Any]) -> list[tuple[Any, Any]]:
        return [(values[2 * i], values[2 * i + 1]) for i in range(ADAPTER_SLOTS)]

    def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except AppError as err:
                raise gr.Error(str(err)) from None

        return functools.wraps(fn)(wrapped)

    tracker = gr.Progress()  # Gradio injects progress into handlers whose parameter defaults to a Progress

    # Lossless PNGs (the browser shows exactly the generated pixels), scaled up for small models.
    shown: dict[str, Any] = {"format": "png", "type": "pil", "interactive": False, "height": 320}
    with gr.Blocks(title="DeLoRA diffusion") as demo:
        gr.Markdown(
            "## DeLoRA diffusion\nBase and adapted images from the same seed. The λ scale multiplies every "
            "layer's λ: 1 is the adapter as trained, 0 the base model."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(
                    choices=service.models,
                    value=service.models[0],
                    allow_custom_value=service.allow_hub_models,
                    label="Model",
                    info="A model given with --model"
                    + (", or a hub id (org/name)" if service.allow_hub_models else ""),
                    elem_id="model",
                )
                slot_inputs: list[Any] = []
                dropdowns: list[Any] = []
                for i in range(ADAPTER_SLOTS):
                    with gr.Row(equal_height=True):
                        dd = gr.Dropdown(
                            choices=[("(none)", "")] + [(service.adapter_label(a), a) for a in adapters],
                            value=adapters[0] if (i == 0 and adapters) else "",
                            label=f"Adapter {i + 1}",
                            elem_id=f"adapter-{i}",
                            scale=3,
                        )
                        wt = gr.Slider(
                            *WEIGHT_RANGE,
                            value=1.0,
                            step=0.05,
                            label="weight",
                            elem_id=f"weight-{i}",
                            scale=2,
                        )
                    dropdowns.append(dd)
                    slot_inputs += [dd, wt]
                scale = gr.Slider(
                    *SCALE_RANGE,
                    value=1.0,
                    step=SCALE_STEP,
                    label="λ scale",
                    info="1 = as trained, 0 = base model",
                    elem_id="lambda-scale",
                )
                prompt = gr.Textbox(label="Prompt", max_length=MAX_PROMPT_CHARS, elem_id="prompt", lines=2)
                negative = gr.Textbox(
                    label="Negative prompt", max_length=MAX_PROMPT_CHARS, elem_id="negative"
                )
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    sweep_go = gr.Button("λ sweep", elem_id="sweep")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        seed = gr.Number(
                            value=0,
                            precision=0,
                            minimum=SEED_RANGE[0],
                            maximum=SEED_RANGE[1],
                            label="Seed",
                            elem_id="seed",
                        )
                        randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="randomize")
                    with gr.Row():
                        steps = gr.Slider(
                            *STEPS_RANGE, value=default_steps, step=1, label="Steps", elem_id="steps"
                        )
                        guidance = gr.Slider(
                            *GUIDANCE_RANGE,
                            value=default_guidance,
                            step=0.5,
                            label="Guidance",
                            elem_id="guidance",
                        )
                    with gr.Row():
                        w = gr.Slider(
                            *SIZE_RANGE, value=width, step=SIZE_MULTIPLE, label="Width", elem_id="width"
                        )
                        h = gr.Slider(
                            *SIZE_RANGE, value=height, step=SIZE_MULTIPLE, label="Height", elem_id="height"
                        )
                    sweep_values = gr.Textbox(
                        value=DEFAULT_SWEEP, label="λ values for the sweep", elem_id="sweep-values"
                    )
                with gr.Accordion("More adapters", open=False):
                    rescan = gr.Button("Rescan adapters dir", size="sm", elem_id="rescan")
                    upload = gr.File(
                        label=f"Upload an adapter (.safetensors, ≤ {service.max_upload_bytes / 2**20:g} MiB)",
                        file_types=[".safetensors"],
                        type="filepath",
                        height=120,
                        elem_id="upload",
                    )
            with gr.Column(scale=2):
                with gr.Row():
                    base_img = gr.Image(label="Base (adapters off)", elem_id="base-image", **shown)
                    adapted_img = gr.Image(label="Adapted", elem_id="adapted-image", **shown)
                status = gr.Markdown(elem_id="status")
                sweep_img = gr.Image(label="λ sweep", elem_id="sweep-image", **(shown | {"height": 240}))
                info = gr.Markdown(elem_id="adapter-info")

        request_inputs = [
            model,
            scale,
            prompt,
            negative,
            seed,
            randomize,
            steps,
            guidance,
            w,
            h,
            *slot_inputs,
        ]

        def request_from(values: Sequence[Any]) -> GenerationRequest:
            m, s, p, n, sd, rnd, st, g, ww, hh, *rest = values
            return make_request(m, slots(rest), s, p, n, sd, bool(rnd), st, g, ww, hh)

        @guard
        def on_generate(*values: Any, progress: Any = tracker) -> tuple:
            request = request_from(values)
            result = service.generate(request, progress=lambda f, d: progress(f, desc=d))
            text = service.adapter_info(request.model, request.adapters, request.scale)
            return result.base, result.adapted, request.seed, result.message, text

        @guard
        def on_sweep(*values: Any, progress: Any = tracker) -> tuple:
            *rest, text = values
            notes: list[str] = []
            lambdas = parse_sweep_values(text, notes)
            request = request_from(rest)
            grid, _ = service.sweep(request, lambdas, progress=lambda f, d: progress(f, desc=d))
            message = f"λ sweep {', '.join(f'{v:g}' for v in lambdas)} at seed {request.seed}. " + " ".join(
                [*request.notes, *notes]
            )
            return grid, request.seed, message

        @guard
        def on_info(m: Any, s: Any, *rest: Any) -> str:
            chosen = [(n, float(clamp_number(wt, WEIGHT_RANGE, "weight"))) for n, wt in slots(rest) if n]
            return service.adapter_info(m, chosen, s)

        @guard
        def on_model(m: Any, s: Any, *rest: Any) -> tuple:
            ww, hh = service.native_size(m)
            return gr.update(value=ww), gr.update(value=hh), on_info(m, s, *rest)

        def choices_update(current: Sequence[Any]) -> list[Any]:
            names = service.list_adapters()
            opts = [("(none)", "")] + [(service.adapter_label(a), a) for a in names]
            return [gr.update(choices=opts, value=c if c in names else "") for c in current]

        @guard
        def on_upload(file: Any, *current: Any) -> tuple:
            if not file:
                return (gr.skip(), *[gr.skip()] * ADAPTER_SLOTS)
            path = file if isinstance(file, str) else getattr(file, "name", file)
            name = service.add_upload(path)
            current = list(current)
            if name not in current:
                empty = [i for i, c in enumerate(current) if not c]
                current[empty[0] if empty else 0] = name
            return f"Uploaded and validated: {name}", *choices_update(current)

        def on_rescan(*current: Any) -> tuple:
            service.rescan()
            return (
                f"Found {len(service.list_adapters())} adapter(s) in {service.adapters_dir}.",
                *choices_update(current),
            )

        go.click(
            on_generate, request_inputs, [base_img, adapted_img, seed, status, info], concurrency_id="gpu"
        )
        sweep_go.click(
            on_sweep, [*request_inputs, sweep_values], [sweep_img, seed, status], concurrency_id="gpu"
        )
        info_inputs = [model, scale, *slot_inputs]
        scale.change(on_info, info_inputs, info, trigger_mode="always_last", show_progress="hidden")
        for component in slot_inputs:
            component.change(on_info, info_inputs, info, trigger_mode="always_last", show_progress="hidden")
        model.change(on_model, info_inputs, [w, h, info])
        upload.upload(on_upload, [upload, *dropdowns], [status, *dropdowns])
        rescan.click(on_rescan, dropdowns, [status, *dropdowns])
        demo.load(on_info, info_inputs, info)
    return demo


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The app's flags (also used by ``delora-diffusion app``)."""
    parser = argparse.ArgumentParser(
        prog="delora-diffusion app",
        description="Gradio UI: generate with DeLoRA adapters, a λ slider, base vs adapted, λ sweeps.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="Model dir or hub id; repeat to offer several (default: the embedded model).",
    )
    parser.add_argument(
        "--adapters_dir",
        default=str(DEFAULT_ADAPTERS_DIR),
        help=f"Adapters are listed from here (default: {DEFAULT_ADAPTERS_DIR}, the training script's output).",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda, else mps, else cpu).")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--steps", type=int, default=20, help="Default number of steps in the UI.")
    parser.add_argument("--guidance", type=float, default=7.5, help="Default guidance scale in the UI.")
    parser.add_argument(
        "--no_hub_models", action="store_true", help="Do not let the UI load models by hub id."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Start the app on --host:--port (loopback by default). It is never shared publicly."""
    _disable_telemetry()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}.")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        parser.error(f"--max_upload_mb must be a positive number, got {args.max_upload_mb}.")
    models = args.model
    if not models:
        from .embedded import default_model_path

        path = default_model_path()
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"The embedded model is missing at {path}; pass --model DIR_OR_HUB_ID.")
        models = [str(path)]
    device = args.device or _default_device()
    try:
        import torch

        torch.device(device)
    except (RuntimeError, ValueError) as err:
        parser.error(f"--device {device!r} is not a torch device: {err}")
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    service = AppService(
        models,
        adapters_dir=args.adapters_dir,
        device=device,
        dtype=dtype,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        allow_hub_models=not args.no_hub_models,
    )
    try:
        service.pipeline(service.models[0])  # load before serving, so the first request is quick
    except AppError as err:
        raise SystemExit(str(err)) from None
    print(f"Adapters dir: {service.adapters_dir} ({len(service.list_adapters())} adapters found)", flush=True)
    demo = build_ui(
        service,
        default_steps=int(clamp_number(args.steps, STEPS_RANGE, "steps", integer=True)),
        default_guidance=float(clamp_number(args.guidance, GUIDANCE_RANGE, "guidance")),
    )
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        max_file_size=service.max_upload_bytes,
        show_error=True,
        footer_links=[],
        css=CSS,
    )


if __name__ == "__main__":
    main()
