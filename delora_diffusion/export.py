"""Exports: a DeLoRA adapter as an exact plain LoRA (diffusers/PEFT or kohya keys), and as a PEFT DeLoRA adapter.

LoRA. At a fixed lambda scale, dW = B' A' with ``A' = A diag(w)`` and ``B' = (lam s / r) B Xi`` (the frozen pair
stacked in for the paper init, so the LoRA rank is 2r there): see :func:`delora_diffusion.functional.lora_factors`.
The factors are written with alpha equal to their rank (LoRA scale 1), so every LoRA consumer reproduces the
adapter exactly at that scale.

PEFT DeLoRA. ``init="zero"`` adapters are PEFT's formula already. A paper-init adapter
``(lam/r)(B Xi A - B0 Xi0 A0) diag(w)`` becomes a PEFT adapter of rank 2r with ``A = [A; A0]``,
``B = [B, -B0]`` and lambda 2*lam: each rank-1 term is normalised on its own, so this is exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import functional, io
from .util import atomic_write_text, finite_number

LORA_FORMATS = ("diffusers", "kohya")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' default LoRA file name: what ``pipe.load_lora_weights(folder)`` looks for."""

# Components diffusers' LoRA loaders (and ComfyUI/A1111) take LoRA weights for: T5 encoders are not among them.
_T5_CLASSES = ("T5EncoderModel",)
_MULTI_ENCODER = re.compile(r"^(StableDiffusionXL|StableDiffusion3|Flux|Kolors|HunyuanDiT)")


def _layers(data: io.AdapterData, component: str) -> dict[str, dict[str, torch.Tensor]]:
    return io.split_layers(data.tensors[component])


def _check_routed(data: io.AdapterData) -> None:
    if "" in data.tensors:
        raise ValueError(
            f"{data.source!r} is a PEFT adapter without a known component; pass component= (e.g. 'unet')."
        )


def _unsupported_components(data: io.AdapterData) -> list[str]:
    classes = data.metadata.get("component_classes", {})
    return [c for c in data.tensors if classes.get(c) in _T5_CLASSES]


