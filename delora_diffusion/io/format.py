"""The DeLoRA adapter file on its own: header, metadata, tensors, checks. Plain tensors and dicts only.

See ``docs/FORMAT.md`` for the layout. Nothing here takes a module or a pipeline, so the CLI can inspect and
convert files without loading a model. Reading validates the file completely (header structure, sizes, dtypes,
checksum, version, metadata types, key structure, shapes, finiteness, bounds) before anything uses it, and
every problem is a :class:`DeLoRAFileError`, never a raw AttributeError or TypeError from a crafted value.

A file never carries code the loader runs: the layers it adapts are stored as exact names
(``delora_layers``), and the regex patterns inside a recorded config are kept as information only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DeLoRAConfig
from .container import (
    DeLoRAFileError,
    is_json_int,
    load_tensors,
    read_safetensors_header,
    write_safetensors_atomic,
)

WEIGHT_NAME = "delora_weights.safetensors"
"""File name of an adapter inside a directory (what ``save_delora_weights`` and the training script write)."""

FORMAT_NAME = "delora-diffusion"
FORMAT_VERSION = 1
"""Bumped on any change an older reader could misread; readers refuse versions they do not know."""

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline components that can carry adapters: the denoiser and the text encoders."""

REQUIRED = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
FROZEN_PAIR = ("delora_A0", "delora_B0")
TENSOR_NAMES = REQUIRED + FROZEN_PAIR

TENSOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""The dtypes an adapter's tensors may have. float8 and integer tensors are refused (no DeLoRA math runs on them)."""

MAX_FILE_RELATIVE_BOUND = 1e3
"""Largest bound on |dW|_F / |W|_F a layer of a loaded or saved adapter may have.

The bound is ``|lambda| * max_j w_j / |w|`` (twice that with the paper init), at most ``|lambda|`` (``2|lambda|``)
since ``max_j w_j <= |w|``. Trained adapters sit near 1-30 (PEFT's lambda 15 gives 3-6 on the bundled model;
a relative-bound config caps it at 10), so a layer past 1e3 cannot be a useful adapter: it is a corrupted or
crafted file (lambda = 1e30 loads as finite and renders NaN images), refused with the layer's name.
"""


# --- small helpers -------------------------------------------------------------------------------------------
def split_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"a.b.delora_A": t}`` -> ``{"a.b": {"delora_A": t}}``. Keys that are not ``<layer>.<name>`` go to ``""``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, name = key.rpartition(".")
        layers.setdefault(layer, {})[name] = tensor
    return layers


def canonical_layer_name(name: str) -> str:
    """Layer names without PEFT's ``.base_layer`` hops, so files do not depend on a LoRA being loaded too."""
    return name.replace(".base_layer", "")


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over keys, dtypes, shapes and raw bytes, in key order: detects any corruption of the data."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def w_norm_fingerprint(layers: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """A fingerprint of the base model's column norms ``w`` seen at injection: which base the adapter is for."""
    digest = hashlib.sha256()
    total, largest, count = 0.0, 0.0, 0
    for layer in sorted(layers):
        w = layers[layer]["delora_w_norm"].detach().float().cpu()
        digest.update(layer.encode())
        digest.update(w.numpy().tobytes())
        total += float(w.sum())
        largest = max(largest, float(w.max())) if w.numel() else largest
        count += w.numel()
    return {
        "sha256": digest.hexdigest()[:16],
        "layers": len(layers),
        "mean": total / max(count, 1),
        "max": largest,
    }


def json_value(value: Any) -> str:
    """A metadata value as safetensors stores it: a JSON string (sorted keys, so equal data gives equal files)."""
    return json.dumps(value, sort_keys=True, default=str)


