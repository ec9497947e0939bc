"""Where adapters come from: our files, PEFT DeLoRA adapters, state dicts, directories and hub repo ids.

Every source is resolved into one validated :class:`~delora_diffusion.io.format.AdapterData`. A string that
looks like a local path never goes to the hub: a typo in ``outputs/dreambooth-delora`` is reported as a missing
local path at once, not after a minute of hub timeouts.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import DeLoRAConfig
from .format import (
    COMPONENTS,
    WEIGHT_NAME,
    AdapterData,
    DeLoRAFileError,
    canonical_layer_name,
    load_tensors,
    read_delora_file,
    read_safetensors_header,
    validate_tensors,
    w_norm_fingerprint,
)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

HUB_KWARGS = {"revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "repo_type"}
"""Keyword arguments passed on to huggingface_hub's download for hub repo ids."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


# --- inferring configs and reading PEFT adapters -----------------------------------------------------------------
def most_common_rank(ranks: Mapping[str, int]) -> int:
    """The rank most layers have (the smaller one on a tie): the config's rank, the rest go to rank_pattern."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    return max(counts, key=lambda r: (counts[r], -r))


def infer_config(layers: Mapping[str, Mapping[str, torch.Tensor]], base: dict | None = None) -> DeLoRAConfig:
    """A DeLoRAConfig that describes exactly these layers (ranks from shapes, init from the frozen pair)."""
    ranks = {name: named["delora_A"].shape[0] for name, named in layers.items()}
    rank = most_common_rank(ranks)
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
        layer, _, name = key[len(PEFT_PREFIX) :].rpartition(".")
        if name == "delora_lambda" and tensor.ndim == 0:
            tensor = tensor.reshape(1)
        out[f"{canonical_layer_name(layer)}.{name}"] = tensor
    return out


def _read_peft_config(config_path: Path, directory: Path) -> dict[str, Any]:
    if not config_path.exists():
        return {}
    try:
        peft_config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DeLoRAFileError(f"{str(config_path)!r} is not valid JSON; re-save the PEFT adapter.") from None
    if not isinstance(peft_config, dict):
        raise DeLoRAFileError(f"{str(config_path)!r} is not a JSON object; re-save the PEFT adapter.")
    peft_type = str(peft_config.get("peft_type", "")).upper()
    if peft_type != "DELORA":
        raise DeLoRAFileError(
            f"{str(directory)!r} is a PEFT {peft_type or 'unknown'} adapter, not DeLoRA. "
            + ("Load LoRA adapters with pipe.load_lora_weights." if peft_type == "LORA" else "")
        )
    return peft_config


def _peft_number(peft_config: dict[str, Any], key: str, default: float, where: str) -> float:
    value = peft_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DeLoRAFileError(f"{where}: {key} is {value!r}, not a number; re-save the PEFT adapter.")
    return float(value)


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
    peft_config = _read_peft_config(config_path, directory)
    tensors = _peft_to_layers(load_tensors(weights), str(weights))
    layers = validate_tensors(tensors, component or "peft", paper_init=False, source=str(weights))
    base = {
        "lambda_init": _peft_number(peft_config, "delora_lambda", 15.0, str(config_path)),
        "module_dropout": _peft_number(peft_config, "module_dropout", 0.0, str(config_path)),
    }
    try:
        config = infer_config(layers, base)
    except (TypeError, ValueError) as err:
        raise DeLoRAFileError(f"{str(config_path)!r} has invalid settings: {err}") from None
    auto = peft_config.get("auto_mapping")
    model_class = auto.get("base_model_class") if isinstance(auto, dict) else None
    base_model = peft_config.get("base_model_name_or_path")
    comp = component or ""
    metadata = {
        "format": "peft",
        "format_version": None,
        "adapter_name": "default",
        "components": [comp],
        "component_classes": {comp: model_class} if isinstance(model_class, str) else {},
        "configs": {comp: config.to_dict()},
        "w_norm_fingerprint": {comp: w_norm_fingerprint(layers)},
        "base_model": base_model if isinstance(base_model, str) else None,
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


def looks_like_local_path(source: str) -> bool:
    """Whether a string that names nothing on disk was meant as a local path rather than a hub repo id.

    Hub ids are ``name`` or ``org/name``. A path is anything else: more than one ``/``, a leading ``.``, ``/``
    or ``~``, a backslash, a file suffix (``.safetensors``, ...), or a first part that is an existing local
    folder (``outputs/dreambooth-delra`` next to an ``outputs/`` folder is a typo, not a hub repo).
    """
    if source.count("/") > 1 or source.startswith((".", "/", "~")) or "\\" in source or os.path.isabs(source):
        return True
    if Path(source).suffix in (".safetensors", ".json", *PICKLE_SUFFIXES):
        return True
    first, slash, _ = source.partition("/")
    return bool(slash) and Path(first).is_dir()


def _missing_path_error(path: Path) -> FileNotFoundError:
    parent = path.parent
    hint = ""
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3)
        hint = f" Did you mean {' or '.join(repr(str(parent / c)) for c in close)}?" if close else ""
    return FileNotFoundError(f"Adapter path {str(path)!r} does not exist; check the path.{hint}")


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
    if not isinstance(source, str) or looks_like_local_path(source):
        raise _missing_path_error(path)
    return _load_from_hub(source, weight_name, subfolder, component, **hub_kwargs)


def _load_from_file(path: Path, component: str | None) -> AdapterData:
    if path.suffix in PICKLE_SUFFIXES:
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

    if not _HUB_ID.fullmatch(repo_id):
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