def lora_factors_per_layer(
    data: io.AdapterData, scale: float = 1.0, skip_unsupported: bool = False
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{component: {layer: (down, up)}}`` with ``up @ down == dW`` at lambda scale `scale`.

    Conv layers get conv-shaped factors (down: r x in x kh x kw, up: out x r x 1 x 1). T5 components raise
    (no LoRA consumer loads them) unless `skip_unsupported`, which leaves them out with a warning.
    """
    _check_routed(data)
    scale = finite_number(scale, "The lambda scale")
    unsupported = _unsupported_components(data)
    if unsupported and not skip_unsupported:
        raise ValueError(
            f"{data.source!r} adapts {unsupported} (T5 encoders), which diffusers' load_lora_weights, ComfyUI "
            "and A1111 do not load as LoRA. Pass skip_unsupported=True (CLI: --skip-unsupported) to export the "
            "other components; images then differ by the T5 adapter's effect."
        )
    if unsupported:
        warnings.warn(
            f"Leaving {unsupported} out of the LoRA export (T5 LoRA is not loadable).", stacklevel=2
        )
    conv_shapes = data.metadata.get("conv_shapes") or {}
    result: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for component in data.tensors:
        if component in unsupported:
            continue
        layers = {}
        for layer, named in _layers(data, component).items():
            A = named["delora_A"]
            down, up = functional.lora_factors(
                A,
                named["delora_B"],
                named["delora_lambda"],
                named["delora_w_norm"],
                A.shape[0],
                scale,
                named.get("delora_A0"),
                named.get("delora_B0"),
            )
            shape = conv_shapes.get(component, {}).get(layer)
            if shape is not None:
                down = down.reshape(down.shape[0], *shape[1:])
                up = up[:, :, None, None]
            layers[layer] = (down.contiguous(), up.contiguous())
        result[component] = layers
    return result


def _kohya_prefix(component: str, data: io.AdapterData) -> str:
    pipeline_class = data.metadata.get("pipeline_class") or ""
    multi = bool(_MULTI_ENCODER.match(pipeline_class)) or any(
        c in data.tensors for c in ("text_encoder_2", "text_encoder_3")
    )
    return {
        "unet": "lora_unet",
        "transformer": "lora_transformer",
        "text_encoder": "lora_te1" if multi else "lora_te",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    }[component]


def to_lora_state_dict(
    data: io.AdapterData, format: str = "diffusers", scale: float = 1.0, skip_unsupported: bool = False
) -> dict[str, torch.Tensor]:
    """The adapter as a plain LoRA state dict at lambda scale `scale`.

    ``diffusers``: ``<component>.<layer>.lora_A.weight`` / ``lora_B.weight`` (PEFT names, no alphas: scale 1).
    CLIP encoder layers get ``text_model.`` in both formats: transformers 5 flattened ``CLIPTextModel`` (its
    layers are ``encoder.layers.N``), ComfyUI maps only the prefixed form, and diffusers strips it again.
    ``kohya``: ``lora_unet_<layer with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (= rank), with
    ``lora_te`` / ``lora_te1`` / ``lora_te2`` for the text encoders and ``lora_transformer`` for DiTs.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"Unknown LoRA format {format!r}; choose one of {LORA_FORMATS}.")
    classes = data.metadata.get("component_classes", {})
    out: dict[str, torch.Tensor] = {}
    for component, layers in lora_factors_per_layer(data, scale, skip_unsupported).items():
        for layer, (down, up) in layers.items():
            name = layer
            if classes.get(component, "").startswith("CLIP") and not name.startswith("text_model."):
                name = (
                    "text_model." + name
                )  # CLIP layers as in the original checkpoints: what every reader maps
            if format == "diffusers":
                out[f"{component}.{name}.lora_A.weight"] = down
                out[f"{component}.{name}.lora_B.weight"] = up
                continue
            key = f"{_kohya_prefix(component, data)}_{name.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = down
            out[f"{key}.lora_up.weight"] = up
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def export_lora(
    adapter: Any,
    out: str | os.PathLike,
    format: str = "diffusers",
    scale: float = 1.0,
    skip_unsupported: bool = False,
    component: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `adapter` (any source load_delora_weights accepts) as a LoRA ``.safetensors`` file at `out`.

    A directory `out` gets ``pytorch_lora_weights.safetensors`` (diffusers' default name) inside it. The
    write is atomic; the adapter's own file is never replaced, and an existing `out` only with `overwrite`.
    """
    data = io.load_adapter(adapter, component=component)
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / LORA_WEIGHT_NAME
    _refuse_input(out, data.source)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it."
        )
    state = to_lora_state_dict(data, format, scale, skip_unsupported)
    return io.write_safetensors_atomic(out, state, lora_metadata(data, format, scale))


def lora_metadata(data: io.AdapterData, format: str = "diffusers", scale: float = 1.0) -> dict[str, str]:
    """The metadata of a LoRA export: where it came from (file/folder name or hub id, no local paths) and at
    which ``delora_scale``; kohya files also name their network module, as kohya's own do."""
    metadata = {
        "format": "pt",
        "delora_exported_from": io.shareable_model_name(data.source) or "",
        "delora_scale": repr(float(scale)),
        "delora_base_model": io.shareable_model_name(data.metadata.get("base_model")) or "",
    }
    if format == "kohya":
        metadata["ss_network_module"] = "networks.lora"
    return metadata


def _refuse_input(out: Path, source: str) -> None:
    """An export never replaces the adapter it reads (``export-lora x.safetensors x.safetensors``)."""
    src = Path(source)
    if not src.exists() or not out.exists():
        return
    inputs = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
    if any(out.samefile(p) for p in inputs):
        raise ValueError(
            f"Refusing to write the export over its input {str(out)!r}; choose another output path."
        )


def to_peft(data: io.AdapterData, component: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One component as a PEFT DeLoRA adapter: (adapter_config.json contents, adapter_model tensors)."""
    conv = (data.metadata.get("conv_shapes") or {}).get(component)
    if conv:
        raise ValueError(
            f"PEFT's DeLoRA supports nn.Linear only, but {component} has adapted Conv2d layers "
            f"({sorted(conv)[:3]}...). Export it as a LoRA instead, or train without conv targets."
        )
    config = data.config(component)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for layer, named in _layers(data, component).items():
        A, B, lam = named["delora_A"].float(), named["delora_B"].float(), named["delora_lambda"].float()
        if "delora_A0" in named:
            A = torch.cat([A, named["delora_A0"].float()], dim=0)
            B = torch.cat([B, -named["delora_B0"].float()], dim=1)
            lam = 2 * lam
        prefix = f"{io.PEFT_PREFIX}{layer}."
        tensors[prefix + "delora_A"] = A.contiguous()
        tensors[prefix + "delora_B"] = B.contiguous()
        tensors[prefix + "delora_lambda"] = lam.reshape(1).contiguous()
        tensors[prefix + "delora_w_norm"] = named["delora_w_norm"].float().contiguous()
        ranks[layer] = A.shape[0]
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    rank = max(counts, key=lambda r: (counts[r], -r))
    factor = 2 if config.init == "paper" else 1
    model_class = data.metadata.get("component_classes", {}).get(component)
    base = io.shareable_model_name(data.metadata.get("base_model"))
    peft_config = {
        "peft_type": "DELORA",
        "task_type": None,
        "r": rank,
        "delora_lambda": config.lambda_init * factor,
        "module_dropout": config.module_dropout,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "lambda_pattern": {},
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "revision": None,
        "base_model_name_or_path": f"{base}/{component}" if base else None,  # base: as the file records it
        "auto_mapping": {"base_model_class": model_class, "parent_library": _parent_library(model_class)}
        if model_class
        else None,
    }
    return peft_config, tensors


def _parent_library(class_name: str | None) -> str | None:
    if not class_name:
        return None
    for library in ("diffusers", "transformers"):
        try:
            module = __import__(library, fromlist=[class_name])
            return getattr(module, class_name).__module__
        except (ImportError, AttributeError):
            continue
    return None


def export_peft(
    adapter: Any, out_dir: str | os.PathLike, component: str | None = None, overwrite: bool = True
) -> dict[str, Path]:
    """Write each component as a PEFT DeLoRA adapter in ``out_dir/<component>/``, never half-written.

    Everything is written into a temporary folder beside `out_dir` and then moved into place, so a failure
    leaves no partial adapter. Existing ``<component>`` folders are replaced only with `overwrite`.
    PEFT users continue with ``PeftModel.from_pretrained(pipe.unet, "out_dir/unet", is_trainable=True)``.
    """
    data = io.load_adapter(adapter, component=component)
    _check_routed(data)
    out_dir = Path(out_dir)
    existing = [c for c in data.tensors if (out_dir / c).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} already has {existing}; pass --overwrite (overwrite=True) to replace them."
        )
    exports = {comp: to_peft(data, comp) for comp in data.tensors}

    def write(tmp: Path) -> None:
        for comp, (config, tensors) in exports.items():
            target = tmp / comp
            target.mkdir()
            atomic_write_text(
                target / io.PEFT_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n"
            )
            io.write_safetensors_atomic(target / io.PEFT_WEIGHT_NAME, tensors, {"format": "pt"})

    replace_directory(out_dir, write, whole=False)
    return {comp: out_dir / comp for comp in exports}


def replace_directory(out_dir: str | os.PathLike, write: Callable[[Path], None], whole: bool) -> Path:
    """Call ``write(tmp)`` on a fresh folder beside `out_dir`, then move the result into place.

    A new `out_dir` appears at once, complete. An existing one is replaced as a whole (`whole`: nothing stale
    is kept, as for a merged pipeline) or entry by entry (only the entries `write` made, the rest kept). A
    failure in `write` leaves `out_dir` as it was and no temporary folder behind.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return out_dir
        sources = [tmp] if whole else sorted(tmp.iterdir())
        for src in sources:
            dst = out_dir if whole else out_dir / src.name
            old = tmp.parent / f"{tmp.name}.old" if whole else tmp / f".{src.name}.old"
            if dst.exists():
                os.replace(dst, old)
            os.replace(src, dst)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