def name_list(names: list[str], most: int = 5) -> str:
    """The first few of many names for a message (``a, b, c, ...``)."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


# --- writing ---------------------------------------------------------------------------------------------------
def write_delora_file(
    path: str | os.PathLike,
    per_component: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, DeLoRAConfig],
    metadata: Mapping[str, Any],
) -> Path:
    """Write tensors per component (``"<layer>.<tensor>"`` keys) and their configs as one adapter file.

    `metadata` holds the optional entries by their parsed names (adapter_name, component_classes, conv_shapes,
    base_model, pipeline_class, training_args, library_version). The layers are checked first (complete,
    bounded), so a broken adapter is never written.
    """
    tensors: dict[str, torch.Tensor] = {}
    layer_names: dict[str, list[str]] = {}
    for component, comp_tensors in per_component.items():
        if not isinstance(component, str) or not component or "." in component:
            raise ValueError(f"Component names must be non-empty and without '.', got {component!r}.")
        layers = split_layers(comp_tensors)
        check_bounds(layers, component, str(path), saving=True)
        layer_names[component] = sorted(layers)
        tensors.update({f"{component}.{k}": v for k, v in comp_tensors.items()})
    raw = {
        "format": "pt",
        "delora_format": FORMAT_NAME,
        "delora_format_version": str(FORMAT_VERSION),
        "delora_library_version": str(metadata.get("library_version", "")),
        "delora_adapter_name": metadata.get("adapter_name", "default"),
        "delora_components": json_value(list(per_component)),
        "delora_component_classes": json_value(dict(metadata.get("component_classes", {}))),
        "delora_configs": json_value({c: configs[c].to_dict() for c in per_component}),
        "delora_layers": json_value(layer_names),
        "delora_w_norm_fingerprint": json_value(
            {c: w_norm_fingerprint(split_layers(t)) for c, t in per_component.items()}
        ),
        "delora_conv_shapes": json_value(dict(metadata.get("conv_shapes", {}))),
        "delora_checksum": tensor_checksum(tensors),
    }
    for key in ("base_model", "pipeline_class"):
        if metadata.get(key) is not None:
            raw[f"delora_{key}"] = str(metadata[key])
    if metadata.get("training_args") is not None:
        raw["delora_training_args"] = json_value(metadata["training_args"])
    return write_safetensors_atomic(path, tensors, raw)


# --- metadata ----------------------------------------------------------------------------------------------------
def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_str_map(value: Any, item: Any = None) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and (item is None or item(v)) for k, v in value.items()
    )


def _is_kernel_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(is_json_int(d) and d > 0 for d in value)


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _map_of(item: Any) -> Any:
    return lambda value: _is_str_map(value, item)


# Parsed name, metadata key, default when absent, the check a JSON value must pass, and its shape in words.
_JSON_FIELDS: tuple[tuple[str, str, Any, Any, str], ...] = (
    ("components", "delora_components", [], _is_str_list, "a list of component names"),
    ("component_classes", "delora_component_classes", {}, _map_of(lambda v: isinstance(v, str)), "a map of class names"),
    ("configs", "delora_configs", {}, _map_of(lambda v: isinstance(v, dict)), "a map of configs"),
    ("layers", "delora_layers", None, _optional(_map_of(_is_str_list)), "a map of layer-name lists"),
    ("w_norm_fingerprint", "delora_w_norm_fingerprint", {}, _map_of(lambda v: isinstance(v, dict)), "a map"),
    ("training_args", "delora_training_args", None, _optional(lambda v: isinstance(v, dict)), "an object"),
    ("conv_shapes", "delora_conv_shapes", {}, _map_of(_map_of(_is_kernel_shape)), "a map of 4-d kernel shapes"),
)  # fmt: skip


def _parse_json(metadata: dict[str, str], key: str, where: str, default: Any, check: Any, shape: str) -> Any:
    if key not in metadata:
        return default
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError):
        raise DeLoRAFileError(
            f"{where} has corrupted metadata {key!r} (not JSON); re-save the adapter."
        ) from None
    if not check(value):
        raise DeLoRAFileError(
            f"{where} has corrupted metadata {key!r}: expected {shape}; re-save the adapter."
        )
    return value


def _check_version(metadata: dict[str, str], where: str) -> int:
    if metadata.get("delora_format") != FORMAT_NAME:
        raise DeLoRAFileError(
            f"{where} is not a delora-diffusion adapter file (no 'delora_format' metadata). "
            "A PEFT DeLoRA adapter is loaded from its directory (adapter_config.json + adapter_model.safetensors); "
            "a LoRA file is loaded with diffusers' pipe.load_lora_weights."
        )
    raw_version = metadata.get("delora_format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", raw_version):
        raise DeLoRAFileError(f"{where} has an unreadable format version {raw_version!r}; re-save it.")
    version = int(raw_version)
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise DeLoRAFileError(
            f"{where} uses adapter format version {version}, but this delora-diffusion reads version "
            f"{FORMAT_VERSION} only. "
            + ("Upgrade delora-diffusion (pip install -U delora-diffusion)." if newer else "Re-save it.")
        )
    return version


def parse_metadata(metadata: Mapping[str, str], path: str) -> dict[str, Any]:
    """Check the format name and version, and turn the string metadata into Python values of known types."""
    where = repr(path)
    if not _is_str_map(dict(metadata), lambda v: isinstance(v, str)):
        raise DeLoRAFileError(f"{where} has corrupted metadata (not a map of strings); re-save the adapter.")
    metadata = dict(metadata)
    version = _check_version(metadata, where)
    parsed: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": version,
        "library_version": metadata.get("delora_library_version"),
        "adapter_name": metadata.get("delora_adapter_name", "default"),
        "base_model": metadata.get("delora_base_model"),
        "pipeline_class": metadata.get("delora_pipeline_class"),
        "checksum": metadata.get("delora_checksum"),
    }
    for name, key, default, check, shape in _JSON_FIELDS:
        parsed[name] = _parse_json(metadata, key, where, default, check, shape)
    name = parsed["adapter_name"]
    if not name or "." in name:
        raise DeLoRAFileError(f"{where} records the adapter name {name!r}; names are non-empty, without '.'.")
    components = parsed["components"]
    if (
        not components
        or len(set(components)) != len(components)
        or any(not c or "." in c for c in components)
    ):
        raise DeLoRAFileError(f"{where} has a bad component list {components!r}; re-save the adapter.")
    for component in components:
        if component not in parsed["configs"]:
            raise DeLoRAFileError(f"{where} has no DeLoRAConfig for component {component!r}; re-save it.")
        try:
            DeLoRAConfig.from_dict(parsed["configs"][component])
        except (TypeError, ValueError, AttributeError, KeyError) as err:
            raise DeLoRAFileError(f"{where} has an invalid DeLoRAConfig for {component!r}: {err}") from None
    extra = sorted(set(parsed["configs"]) | set(parsed["layers"] or {}) | set(parsed["conv_shapes"]))
    if set(extra) - set(components):
        raise DeLoRAFileError(
            f"{where} has metadata for components {sorted(set(extra) - set(components))} that are not in its "
            f"component list {components}; re-save the adapter."
        )
    return parsed


def read_delora_file(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and fully validate one adapter file: (tensors per component, parsed metadata).

    Raises :class:`DeLoRAFileError` for truncated, corrupted or malformed files, unknown format versions,
    missing or unknown keys, inconsistent shapes, non-finite values and absurd bounds (FileNotFoundError for a
    missing path).
    """
    path = Path(path)
    where = repr(str(path))
    _, raw_metadata = read_safetensors_header(path)
    metadata = parse_metadata(raw_metadata, str(path))
    tensors = load_tensors(path)
    if metadata["checksum"] and tensor_checksum(tensors) != metadata["checksum"]:
        raise DeLoRAFileError(
            f"{where} is corrupted: its tensors do not match the checksum recorded when it was written "
            "(a damaged download or disk?); re-download or re-save the adapter."
        )
    per_component: dict[str, dict[str, torch.Tensor]] = {c: {} for c in metadata["components"]}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in per_component or not rest:
            raise DeLoRAFileError(
                f"{where} has the unknown key {key!r}: keys must start with one of the file's components "
                f"{metadata['components']}. Re-save the adapter with save_delora_weights."
            )
        per_component[component][rest] = tensor
    for component, comp_tensors in per_component.items():
        config = DeLoRAConfig.from_dict(metadata["configs"][component])
        layers = validate_tensors(
            comp_tensors, component, paper_init=config.init == "paper", source=str(path)
        )
        _check_recorded_layers(layers, metadata, component, where)
    return per_component, metadata


