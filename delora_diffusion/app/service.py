"""Everything the app does, without Gradio: models, adapters, uploads, generation, sweeps, the info panel.

Why the service looks the way it does:

- A pipeline is loaded once per model and cached. What is set on it (active adapters, their weights, the λ
  scale) is remembered, so a request only changes what differs: a slider move is one ``set_delora_scale``.
- λ is state on the (shared) pipeline, so every request that sets it and generates holds one lock: two users
  generating at once each get images for their own λ. A per-request work budget keeps one request from
  holding that lock for an hour.
- Adapters come only from the adapters dir (a name resolved inside a listing made at start and on Rescan) or
  from an upload (``.safetensors``, size-limited, validated, copied into the app's own temp dir). No UI input
  becomes a filesystem path, and no message or panel shows an absolute local path.
- The per-layer report behind the info panel is computed once per adapter load (see :mod:`.info`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .adapters import AdapterListing, adapter_key, resolve_listed, scan_adapters, scrub_paths
from .info import AdapterInfo, format_adapter_info, scaled_rows, unit_rows
from .inputs import (
    DEFAULT_MAX_WORK,
    MAX_SWEEP_VALUES,
    SCALE_RANGE,
    AppError,
    GenerationRequest,
    check_work,
    clamp_number,
    clamp_size,
)
from .outputs import image_grid, parameters_text, sampler_name, with_parameters
from .schedulers import use_scheduler

DEFAULT_ADAPTERS_DIR = Path("outputs/dreambooth-delora")
"""Where ``train_scripts/dreambooth_delora.py`` writes by default (relative to the working directory)."""
DEFAULT_MAX_UPLOAD_MB = 512
UPLOAD_PREFIX = "upload:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

Progress = Callable[[float, str], None]


@dataclass
class GenerationResult:
    """Base and adapted images from one seed, plus what the UI should tell the user."""

    base: Any
    adapted: Any
    request: GenerationRequest
    message: str


@dataclass(frozen=True)
class _Active:
    """What is set on a cached pipeline now: active adapter names, their weights, and the λ scale."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    scale: float | None


def _model_labels(models: Sequence[str]) -> dict[str, str]:
    """label -> model: a hub id as itself, a local path by its folder name (made unique)."""
    labels: dict[str, str] = {}
    for model in models:
        local = os.path.isabs(model) or os.path.lexists(model)
        base = (Path(model).name or "model") if local else model
        label, n = base, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels[label] = model
    return labels


