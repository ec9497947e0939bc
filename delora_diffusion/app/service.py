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
- Plain LoRA files (see :mod:`.lora`) are loaded by diffusers itself and run at slot weight × scale, so a
  user compares them with DeLoRA adapters under the same slider; the base image has both kinds off.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
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
)
from .lora import (
    DELORA,
    LORA,
    LoraSummary,
    format_lora_info,
    load_lora,
    read_lora_summary,
    remove_loras,
    set_loras,
)
from .models import Progress, generate_one, load_pipeline, model_labels, native_size
from .outputs import image_grid, parameters_text, sampler_name, with_parameters
from .schedulers import use_scheduler
from .uploads import accept_upload

DEFAULT_ADAPTERS_DIR = Path("outputs/dreambooth-delora")
"""Where ``train_scripts/dreambooth_delora.py`` writes by default (relative to the working directory)."""
DEFAULT_MAX_UPLOAD_MB = 512
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class GenerationResult:
    """Base and adapted images from one seed, plus what the UI should tell the user."""

    base: Any
    adapted: Any
    request: GenerationRequest
    message: str


@dataclass(frozen=True)
class _Active:
    """What is set on a cached pipeline now: active DeLoRA names, their weights and the λ scale, and the
    active LoRA names with the weights set on them (weight × scale)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    scale: float | None
    lora_names: tuple[str, ...] = ()
    lora_weights: tuple[float, ...] = ()


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
        self.model_labels = model_labels(self.models)
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
        self._info: dict[tuple[str, str], AdapterInfo | LoraSummary] = {}  # (model, choice) -> panel data
        # (model, choice) -> (mtime, size) of a LoRA file when it was loaded: Rescan compares them
        self._lora_files: dict[tuple[str, str], tuple[int, int]] = {}
        self._active: dict[str, _Active] = {}
        self._schedulers: dict[str, dict[str, Any]] = {}  # model -> {sampler name -> scheduler}, '' its own
        self._uploads: dict[str, tuple[Path, str]] = {}  # name -> (validated copy, kind)
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
        try:
            return load_pipeline(model, self.dtype, self.device)
        except (OSError, ValueError) as err:
            shown = self.model_label(model)
            paths = {Path(model): shown, Path(model).resolve(): shown}
            text = scrub_paths(str(err), paths) if shown != model else str(err)
            raise AppError(self._public(f"Could not load model {shown!r}: {text}")) from err

    def model_label(self, model: str) -> str:
        """A model as the UI and the PNG parameters name it: its label (folder name) or its hub id."""
        return next((label for label, m in self.model_labels.items() if m == model), model)

    def native_size(self, model: str) -> tuple[int, int]:
        """The (width, height) the model was trained at, as the size sliders' default."""
        return native_size(self.pipeline(model))

    # ---- adapters

    def list_adapters(self) -> list[str]:
        """The adapters the dropdowns offer: the adapters dir's listing (made at start and on Rescan), then
        uploads."""
        return list(self._listing.found) + sorted(self._uploads)

    @property
    def unreadable(self) -> dict[str, str]:
        """Entries of the adapters dir that could not be read, with the reason (shown, never fatal)."""
        return dict(self._listing.unreadable)

    def adapter_kind(self, name: str) -> str:
        """'delora' or 'lora' (a plain LoRA file, loaded by diffusers) for a listed or uploaded adapter."""
        if name in self._uploads:
            return self._uploads[name][1]
        return self._listing.kinds.get(name, DELORA)

    def adapter_label(self, name: str) -> str:
        """What the UI shows for an adapter name: the adapters dir itself ('.') by its folder name, and a plain
        LoRA file marked as one (the dropdowns offer both kinds side by side)."""
        if name == ".":
            return f"{self.adapters_dir.name} (the adapters dir)"
        return f"{name} (LoRA)" if self.adapter_kind(name) == LORA else name

    def resolve_adapter(self, name: str) -> Path:
        """The file or directory behind an adapter name; only listed names inside the adapters dir resolve."""
        if not isinstance(name, str) or not name:
            raise AppError("Choose an adapter.")
        if name in self._uploads:
            return self._uploads[name][0]
        return resolve_listed(self.adapters_dir, self._listing, name)

    def add_upload(
        self, file_path: str | Path, original_name: str | None = None, consume: bool = False
    ) -> str:
        """Accept an uploaded adapter: ``.safetensors`` only, under the size limit, and a valid DeLoRA or plain
        LoRA file (see :mod:`.uploads`).

        The bytes are copied into the service's own temp dir before they are validated, so what is loaded
        later is exactly what was checked. With `consume`, the given file (the web server's copy) is deleted
        whether it is accepted or not. Returns the name the adapter dropdowns offer it under.
        """
        path = Path(file_path)
        try:
            with self._lock:
                known = dict(self._uploads)
            name, copy, kind = accept_upload(
                path, original_name or path.name, self._upload_dir, self.max_upload_bytes, known
            )
        except AppError as err:
            raise AppError(self._public(str(err))) from err.__cause__
        finally:
            if consume:
                path.unlink(missing_ok=True)
        with self._lock:
            self._uploads[name] = (copy, kind)
        return name

    def _loaded_of(self, model: str, kind: str) -> dict[str, str]:
        """{choice: adapter_name} of the loaded adapters of one kind on `model`'s pipeline (the kind as loaded:
        a file gone from the listing is still known as what it was)."""
        loaded = self._loaded.get(model, {}).items()
        return {c: k for c, k in loaded if ((model, c) in self._lora_files) == (kind == LORA)}

    def _forget_adapters(self, model: str, choices: Sequence[str] | None = None) -> None:
        """Forget loaded adapters of `model` (all, or `choices`): what they were, and what is set now."""
        loaded = self._loaded.setdefault(model, {})
        for choice in list(loaded) if choices is None else choices:
            loaded.pop(choice, None)
            self._info.pop((model, choice), None)
            self._lora_files.pop((model, choice), None)
        self._active.pop(model, None)

    def _stale_loras(self, model: str) -> list[str]:
        """Loaded LoRA choices whose file is gone, no longer listed, or changed since it was loaded."""
        stale = []
        for choice in self._loaded_of(model, LORA):
            try:
                path = self.resolve_adapter(choice)
                now = (path.stat().st_mtime_ns, path.stat().st_size)
            except (AppError, OSError):
                now = None
            if now is None or now != self._lora_files.get((model, choice)):
                stale.append(choice)
        return stale

    def rescan(self) -> list[str]:
        """List the adapters dir again, and forget loaded DeLoRA adapters (files may have been retrained).

        LoRA adapters whose files are gone or changed are deleted from the pipeline (diffusers'
        ``delete_adapters``, or ``unload_lora_weights`` for the last one); unchanged ones stay loaded. Models
        stay loaded: only the small adapter weights are read again on next use.
        """
        with self._lock:
            self._listing = scan_adapters(self.adapters_dir)
            for model, pipe in self._pipelines.items():
                delora = list(self._loaded_of(model, DELORA))
                if delora:
                    pipe.unload_delora_weights()
                stale = self._stale_loras(model)
                if stale:
                    remove_loras(pipe, [self._loaded[model][c] for c in stale])
                self._forget_adapters(model, delora + stale)
        return self.list_adapters()

    def _load(self, model: str, pipe: Any, choice: str, key: str) -> AdapterInfo | LoraSummary:
        """Load one adapter under `key` and take what the info panel needs; a failure leaves nothing loaded."""
        path = self.resolve_adapter(choice)
        if self.adapter_kind(choice) == LORA:
            stamp = (path.stat().st_mtime_ns, path.stat().st_size)
            summary = read_lora_summary(path)  # the header, checked before diffusers reads anything
            load_lora(pipe, path, key)
            self._lora_files[(model, choice)] = stamp
            return summary
        pipe.load_delora_weights(str(path), adapter_name=key)
        try:  # a fresh adapter is at effective scale 1: the report's reference point
            return AdapterInfo(unit_rows(pipe.delora_report(key)), pipe.get_delora_metadata(key))
        except BaseException:
            pipe.unload_delora_weights(key)
            raise

    def _adapter_name(self, model: str, pipe: Any, choice: str) -> str:
        """The pipeline's adapter_name for `choice`, loading it (and taking its report) on first use."""
        loaded = self._loaded.setdefault(model, {})
        if choice in loaded:
            return loaded[choice]
        key = adapter_key(choice)
        self.resolve_adapter(choice)  # an unknown name is the user's error, shown as it is
        self._active.pop(model, None)  # loading changes what is active: set everything again next time
        try:
            info = self._load(model, pipe, choice, key)
        except Exception as err:  # noqa: BLE001  (a hostile file may raise anything; none of it is fatal)
            raise AppError(self._public(f"Could not load adapter {choice!r}: {err}")) from err
        self._info[(model, choice)] = info
        loaded[choice] = key
        return key

    # ---- what is active

    def _activate(
        self, model: str, adapters: Sequence[tuple[str, float]], scale: float
    ) -> tuple[Any, list[str]]:
        """Make exactly `adapters` active at their weights, λ scaled by `scale`, changing only what differs
        from what is set now. Caller holds the lock."""
        pipe = self.pipeline(model)
        keys = [(self._adapter_name(model, pipe, c), float(w), self.adapter_kind(c)) for c, w in adapters]
        names = tuple(k for k, _, kind in keys if kind == DELORA)
        weights = tuple(w for _, w, kind in keys if kind == DELORA)
        lora_names = tuple(k for k, _, kind in keys if kind == LORA)
        # the scale slider scales a LoRA's weight as it scales every DeLoRA λ
        lora_weights = tuple(w * scale for _, w, kind in keys if kind == LORA)
        before = self._active.get(model)
        if before is None or (before.names, before.weights) != (names, weights):
            if names or self._loaded_of(model, DELORA):
                pipe.set_delora_adapters(list(names), list(weights))
            before = replace(before, scale=None) if before else None
        if names and (before is None or before.scale != scale):
            pipe.set_delora_scale(scale)
        if before is None or (before.lora_names, before.lora_weights) != (lora_names, lora_weights):
            set_loras(pipe, lora_names, lora_weights, bool(self._loaded_of(model, LORA)))
        self._active[model] = _Active(names, weights, scale if names else None, lora_names, lora_weights)
        return pipe, [k for k, _, _ in keys]

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
        """Markdown for the info panel: rank, λ per layer, the bound and actual ‖ΔW‖/‖W‖ now, training args;
        for a plain LoRA its kind, weight, rank, layers and target modules (from its header).

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
            label = self.adapter_label(choice)
            if isinstance(info, LoraSummary):
                sections.append(format_lora_info(label, weight, value, info))
                continue
            rows = scaled_rows(info, weight * value)
            sections.append(format_adapter_info(label, weight, value, rows, info.metadata))
        return "\n\n".join(sections)

    # ---- generation

    def _tag(self, image: Any, pipe: Any, request: GenerationRequest, adapters: Any = (), **kw: Any) -> Any:
        """`image` with its A1111-style ``parameters`` text (see :mod:`.outputs`); no absolute paths.

        DeLoRA adapters and plain LoRA files get a field each, so the text says which was which."""
        named = [(self.adapters_dir.name if c == "." else c, w, self.adapter_kind(c)) for c, w in adapters]
        delora = [(c, w) for c, w, kind in named if kind != LORA]
        loras = [(c, w) for c, w, kind in named if kind == LORA]
        model = self.model_label(self.resolve_model(request.model))
        sampler = request.scheduler or sampler_name(pipe.scheduler)
        text = parameters_text(request, model, sampler, delora, loras=loras, **kw)
        return with_parameters(image, self._public(text))

    @contextlib.contextmanager
    def _adapters_off(self, model: str, pipe: Any) -> Iterator[None]:
        """The base model for the 'base' image: active DeLoRA and LoRA adapters off, back on afterwards."""
        active = self._active.get(model)
        delora, lora = bool(active and active.names), bool(active and active.lora_names)
        if delora:
            pipe.disable_delora()
        if lora:
            pipe.disable_lora()
        try:
            yield
        finally:
            if delora:
                pipe.enable_delora()
            if lora:
                pipe.enable_lora()

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        """Base (adapters off) and adapted images from the same seed; λ is held for the whole request."""
        model = self.resolve_model(request.model)
        check_work(request, 2 if request.adapters else 1, self.max_work)
        with self._lock:
            pipe, names = self._activate(model, request.adapters, request.scale)
            use_scheduler(pipe, request.scheduler, self._schedulers[model])
            total = request.steps * (2 if names else 1)
            with self._adapters_off(model, pipe):
                base = generate_one(pipe, request, progress, 0, total, "base")
            adapted = (
                generate_one(pipe, request, progress, request.steps, total, f"λ × {request.scale:g}")
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
                image = generate_one(pipe, step, progress, i * request.steps, total, f"λ × {value:g}")
                images.append(self._tag(image, pipe, request, request.adapters, scale=value))
            self._activate(model, request.adapters, request.scale)
            grid = image_grid(images, [f"{v:g}" for v in values])
            sweep = ("λ sweep", ", ".join(f"{v:g}" for v in values))
            self._tag(grid, pipe, request, request.adapters, extra=[sweep])
        return grid, images