def _check_recorded_layers(
    layers: Mapping[str, Mapping[str, torch.Tensor]], metadata: dict[str, Any], component: str, where: str
) -> None:
    """The tensors hold exactly the layers the file records, and conv kernel shapes fit their factors."""
    recorded = (metadata["layers"] or {}).get(component)
    if recorded is not None:
        missing = sorted(set(recorded) - set(layers))
        if missing:
            raise DeLoRAFileError(
                f"{where} is missing keys: it records {len(missing)} layer(s) of {component} that have no tensors "
                f"in the file ({name_list(missing)}). The file is incomplete; re-save the adapter."
            )
        extra = sorted(set(layers) - set(recorded))
        if extra:
            raise DeLoRAFileError(
                f"{where} has unknown keys for layers {extra[:5]} of {component}, which its layer list does not "
                "record. The file was edited or damaged; re-save the adapter."
            )
    for layer, shape in metadata["conv_shapes"].get(component, {}).items():
        named = layers.get(layer)
        if named is None or (shape[0], math.prod(shape[1:])) != (
            named["delora_B"].shape[0],
            named["delora_A"].shape[1],
        ):
            raise DeLoRAFileError(
                f"{where} records the conv kernel shape {shape} for {component}.{layer}, which does not fit its "
                "tensors. The file is damaged; re-save the adapter."
            )


