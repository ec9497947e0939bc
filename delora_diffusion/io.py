"""The DeLoRA adapter file: safetensors, keys prefixed by component, metadata that makes it self-describing.

See ``docs/FORMAT.md`` for the layout. Everything here works on plain tensors and dicts (no pipeline), so the
CLI can inspect and convert files without loading a model. Reading validates the file completely (header,
sizes, checksum, version, key structure, shapes, finiteness) before anything uses it.

Also here: reading PEFT DeLoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) and
resolving any adapter source (file, directory, state dict, hub repo id) into one :class:`AdapterData`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DeLoRAConfig

WEIGHT_NAME = "delora_weights.safetensors"
"""File name of an adapter inside a directory (what ``save_delora_weights`` and the training script write)."""

FORMAT_NAME = "delora-diffusion"
FORMAT_VERSION = 1
"""Bumped on any change an older reader could misread; readers refuse versions they do not know."""

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline components that can carry adapters: the denoiser and the text encoders."""

REQUIRED = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
FROZEN_PAIR = ("delora_A0", "delora_B0")
TENSOR_NAMES = REQUIRED + FROZEN_PAIR

HUB_KWARGS = {"revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "repo_type"}
"""Keyword arguments passed on to huggingface_hub's download for hub repo ids."""

_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_DTYPE_SIZES.update({"BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8})


class DeLoRAFileError(ValueError):
    """A bad adapter file or source. The message names the problem and how to fix it."""


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
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, component: str) -> DeLoRAConfig:
        return DeLoRAConfig.from_dict(self.metadata["configs"][component])


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


def unwrap_model(module: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers, so names and classes are the model's own."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def exact_targets(layer_names: list[str]) -> str:
    """A target_modules regex that selects exactly these layers (used when re-creating an adapter from a file)."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(layer_names)) + ")"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --- writing ---------------------------------------------------------------------------------------------------
def save_delora_file(
    path: str | os.PathLike,
    components: dict[str, nn.Module],
    adapter_name: str = "default",
    base_model: str | None = None,
    training_args: dict | None = None,
    *,
    pipeline_class: str | None = None,
) -> Path:
    """Write the adapter `adapter_name` of each component into one safetensors file, atomically.

    Components without that adapter are skipped; at least one must have it. The file is first written next
    to its destination and then renamed over it, so a crash never leaves a half-written adapter behind.
    """
    from . import __version__
    from .model import delora_configs, iter_delora_layers

    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {}
    classes: dict[str, str] = {}
    conv_shapes: dict[str, dict[str, list[int]]] = {}
    for component, module in components.items():
        if module is None:
            continue
        module = unwrap_model(module)
        if "." in component or not component:
            raise ValueError(f"Component names must be non-empty and without '.', got {component!r}.")
        found = False
        for layer_name, base, _, adapter in iter_delora_layers(module, adapter_name):
            found = True
            layer = canonical_layer_name(layer_name)
            if base.weight.ndim > 2:
                conv_shapes.setdefault(component, {})[layer] = list(base.weight.shape)
            for key, tensor in adapter.file_tensors().items():
                tensors[f"{component}.{layer}.{key}"] = tensor.detach().cpu().contiguous().clone()
        if not found:
            continue
        config = delora_configs(module).get(adapter_name)
        if config is None:
            raise ValueError(
                f"{component} has DeLoRA layers named {adapter_name!r} but no recorded DeLoRAConfig; "
                "create adapters with inject_delora (or load_delora_weights) so the config is known."
            )
        configs[component] = config.to_dict()
        classes[component] = type(module).__name__
    if not configs:
        raise ValueError(
            f"No component has a DeLoRA adapter named {adapter_name!r}; nothing to save. "
            f"Components given: {sorted(k for k, v in components.items() if v is not None)}."
        )
    per_component = {c: split_layers(_strip(tensors, c)) for c in configs}
    metadata = {
        "format": "pt",
        "delora_format": FORMAT_NAME,
        "delora_format_version": str(FORMAT_VERSION),
        "delora_library_version": __version__,
        "delora_adapter_name": adapter_name,
        "delora_components": _json(list(configs)),
        "delora_component_classes": _json(classes),
        "delora_configs": _json(configs),
        "delora_w_norm_fingerprint": _json({c: w_norm_fingerprint(per_component[c]) for c in configs}),
        "delora_conv_shapes": _json(conv_shapes),
        "delora_checksum": tensor_checksum(tensors),
    }
    if base_model is not None:
        metadata["delora_base_model"] = str(base_model)
    if pipeline_class is not None:
        metadata["delora_pipeline_class"] = pipeline_class
    if training_args is not None:
        metadata["delora_training_args"] = _json(training_args)
    return write_safetensors_atomic(path, tensors, metadata)


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict
) -> Path:
    """safetensors' save_file into a temp file in the same directory, then os.replace onto `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _strip(tensors: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    prefix = component + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --- reading ---------------------------------------------------------------------------------------------------
def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data: (tensor entries, metadata).

    Catches truncated and corrupted files with a message that says so (safetensors' own errors are terse).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Adapter file {str(path)!r} does not exist; check the path.")
    if not path.is_file():
        raise DeLoRAFileError(f"{str(path)!r} is not a file.")
    size = path.stat().st_size
    fix = "re-download or re-save the adapter"
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise DeLoRAFileError(
                f"{str(path)!r} is truncated ({size} bytes): too short to be a safetensors file; {fix}."
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise DeLoRAFileError(
                f"{str(path)!r} is truncated or not a safetensors file: its header claims {header_len} bytes "
                f"but the file has {size}; {fix}."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise DeLoRAFileError(
            f"{str(path)!r} is corrupted or not a safetensors file (unreadable header: {err}); {fix}."
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    needed = 0
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            count = math.prod(entry["shape"]) * _DTYPE_SIZES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise DeLoRAFileError(
                f"{str(path)!r} is corrupted: bad header entry for {key!r}; {fix}."
            ) from None
        if end - start != count:
            raise DeLoRAFileError(
                f"{str(path)!r} is corrupted: tensor {key!r} has inconsistent offsets; {fix}."
            )
        needed = max(needed, end)
    if needed > data_size:
        raise DeLoRAFileError(
            f"{str(path)!r} is truncated: it should hold {needed} bytes of tensor data but has {data_size} "
            f"(an interrupted download or copy?); {fix}."
        )
    return header, metadata


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise DeLoRAFileError(
            f"{str(path)!r} is corrupted ({err}); re-download or re-save the adapter."
        ) from None


def _parse_json(metadata: dict[str, str], key: str, path: str, default: Any = None) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except ValueError:
        raise DeLoRAFileError(
            f"{path!r} has corrupted metadata {key!r} (not JSON); re-save the adapter."
        ) from None


def parse_metadata(metadata: dict[str, str], path: str) -> dict[str, Any]:
    """Check the format name and version, and turn the string metadata into Python values."""
    if metadata.get("delora_format") != FORMAT_NAME:
        raise DeLoRAFileError(
            f"{path!r} is not a delora-diffusion adapter file (no 'delora_format' metadata). "
            "A PEFT DeLoRA adapter is loaded from its directory (adapter_config.json + adapter_model.safetensors); "
            "a LoRA file is loaded with diffusers' pipe.load_lora_weights."
        )
    raw_version = metadata.get("delora_format_version", "")
    try:
        version = int(raw_version)
    except ValueError:
        raise DeLoRAFileError(
            f"{path!r} has an unreadable format version {raw_version!r}; re-save it."
        ) from None
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise DeLoRAFileError(
            f"{path!r} uses adapter format version {version}, but this delora-diffusion reads version "
            f"{FORMAT_VERSION} only. "
            + ("Upgrade delora-diffusion (pip install -U delora-diffusion)." if newer else "Re-save it.")
        )
    parsed = {
        "format": FORMAT_NAME,
        "format_version": version,
        "library_version": metadata.get("delora_library_version"),
        "adapter_name": metadata.get("delora_adapter_name", "default"),
        "components": _parse_json(metadata, "delora_components", path, []),
        "component_classes": _parse_json(metadata, "delora_component_classes", path, {}),
        "configs": _parse_json(metadata, "delora_configs", path, {}),
        "w_norm_fingerprint": _parse_json(metadata, "delora_w_norm_fingerprint", path, {}),
        "base_model": metadata.get("delora_base_model"),
        "pipeline_class": metadata.get("delora_pipeline_class"),
        "training_args": _parse_json(metadata, "delora_training_args", path),
        "conv_shapes": _parse_json(metadata, "delora_conv_shapes", path, {}),
        "checksum": metadata.get("delora_checksum"),
    }
    for component in parsed["components"]:
        if component not in parsed["configs"]:
            raise DeLoRAFileError(f"{path!r} has no DeLoRAConfig for component {component!r}; re-save it.")
        try:
            DeLoRAConfig.from_dict(parsed["configs"][component])
        except (TypeError, ValueError) as err:
            raise DeLoRAFileError(f"{path!r} has an invalid DeLoRAConfig for {component!r}: {err}") from None
    return parsed


def read_delora_file(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and fully validate one adapter file: (tensors per component, parsed metadata).

    Raises :class:`DeLoRAFileError` for truncated or corrupted files, unknown format versions, missing or
    unknown keys, inconsistent shapes and non-finite values (FileNotFoundError for a missing path).
    """
    path = Path(path)
    _, raw_metadata = read_safetensors_header(path)
    metadata = parse_metadata(raw_metadata, str(path))
    tensors = _load_tensors(path)
    if metadata["checksum"] and tensor_checksum(tensors) != metadata["checksum"]:
        raise DeLoRAFileError(
            f"{str(path)!r} is corrupted: its tensors do not match the checksum recorded when it was written "
            "(a damaged download or disk?); re-download or re-save the adapter."
        )
    per_component: dict[str, dict[str, torch.Tensor]] = {c: {} for c in metadata["components"]}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in per_component or not rest:
            raise DeLoRAFileError(
                f"{str(path)!r} has the unknown key {key!r}: keys must start with one of the file's components "
                f"{metadata['components']}. Re-save the adapter with save_delora_weights."
            )
        per_component[component][rest] = tensor
    for component, comp_tensors in per_component.items():
        config = DeLoRAConfig.from_dict(metadata["configs"][component])
        validate_tensors(comp_tensors, component, paper_init=config.init == "paper", source=str(path))
    return per_component, metadata


def validate_tensors(
    tensors: Mapping[str, torch.Tensor],
    component: str,
    paper_init: bool | None = None,
    source: str = "adapter",
) -> dict[str, dict[str, torch.Tensor]]:
    """Check one component's tensors on their own: complete layers, no unknown names, consistent shapes,
    finite values. Returns them split by layer."""
    layers = split_layers(tensors)
    if not layers:
        raise DeLoRAFileError(f"{source!r} has no tensors for component {component!r}.")
    for layer, named in layers.items():
        where = f"{component}.{layer}" if layer else component
        unknown = sorted(set(named) - set(TENSOR_NAMES))
        if unknown or not layer:
            names = [f"{where}.{n}" for n in unknown] or [where]
            raise DeLoRAFileError(
                f"{source!r} has unknown keys {names}; a DeLoRA layer holds only {list(TENSOR_NAMES)}. "
                "Was it written by another tool? Re-save it with save_delora_weights."
            )
        has_pair = paper_init if paper_init is not None else any(n in named for n in FROZEN_PAIR)
        required = REQUIRED + (FROZEN_PAIR if has_pair else ())
        missing = [f"{where}.{n}" for n in required if n not in named]
        if missing:
            raise DeLoRAFileError(
                f"{source!r} is missing keys {missing}; the adapter is incomplete. Re-save it."
            )
        if not has_pair and any(n in named for n in FROZEN_PAIR):
            raise DeLoRAFileError(
                f"{source!r} has unknown keys {[f'{where}.{n}' for n in FROZEN_PAIR if n in named]}: the config "
                "says init='zero', which has no frozen pair. Re-save the adapter."
            )
        A, B, lam, w = (named[n] for n in REQUIRED)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise DeLoRAFileError(
                f"{source!r}: layer {where!r} has delora_A of shape {tuple(A.shape)} and delora_B of shape "
                f"{tuple(B.shape)}; expected (r, in) and (out, r) with the same r. The file is damaged."
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
            if not tensor.is_floating_point():
                raise DeLoRAFileError(
                    f"{source!r}: {where}.{name} has dtype {tensor.dtype}; expected floats."
                )
            if not torch.isfinite(tensor).all():
                raise DeLoRAFileError(
                    f"{source!r}: {where}.{name} has non-finite values (NaN or inf); the adapter is broken "
                    "(a diverged training run?). Use an earlier checkpoint."
                )
        del lam, w
    return layers


# --- inferring configs and reading PEFT adapters -----------------------------------------------------------------
def infer_config(layers: Mapping[str, Mapping[str, torch.Tensor]], base: dict | None = None) -> DeLoRAConfig:
    """A DeLoRAConfig that re-creates exactly these layers (ranks from shapes, init from the frozen pair)."""
    ranks = {name: named["delora_A"].shape[0] for name, named in layers.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    rank = max(counts, key=lambda r: (counts[r], -r))
    paper = any("delora_A0" in named for named in layers.values())
    lambdas = [float(named["delora_lambda"].reshape(-1)[0]) for named in layers.values()]
    data = dict(base or {})
    data.update(
        rank=rank,
        init="paper" if paper else "zero",
        target_modules=sorted(layers),
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
    )
    data.setdefault("lambda_init", lambdas[0] if lambdas else 15.0)
    return DeLoRAConfig.from_dict(data)


def _peft_to_layers(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """PEFT keys ``base_model.model.<layer>.delora_X`` -> ``<layer>.delora_X`` (zero init: no frozen pair)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise DeLoRAFileError(
                f"{source!r} has the key {key!r}, which is not a PEFT DeLoRA key ({PEFT_PREFIX}<layer>.delora_*)."
            )
        rest = key[len(PEFT_PREFIX) :]
        layer, _, name = rest.rpartition(".")
        if name in ("delora_lambda",) and tensor.ndim == 0:
            tensor = tensor.reshape(1)
        out[f"{canonical_layer_name(layer)}.{name}"] = tensor
    return out


def read_peft_adapter(path: str | os.PathLike, component: str | None = None) -> AdapterData:
    """Read a PEFT DeLoRA adapter directory (or its safetensors file) into our representation.

    PEFT's DeLoRA is our ``init="zero"`` formula, so the tensors carry over unchanged. The component is taken
    from `component` when given; otherwise it is left as ``""`` for the pipeline loader to route by the
    recorded base-model class.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / PEFT_WEIGHT_NAME
    config_path = directory / PEFT_CONFIG_NAME
    if path.is_dir() and not weights.exists():
        raise DeLoRAFileError(
            f"{str(directory)!r} has {PEFT_CONFIG_NAME} but no {PEFT_WEIGHT_NAME}; PEFT adapters are loaded from "
            "safetensors only (never pickles). Re-save it with save_pretrained(safe_serialization=True)."
        )
    peft_config: dict[str, Any] = {}
    if config_path.exists():
        try:
            peft_config = json.loads(config_path.read_text())
        except ValueError:
            raise DeLoRAFileError(
                f"{str(config_path)!r} is not valid JSON; re-save the PEFT adapter."
            ) from None
        peft_type = str(peft_config.get("peft_type", "")).upper()
        if peft_type != "DELORA":
            raise DeLoRAFileError(
                f"{str(directory)!r} is a PEFT {peft_type or 'unknown'} adapter, not DeLoRA. "
                + ("Load LoRA adapters with pipe.load_lora_weights." if peft_type == "LORA" else "")
            )
    read_safetensors_header(weights)
    tensors = _peft_to_layers(_load_tensors(weights), str(weights))
    layers = validate_tensors(tensors, component or "peft", paper_init=False, source=str(weights))
    base = {
        "lambda_init": float(peft_config.get("delora_lambda", 15.0)),
        "module_dropout": float(peft_config.get("module_dropout", 0.0)),
    }
    config = infer_config(layers, base)
    auto = peft_config.get("auto_mapping") or {}
    comp = component or ""
    metadata = {
        "format": "peft",
        "format_version": None,
        "adapter_name": "default",
        "components": [comp],
        "component_classes": {comp: auto["base_model_class"]} if auto.get("base_model_class") else {},
        "configs": {comp: config.to_dict()},
        "w_norm_fingerprint": {comp: w_norm_fingerprint(layers)},
        "base_model": peft_config.get("base_model_name_or_path"),
        "pipeline_class": None,
        "training_args": None,
        "peft_config": peft_config,
    }
    return AdapterData({comp: tensors}, metadata, str(path), kind="peft")


def from_state_dict(state_dict: Mapping[str, torch.Tensor], component: str | None = None) -> AdapterData:
    """A state dict in our key layout (``unet.<layer>.delora_A`` ...), or PEFT's with `component` given."""
    if not state_dict:
        raise DeLoRAFileError("The state dict is empty; there is no adapter in it.")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DeLoRAFileError(f"A DeLoRA state dict maps string keys to tensors; got bad entries {bad[:3]}.")
    if all(k.startswith(PEFT_PREFIX) for k in state_dict):
        per_component = {component or "": _peft_to_layers(state_dict, "state dict")}
    else:
        per_component = {}
        for key, tensor in state_dict.items():
            comp, _, rest = key.partition(".")
            if comp not in COMPONENTS:
                raise DeLoRAFileError(
                    f"State dict key {key!r} does not start with a component name; expected one of {COMPONENTS} "
                    "(e.g. 'unet.down_blocks.1...to_q.delora_A')."
                )
            per_component.setdefault(comp, {})[rest] = tensor
    configs, fingerprints = {}, {}
    for comp, tensors in per_component.items():
        layers = validate_tensors(tensors, comp or "state_dict", source="state dict")
        configs[comp] = infer_config(layers).to_dict()
        fingerprints[comp] = w_norm_fingerprint(layers)
    metadata = {
        "format": "state_dict",
        "format_version": None,
        "adapter_name": "default",
        "components": list(per_component),
        "component_classes": {},
        "configs": configs,
        "w_norm_fingerprint": fingerprints,
        "base_model": None,
        "pipeline_class": None,
        "training_args": None,
    }
    return AdapterData(per_component, metadata, "state dict", kind="state_dict")


# --- resolving a source --------------------------------------------------------------------------------------
def _is_peft_file(path: Path) -> bool:
    try:
        header, metadata = read_safetensors_header(path)
    except DeLoRAFileError:
        return False
    return "delora_format" not in metadata and any(
        k.startswith(PEFT_PREFIX) and ".delora_" in k for k in header
    )


def _looks_like_lora(path: Path) -> bool:
    try:
        header, _ = read_safetensors_header(path)
    except DeLoRAFileError:
        return False
    return any(("lora_A" in k or "lora_down" in k or "lora_up" in k) and ".delora_" not in k for k in header)


def load_adapter(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | AdapterData,
    weight_name: str | None = None,
    subfolder: str | None = None,
    component: str | None = None,
    **hub_kwargs: Any,
) -> AdapterData:
    """Resolve any adapter source into validated :class:`AdapterData`.

    Accepted: a state dict; a ``.safetensors`` file; a directory holding ``delora_weights.safetensors`` (or
    `weight_name`) or a PEFT DeLoRA adapter; a hub repo id, fetched with huggingface_hub (its cache and
    ``HF_HUB_OFFLINE`` are honoured; `hub_kwargs` such as revision, cache_dir, token go to it).
    """
    unknown = sorted(set(hub_kwargs) - HUB_KWARGS)
    if unknown:
        raise TypeError(f"Unknown arguments {unknown}; the hub download takes {sorted(HUB_KWARGS)}.")
    if isinstance(source, AdapterData):
        return source
    if isinstance(source, Mapping):
        return from_state_dict(source, component)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"An adapter source is a path, a hub repo id or a state dict; got {type(source).__name__}."
        )
    path = Path(source)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return _load_from_directory(path, weight_name, component)
    if path.is_file():
        return _load_from_file(path, component)
    if (
        path.suffix in (".safetensors", ".json")
        or str(source).startswith(("/", ".", "~"))
        or os.path.isabs(source)
    ):
        raise FileNotFoundError(f"Adapter path {str(path)!r} does not exist; check the path.")
    return _load_from_hub(str(source), weight_name, subfolder, component, **hub_kwargs)


def _load_from_file(path: Path, component: str | None) -> AdapterData:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise DeLoRAFileError(
            f"{str(path)!r} is a pickle-based file; delora-diffusion reads safetensors only (pickles can run "
            "code). Convert it to .safetensors first."
        )
    if path.name == PEFT_WEIGHT_NAME or _is_peft_file(path):
        return read_peft_adapter(path, component)
    try:
        tensors, metadata = read_delora_file(path)
    except DeLoRAFileError as err:
        if "not a delora-diffusion adapter" in str(err) and _looks_like_lora(path):
            raise DeLoRAFileError(
                f"{str(path)!r} is a LoRA file, not a DeLoRA adapter; load it with diffusers' pipe.load_lora_weights."
            ) from None
        raise
    return AdapterData(tensors, metadata, str(path), kind="delora")


def _load_from_directory(path: Path, weight_name: str | None, component: str | None) -> AdapterData:
    if weight_name:
        target = path / weight_name
        if not target.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no file {weight_name!r}; check weight_name.")
        return _load_from_file(target, component)
    if (path / WEIGHT_NAME).is_file():
        return _load_from_file(path / WEIGHT_NAME, component)
    if (path / PEFT_CONFIG_NAME).is_file():
        return read_peft_adapter(path, component)
    candidates = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" It has {candidates}: pass weight_name=... to pick one." if candidates else ""
    raise FileNotFoundError(
        f"{str(path)!r} holds no DeLoRA adapter: expected {WEIGHT_NAME} (ours) or {PEFT_CONFIG_NAME} + "
        f"{PEFT_WEIGHT_NAME} (PEFT).{hint}"
    )


def _load_from_hub(
    repo_id: str, weight_name: str | None, subfolder: str | None, component: str | None, **hub_kwargs: Any
) -> AdapterData:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing file or directory nor a hub repo id (org/name); check the path."
        )

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None, **hub_kwargs))

    attempts = [[weight_name or WEIGHT_NAME]] + (
        [] if weight_name else [[PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME]]
    )
    errors = []
    for files in attempts:
        try:
            paths = [fetch(name) for name in files]
        except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
            errors.append(f"{'+'.join(files)}: {type(err).__name__}")
            continue
        if len(paths) == 1:
            return _load_from_file(paths[0], component)
        return read_peft_adapter(paths[0].parent, component)
    raise FileNotFoundError(
        f"Could not get a DeLoRA adapter from {repo_id!r}: it is not a local path, and the hub (or its cache, "
        f"when HF_HUB_OFFLINE=1) gave none ({'; '.join(errors)}). Check the path or repo id, or download it "
        "while online."
    )


# --- reports from tensors alone --------------------------------------------------------------------------------
def layer_report(data: AdapterData, scale: float = 1.0) -> list[dict[str, Any]]:
    """Per layer, from the file alone: rank, lambda, the bound and the actual |dW|/|W| at `scale`.

    |W|_F is known without the base model: it is the norm of the column norms ``w`` stored in the adapter.
    """
    from . import functional

    rows = []
    for component, tensors in data.tensors.items():
        config = data.config(component)
        for layer, named in sorted(split_layers(tensors).items()):
            A, B, lam, w = (named[n].float() for n in REQUIRED)
            A0, B0 = (named[n].float() if n in named else None for n in FROZEN_PAIR)
            rank = A.shape[0]
            delta = functional.delta_weight(A, B, lam, w, rank, scale, A0, B0)
            weight_norm = max(w.norm().item(), 1e-12)
            bound = functional.norm_bound(lam * scale, w, A0 is not None).item()
            rows.append(
                {
                    "component": component,
                    "layer": layer,
                    "rank": rank,
                    "init": config.init,
                    "lambda": lam.item(),
                    "bound": bound,
                    "delta_norm": delta.norm().item(),
                    "relative_delta": delta.norm().item() / weight_norm,
                    "relative_bound": bound / weight_norm,
                }
            )
    return rows