class AppService:
    """The app's logic. Thread-safe: one re-entrant lock covers the pipeline cache, adapters, λ and generation.

    Uploaded adapters are copied into a temp dir the service owns; :meth:`close` (or the interpreter's exit)
    removes it.
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        adapters_dir: str | Path = DEFAULT_ADAPTERS_DIR,
        device: str = "cpu",
        dtype: str = "float32",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
        max_cached_models: int = 2,
        allow_hub_models: bool = False,
        max_work: int = DEFAULT_MAX_WORK,
        upload_dir: str | Path | None = None,
    ) -> None:
        if not models:
            raise ValueError("AppService needs at least one model.")
        from ..util import dtype_from_name

        self.models = [str(m) for m in models]
        self.model_labels = _model_labels(self.models)
        self.adapters_dir = Path(adapters_dir).expanduser().resolve()
        self.device = device
        self.dtype = dtype_from_name(dtype)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_cached_models = max(1, int(max_cached_models))
        self.allow_hub_models = allow_hub_models
        self.max_work = int(max_work)
        self._lock = threading.RLock()
        self._pipelines: OrderedDict[str, Any] = OrderedDict()
        self._loaded: dict[str, dict[str, str]] = {}  # model -> {adapter choice -> adapter_name}
        self._info: dict[tuple[str, str], AdapterInfo] = {}  # (model, choice) -> cached report and metadata
        self._active: dict[str, _Active] = {}
        self._schedulers: dict[str, dict[str, Any]] = {}  # model -> {sampler name -> scheduler}, '' its own
        self._uploads: dict[str, Path] = {}
        self._upload_dir = Path(upload_dir or tempfile.mkdtemp(prefix="delora-app-uploads-"))
        self._upload_dir.mkdir(parents=True, exist_ok=True)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._upload_dir), ignore_errors=True)
        self._listing: AdapterListing = scan_adapters(self.adapters_dir)

    def close(self) -> None:
        """Remove the uploads' temp dir (also done at interpreter exit)."""
        self._cleanup()

    def _public(self, text: str) -> str:
        """A message with the app's absolute paths replaced by short names: it is shown in the browser."""
        return scrub_paths(text, {self.adapters_dir: self.adapters_dir.name, self._upload_dir: "upload"})

    # ---- models

    def resolve_model(self, model: str) -> str:
        """The model behind a dropdown value: a label, a model given on the command line, or (if allowed) a
        hub id like org/name. Local paths come only from the command line; a hub id naming something on
        disk is refused."""
        if not isinstance(model, str) or not model.strip():
            raise AppError("Choose a model.")
        model = model.strip()
        if model in self.model_labels:
            return self.model_labels[model]
        if model in self.models:
            return model
        hub_like = bool(_HUB_ID.match(model)) and ".." not in model and not os.path.lexists(model)
        if hub_like and self.allow_hub_models:
            return model
        if hub_like:
            raise AppError(
                f"Model {model!r} is not one of the listed models. Loading models by hub id is off; start "
                "the app with --allow_hub_models to allow it."
            )
        raise AppError(
            f"Model {model!r} is not available: choose one of the listed models. Local model paths can only "
            "be given with --model."
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
            self._schedulers[model] = {"": pipe.scheduler}
            self._forget_adapters(model)
            while len(self._pipelines) > self.max_cached_models:
                old, _ = self._pipelines.popitem(last=False)
                self._schedulers.pop(old, None)
                self._forget_adapters(old)
            return pipe

    def _load_pipeline(self, model: str) -> Any:
        from diffusers import DiffusionPipeline

        import delora_diffusion  # noqa: F401  (adds load_delora_weights & co to every pipeline)

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=self.dtype)
        except (OSError, ValueError) as err:
            shown = self.model_label(model)
            paths = {Path(model): shown, Path(model).resolve(): shown}
            text = scrub_paths(str(err), paths) if shown != model else str(err)
            raise AppError(self._public(f"Could not load model {shown!r}: {text}")) from err
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def model_label(self, model: str) -> str:
        """A model as the UI and the PNG parameters name it: its label (folder name) or its hub id."""
        return next((label for label, m in self.model_labels.items() if m == model), model)

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
        """The adapters the dropdowns offer: the adapters dir's listing (made at start and on Rescan), then
        uploads."""
        return list(self._listing.found) + sorted(self._uploads)

    @property
    def unreadable(self) -> dict[str, str]:
        """Entries of the adapters dir that could not be read, with the reason (shown, never fatal)."""
        return dict(self._listing.unreadable)

    def adapter_label(self, name: str) -> str:
        """What the UI shows for an adapter name: the adapters dir itself ('.') by its folder name."""
        return f"{self.adapters_dir.name} (the adapters dir)" if name == "." else name

    def resolve_adapter(self, name: str) -> Path:
        """The file or directory behind an adapter name; only listed names inside the adapters dir resolve."""
        if not isinstance(name, str) or not name:
            raise AppError("Choose an adapter.")
        if name in self._uploads:
            return self._uploads[name]
        return resolve_listed(self.adapters_dir, self._listing, name)

    def add_upload(
        self, file_path: str | Path, original_name: str | None = None, consume: bool = False
    ) -> str:
        """Accept an uploaded adapter: ``.safetensors`` only, under the size limit, and a valid DeLoRA file.

        The bytes are copied into the service's own temp dir before they are validated, so what is loaded
        later is exactly what was checked. With `consume`, the given file (the web server's copy) is deleted
        whether it is accepted or not. Returns the name the adapter dropdowns offer it under.
        """
        path = Path(file_path)
        try:
            return self._add_upload(path, original_name or path.name)
        finally:
            if consume:
                path.unlink(missing_ok=True)

    def _add_upload(self, path: Path, shown: str) -> str:
        from ..io import read_delora_file

        if path.suffix.lower() != ".safetensors" or not shown.lower().endswith(".safetensors"):
            raise AppError(f"Uploads must be .safetensors files, got {shown!r}.")
        try:
            size = path.stat().st_size
        except OSError as err:
            raise AppError(f"Could not read the upload {shown!r}: {err.strerror}") from err
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
        except Exception as err:  # noqa: BLE001  (a hostile file may raise anything; none of it is fatal)
            copy.unlink(missing_ok=True)
            text = scrub_paths(str(err), {copy: shown, path: shown})
            raise AppError(
                self._public(f"The upload {shown!r} is not a valid DeLoRA adapter: {text}")
            ) from err
        with self._lock:
            self._uploads[name] = copy
        return name

    def _forget_adapters(self, model: str) -> None:
        self._loaded[model] = {}
        self._active.pop(model, None)
        for key in [k for k in self._info if k[0] == model]:
            del self._info[key]

    def rescan(self) -> list[str]:
        """List the adapters dir again, and forget loaded adapters (files may have been retrained).

        Models stay loaded: only the small adapter weights are read again on next use.
        """
        with self._lock:
            for model, pipe in self._pipelines.items():
                if self._loaded.get(model):
                    pipe.unload_delora_weights()
                self._forget_adapters(model)
            self._listing = scan_adapters(self.adapters_dir)
        return self.list_adapters()

    def _adapter_name(self, model: str, pipe: Any, choice: str) -> str:
        """The pipeline's adapter_name for `choice`, loading it (and taking its report) on first use."""
        loaded = self._loaded.setdefault(model, {})
        if choice in loaded:
            return loaded[choice]
        path = self.resolve_adapter(choice)
        key = adapter_key(choice)
        try:
            pipe.load_delora_weights(str(path), adapter_name=key)
        except Exception as err:  # noqa: BLE001  (a hostile file may raise anything; none of it is fatal)
            raise AppError(self._public(f"Could not load adapter {choice!r}: {err}")) from err
        self._active.pop(model, None)  # a fresh adapter is active at scale 1: what is set is unknown now
        try:  # a fresh adapter is at effective scale 1: the report's reference point
            self._info[(model, choice)] = AdapterInfo(
                unit_rows(pipe.delora_report(key)), pipe.get_delora_metadata(key)
            )
        except BaseException:
            pipe.unload_delora_weights()
            self._forget_adapters(model)
            raise
        loaded[choice] = key
        return key

    # ---- what is active

    def _activate(
        self, model: str, adapters: Sequence[tuple[str, float]], scale: float
    ) -> tuple[Any, list[str]]:
        """Make exactly `adapters` active at their weights, λ scaled by `scale`, changing only what differs
        from what is set now. Caller holds the lock."""
        pipe = self.pipeline(model)
        names = tuple(self._adapter_name(model, pipe, choice) for choice, _ in adapters)
        weights = tuple(float(weight) for _, weight in adapters)
        before = self._active.get(model)
        if before is None or (before.names, before.weights) != (names, weights):
            if names or self._loaded.get(model):
                pipe.set_delora_adapters(list(names), list(weights))
            before = None
        if names and (before is None or before.scale != scale):
            pipe.set_delora_scale(scale)
        self._active[model] = _Active(names, weights, scale if names else None)
        return pipe, list(names)

    def select(self, model: str, adapters: Sequence[tuple[str, float]], scale: Any) -> str:
        """What choosing adapters or weights does: load what is new, make it active, return the info panel."""
        value = float(clamp_number(scale, SCALE_RANGE, "λ scale"))
        with self._lock:
            self._activate(self.resolve_model(model), adapters, value)
        return self.adapter_info(model, adapters, value)

    def set_scale(self, model: str, adapters: Sequence[tuple[str, float]], scale: Any) -> float:
        """What a slider move does: one ``set_delora_scale`` on the cached pipeline. Returns the used scale.

        While a generation holds the lock the move is not waited for: every generation sets its own λ.
        """
        value = float(clamp_number(scale, SCALE_RANGE, "λ scale"))
        model = self.resolve_model(model)
        if self._lock.acquire(blocking=False):
            try:
                self._activate(model, adapters, value)
            finally:
                self._lock.release()
        return value

    def adapter_info(self, model: str, adapters: Sequence[tuple[str, float]], scale: Any) -> str:
        """Markdown for the info panel: rank, λ per layer, the bound and actual ‖ΔW‖/‖W‖ now, training args.

        Adapters not loaded yet are loaded (and reported on) once; after that this is arithmetic only.
        """
        value = float(clamp_number(scale, SCALE_RANGE, "λ scale"))
        if not adapters:
            return "No adapter selected."
        model = self.resolve_model(model)
        with self._lock:
            pipe = self.pipeline(model)
            for choice, _ in adapters:
                self._adapter_name(model, pipe, choice)
            infos = [self._info[(model, choice)] for choice, _ in adapters]
        sections = []
        for (choice, weight), info in zip(adapters, infos, strict=True):
            rows = scaled_rows(info, weight * value)
            sections.append(
                format_adapter_info(self.adapter_label(choice), weight, value, rows, info.metadata)
            )
        return "\n\n".join(sections)

    # ---- generation

    def _generate_one(
        self,
        pipe: Any,
        request: GenerationRequest,
        progress: Progress | None,
        done: int,
        total: int,
        label: str,
    ) -> Any:
        import torch

        def on_step_end(_pipe: Any, step: int, _timestep: Any, _kwargs: dict) -> dict:
            if progress is not None:
                progress((done + step + 1) / total, f"{label}: step {step + 1}/{request.steps}")
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

    def _tag(self, image: Any, pipe: Any, request: GenerationRequest, adapters: Any = (), **kw: Any) -> Any:
        """`image` with its A1111-style ``parameters`` text (see :mod:`.outputs`); no absolute paths."""
        named = [(self.adapters_dir.name if c == "." else c, w) for c, w in adapters]
        model = self.model_label(self.resolve_model(request.model))
        sampler = request.scheduler or sampler_name(pipe.scheduler)
        text = parameters_text(request, model, sampler, named, **kw)
        return with_parameters(image, self._public(text))

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        """Base (adapters off) and adapted images from the same seed; λ is held for the whole request."""
        model = self.resolve_model(request.model)
        check_work(request, 2 if request.adapters else 1, self.max_work)
        with self._lock:
            pipe, names = self._activate(model, request.adapters, request.scale)
            use_scheduler(pipe, request.scheduler, self._schedulers[model])
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
            self._tag(base, pipe, request)
            if names:
                self._tag(adapted, pipe, request, request.adapters)
        lines = [f"Seed {request.seed}, λ scale {request.scale:g}."]
        if not names:
            lines.append("No adapter selected: both images are the base model.")
        lines += request.notes
        return GenerationResult(base=base, adapted=adapted, request=request, message=" ".join(lines))

    def sweep(
        self, request: GenerationRequest, values: Sequence[float], progress: Progress | None = None
    ) -> tuple[Any, list[Any]]:
        """The adapted image at each λ scale in `values` (same seed): a grid, and the images themselves."""
        if not request.adapters:
            raise AppError("Select an adapter for the λ sweep.")
        values = [float(clamp_number(v, SCALE_RANGE, "Sweep λ")) for v in values]
        if not values or len(values) > MAX_SWEEP_VALUES:
            raise AppError(f"A sweep takes 1 to {MAX_SWEEP_VALUES} λ values.")
        check_work(request, len(values), self.max_work, what=f"This {len(values)}-value sweep")
        model = self.resolve_model(request.model)
        images = []
        with self._lock:
            total = request.steps * len(values)
            for i, value in enumerate(values):
                pipe, _ = self._activate(model, request.adapters, value)
                use_scheduler(pipe, request.scheduler, self._schedulers[model])
                step = replace(request, scale=value)
                image = self._generate_one(pipe, step, progress, i * request.steps, total, f"λ × {value:g}")
                images.append(self._tag(image, pipe, request, request.adapters, scale=value))
            self._activate(model, request.adapters, request.scale)
            grid = image_grid(images, [f"{v:g}" for v in values])
            sweep = ("λ sweep", ", ".join(f"{v:g}" for v in values))
            self._tag(grid, pipe, request, request.adapters, extra=[sweep])
        return grid, images