def validate_tensors(
    tensors: Mapping[str, torch.Tensor],
    component: str,
    paper_init: bool | None = None,
    source: str = "adapter",
) -> dict[str, dict[str, torch.Tensor]]:
    """Check one component's tensors on their own: complete layers, no unknown names, consistent shapes, float
    dtypes, finite values, sane bounds. Returns them split by layer."""
    layers = split_layers(tensors)
    if not layers:
        raise DeLoRAFileError(f"{source!r} has no tensors for component {component!r}.")
    for layer, named in layers.items():
        _check_layer(named, f"{component}.{layer}" if layer else component, bool(layer), paper_init, source)
    check_bounds(layers, component, source)
    return layers


def _check_layer(
    named: Mapping[str, torch.Tensor], where: str, has_name: bool, paper_init: bool | None, source: str
) -> None:
    unknown = sorted(set(named) - set(TENSOR_NAMES))
    if unknown or not has_name:
        names = [f"{where}.{n}" for n in unknown] or [where]
        raise DeLoRAFileError(
            f"{source!r} has unknown keys {names}; a DeLoRA layer holds only {list(TENSOR_NAMES)}. "
            "Was it written by another tool? Re-save it with save_delora_weights."
        )
    has_pair = paper_init if paper_init is not None else any(n in named for n in FROZEN_PAIR)
    missing = [f"{where}.{n}" for n in REQUIRED + (FROZEN_PAIR if has_pair else ()) if n not in named]
    if missing:
        raise DeLoRAFileError(f"{source!r} is missing keys {missing}; the adapter is incomplete. Re-save it.")
    if not has_pair and any(n in named for n in FROZEN_PAIR):
        raise DeLoRAFileError(
            f"{source!r} has unknown keys {[f'{where}.{n}' for n in FROZEN_PAIR if n in named]}: the config "
            "says init='zero', which has no frozen pair. Re-save the adapter."
        )
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in TENSOR_DTYPES:
            found = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise DeLoRAFileError(
                f"{source!r}: {where}.{name} has dtype {found}; expected float32, float16 or bfloat16."
            )
    A, B = named["delora_A"], named["delora_B"]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
        raise DeLoRAFileError(
            f"{source!r}: layer {where!r} has delora_A of shape {tuple(A.shape)} and delora_B of shape "
            f"{tuple(B.shape)}; expected (r, in) and (out, r) with the same r > 0. The file is damaged."
        )
    expected = {"delora_lambda": (1,), "delora_w_norm": (A.shape[1],)}
    if has_pair:
        expected.update(delora_A0=tuple(A.shape), delora_B0=tuple(B.shape))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise DeLoRAFileError(
                f"{source!r}: layer {where!r} has {name} of shape {tuple(named[name].shape)}, expected {shape}."
            )
    for name, tensor in named.items():
        if not torch.isfinite(tensor).all():
            raise DeLoRAFileError(
                f"{source!r}: {where}.{name} has non-finite values (NaN or inf); the adapter is broken "
                "(a diverged training run?). Use an earlier checkpoint."
            )


def check_bounds(
    layers: Mapping[str, Mapping[str, torch.Tensor]], component: str, source: str, *, saving: bool = False
) -> None:
    """Refuse a layer whose bound on |dW|_F / |W|_F exceeds :data:`MAX_FILE_RELATIVE_BOUND`, naming it."""
    from ..functional import norm_bound

    for layer, named in layers.items():
        lam, w = named.get("delora_lambda"), named.get("delora_w_norm")
        if lam is None or w is None or lam.numel() != 1 or w.numel() == 0:
            continue  # incomplete layers are reported by the structure checks
        paper = "delora_A0" in named
        bound = norm_bound(lam.detach().float().cpu(), w.detach().float().cpu(), paper).item()
        relative = bound / max(w.detach().float().norm().item(), 1e-12)
        if relative > MAX_FILE_RELATIVE_BOUND:  # NaN never is: non-finite values have their own message
            what = (
                "refusing to save it: did training diverge?" if saving else "the file is damaged or crafted."
            )
            raise DeLoRAFileError(
                f"{source!r}: layer {component}.{layer} has lambda {lam.float().item():.4g}, so its update may be "
                f"{relative:.3g} times the weight's norm (the limit is {MAX_FILE_RELATIVE_BOUND:g}). No useful "
                f"adapter does that; {what} Use an earlier checkpoint."
            )


# --- an adapter in memory, and what can be said about it from its tensors alone ------------------------------
@dataclass
class AdapterData:
    """An adapter read from any source: tensors per component and the parsed metadata.

    ``tensors[component]`` maps ``"<layer>.<tensor name>"`` (e.g. ``"mid_block...to_q.delora_A"``) to a tensor.
    ``metadata`` has the keys of :func:`read_delora_file` (configs, component_classes, base_model, ...).
    A PEFT adapter whose component is not known yet is stored under the component ``""``.
    """

    tensors: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, Any]
    source: str
    kind: str = "delora"  # "delora" (our file), "peft" or "state_dict"

    def config(self, component: str) -> DeLoRAConfig:
        return DeLoRAConfig.from_dict(self.metadata["configs"][component])


def layer_rho(config: DeLoRAConfig, layer: str) -> float | None:
    """A layer's relative bound as the file records it: an exact-name entry (see io.saving), else the default.

    A dict lookup of the escaped name, never a pattern match, so nothing from the file is evaluated.
    """
    if config.relative_bound is None:
        return None
    return float(config.relative_bound_pattern.get(re.escape(layer), config.relative_bound))


def layer_report(data: AdapterData, scale: float = 1.0) -> list[dict[str, Any]]:
    """Per layer, from the file alone: rank, lambda, the bound and the actual |dW|/|W| at `scale`.

    |W|_F is known without the base model: it is the norm of the column norms ``w`` stored in the adapter.
    """
    from .. import functional
    from ..util import finite_number

    scale = finite_number(scale, "The lambda scale")
    rows = []
    for component, tensors in data.tensors.items():
        config = data.config(component)
        for layer, named in sorted(split_layers(tensors).items()):
            A, B, lam, w = (named[n].float() for n in REQUIRED)
            A0, B0 = (named[n].float() if n in named else None for n in FROZEN_PAIR)
            delta = functional.delta_weight(A, B, lam, w, A.shape[0], scale, A0, B0)
            row = {"component": component, "layer": layer, "rank": A.shape[0], "init": config.init}
            row["lambda"] = lam.item()
            row["rho"] = layer_rho(config, layer)
            rows.append({**row, **functional.norm_stats(delta, lam * scale, w, A0 is not None)})
    return rows
