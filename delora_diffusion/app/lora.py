"""Plain LoRA files beside DeLoRA adapters: what a file is (from its header), its summary, and the pipeline side.

Why this exists: users compare a DeLoRA adapter with a plain LoRA (their own, or our exact export of the same
adapter). A LoRA file is loaded by diffusers itself (``pipe.load_lora_weights`` / ``set_adapters``), never by
our loader, so the app only has to recognise one and describe it:

- The kind of a file is decided from its safetensors header alone (key names and shapes): listing the adapters
  dir never reads tensor data, and nothing is ever unpickled (only ``.safetensors`` files are looked at).
- Every key must be a LoRA key (diffusers/PEFT ``lora_A``/``lora_B``, older ``lora.down``/``lora.up``, kohya
  ``lora_down``/``lora_up``/``alpha``): a file with other keys (LoHa, DoRA, a full checkpoint) is refused with
  the key named, since diffusers would either fail late or silently drop what it does not know.
- The info panel gets kind, rank, layer count and target modules from the same header.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import DeLoRAFileError, load_tensors, read_safetensors_header

LORA = "lora"
DELORA = "delora"

# (pattern, format, part): part 'down' is the A factor (rank x in), 'up' the B factor (out x rank).
_KEY_PATTERNS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"^(?P<layer>lora_[a-z0-9]+_.+)\.lora_(?P<part>down|up)\.weight$"), "kohya", ""),
    (re.compile(r"^(?P<layer>lora_[a-z0-9]+_.+)\.alpha$"), "kohya", "alpha"),
    (re.compile(r"^(?P<layer>.+)\.lora_(?P<part>A|B)\.weight$"), "diffusers", ""),
    (re.compile(r"^(?P<layer>.+)\.alpha$"), "diffusers", "alpha"),  # older files' network alphas
    (
        re.compile(r"^(?P<layer>.+?)(?:\.lora_linear_layer|[._]lora)\.(?P<part>down|up)\.weight$"),
        "diffusers",
        "",
    ),
)
_PARTS = {"A": "down", "B": "up", "down": "down", "up": "up"}
_KOHYA_COMPONENTS = {
    "lora_unet": "unet",
    "lora_transformer": "transformer",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_FLOATS = ("F32", "F16", "BF16", "F64")
_FIX = "export a plain LoRA with `delora-diffusion export`, or save it with diffusers' save_lora_weights"
SHOWN_METADATA = ("delora_exported_from", "delora_scale", "delora_base_model", "ss_base_model_version")
"""Metadata keys the info panel shows for a LoRA file (others are often long training dumps)."""


@dataclass(frozen=True)
class LoraSummary:
    """What the info panel says about a LoRA file: its key layout, ranks, layers per component, targets."""

    format: str
    ranks: tuple[int, ...]
    layers: int
    components: tuple[tuple[str, int], ...]
    targets: tuple[str, ...]
    metadata: dict[str, str]


def has_lora_keys(header: Mapping[str, Any]) -> bool:
    """Whether a header looks like a LoRA file at all (any LoRA factor key, none of ours)."""
    return any(_match(k) is not None and not k.endswith(".alpha") for k in header) and not any(
        ".delora_" in k for k in header
    )


def _match(key: str) -> tuple[str, str, str] | None:
    """(layer, format, part) of a LoRA key, or None."""
    for pattern, fmt, part in _KEY_PATTERNS:
        found = pattern.match(key)
        if found:
            return found["layer"], fmt, part or _PARTS[found["part"]]
    return None


def _component(layer: str, fmt: str) -> tuple[str, str]:
    """(component, layer inside it): kohya prefixes, diffusers' ``unet.`` prefixes, or old unprefixed UNet keys."""
    if fmt == "kohya":
        for prefix in sorted(_KOHYA_COMPONENTS, key=len, reverse=True):
            if layer.startswith(prefix + "_"):
                return _KOHYA_COMPONENTS[prefix], layer[len(prefix) + 1 :]
        return layer.split("_", 2)[1], layer
    head, _, rest = layer.partition(".")
    return (head, rest) if head in _COMPONENTS and rest else ("unet", layer)


def _target(layer: str, fmt: str) -> str:
    """The module kind a layer is (to_q, q_proj, conv1, to_out.0, ...): what 'target modules' lists."""
    if fmt == "kohya":  # flattened names: what follows the last block index
        parts = re.split(r"_\d+_", layer)
        return parts[-1]
    parts = layer.removesuffix(".processor").split(".")
    if parts[-1].isdigit() and len(parts) > 1:
        return ".".join(parts[-2:])
    return parts[-1]


def _layers(header: Mapping[str, Any], where: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The key format and ``{layer: {'down': entry, 'up': entry, 'alpha': entry}}``; refuses unknown keys."""
    layers: dict[str, dict[str, Any]] = {}
    formats: set[str] = set()
    for key, entry in header.items():
        found = _match(key)
        if found is None:
            raise DeLoRAFileError(
                f"{where} has a key that is not a plain LoRA key: {key!r} (expected '...lora_A.weight' / "
                "'lora_B.weight', '...lora.down.weight' / 'lora.up.weight', or kohya '..._lora_down.weight' / "
                f"'lora_up.weight' / 'alpha'). LoHa, LoKr, DoRA and full checkpoints are not supported; {_FIX}."
            )
        layer, fmt, part = found
        formats.add(fmt)
        layers.setdefault(layer, {})[part] = entry
        if entry["dtype"] not in _FLOATS:
            raise DeLoRAFileError(f"{where}: tensor {key!r} has dtype {entry['dtype']}, not a float; {_FIX}.")
    layers = {layer: parts for layer, parts in layers.items() if set(parts) != {"alpha"}}  # named apart
    if len(formats) > 1:
        raise DeLoRAFileError(f"{where} mixes kohya and diffusers key names; {_FIX}.")
    if not layers:
        raise DeLoRAFileError(f"{where} holds no tensors; {_FIX}.")
    return formats.pop(), layers


def _rank(layer: str, parts: dict[str, Any], where: str) -> int:
    """A layer's rank, once its down and up factors exist and agree (2-D, or conv-shaped 4-D)."""
    if "down" not in parts or "up" not in parts:
        missing = "down (lora_A)" if "down" not in parts else "up (lora_B)"
        raise DeLoRAFileError(f"{where}: layer {layer!r} has no {missing} factor; the file is incomplete.")
    down, up = parts["down"]["shape"], parts["up"]["shape"]
    if len(down) not in (2, 4) or len(up) not in (2, 4) or down[0] != up[1] or down[0] == 0:
        raise DeLoRAFileError(
            f"{where}: layer {layer!r} has factors of shapes {down} and {up}, which do not multiply "
            f"(down is rank x in, up is out x rank); {_FIX}."
        )
    return int(down[0])


def summarize_header(header: Mapping[str, Any], metadata: Mapping[str, str], where: str) -> LoraSummary:
    """Check a LoRA header (every key a LoRA key, factors that multiply) and summarise it for the panel."""
    fmt, layers = _layers(header, where)
    ranks = {_rank(layer, parts, where) for layer, parts in layers.items()}
    counts: Counter[str] = Counter()
    targets: set[str] = set()
    for layer in layers:
        component, inner = _component(layer, fmt)
        counts[component] += 1
        targets.add(_target(inner, fmt))
    shown = {k: str(metadata[k]) for k in SHOWN_METADATA if k in metadata}
    return LoraSummary(
        fmt, tuple(sorted(ranks)), len(layers), tuple(sorted(counts.items())), tuple(sorted(targets)), shown
    )


def read_lora_summary(path: str | Path) -> LoraSummary:
    """A LoRA file's summary from its header alone (the listing and the info panel)."""
    path = Path(path)
    header, metadata = read_safetensors_header(path)
    return summarize_header(header, metadata, repr(str(path)))


def validate_lora_file(path: str | Path) -> LoraSummary:
    """An upload's full check: the header as above, then every tensor read (safetensors, no pickle) and finite."""
    import torch

    summary = read_lora_summary(path)
    for key, tensor in load_tensors(Path(path)).items():
        if not bool(torch.isfinite(tensor).all()):
            raise DeLoRAFileError(f"{str(path)!r}: tensor {key!r} holds NaN or infinite values; {_FIX}.")
    return summary


def file_kind(path: str | Path) -> str:
    """'delora' or 'lora' for an adapter file, from its header; raises a DeLoRAFileError for anything else
    (a file that is neither says what to upload instead)."""
    from ..io import FORMAT_NAME

    header, metadata = read_safetensors_header(path)
    if metadata.get("delora_format") == FORMAT_NAME:
        return DELORA
    if has_lora_keys(header):
        return LORA  # what it is; whether it is a good one is validate_lora_file's question
    keys = ", ".join(repr(k) for k in list(header)[:3]) or "none"
    raise DeLoRAFileError(
        f"{str(path)!r} is neither a DeLoRA adapter (no 'delora_format' metadata) nor a plain LoRA file (its "
        f"keys, e.g. {keys}, are not LoRA keys). Upload delora_weights.safetensors from a training run, or a "
        "LoRA .safetensors (pytorch_lora_weights.safetensors, or a kohya export)."
    )


# ---- the pipeline side (diffusers' own LoRA loader; PEFT underneath)


def load_lora(pipe: Any, path: Path, key: str) -> None:
    """``pipe.load_lora_weights(path, adapter_name=key)``; on failure whatever it added is deleted again."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} takes no LoRA files (diffusers has no LoRA loader for it)")
    try:
        pipe.load_lora_weights(str(path), adapter_name=key)
    except BaseException:
        if any(key in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(key)
        raise


def remove_loras(pipe: Any, keys: Sequence[str]) -> None:
    """Delete these LoRA adapters; with none left, unload LoRA entirely (PEFT's wrappers go too)."""
    present = {n for names in pipe.get_list_adapters().values() for n in names}
    gone = [k for k in keys if k in present]
    if gone and present <= set(gone):
        pipe.unload_lora_weights()
    elif gone:
        pipe.delete_adapters(gone)


def set_loras(pipe: Any, keys: Sequence[str], weights: Sequence[float], any_loaded: bool) -> None:
    """Make exactly `keys` the active LoRA adapters at `weights`; none chosen turns LoRA off."""
    if keys:
        pipe.enable_lora()
        pipe.set_adapters(list(keys), [float(w) for w in weights])
    elif any_loaded:
        pipe.disable_lora()


# ---- the info panel


def _plain(text: Any, limit: int = 120) -> str:
    value = str(text).replace("`", "'").replace("\n", " ").replace("|", "/")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def format_lora_info(label: str, weight: float, scale: float, summary: LoraSummary) -> str:
    """One LoRA adapter's section of the info panel: kind, weight on the pipeline, rank, layers, targets."""
    from .info import shareable

    parts = ", ".join(f"{_plain(c)} {n}" for c, n in summary.components)
    targets = ", ".join(_plain(t, 40) for t in summary.targets[:24])
    if len(summary.targets) > 24:
        targets += f", … ({len(summary.targets)} in all)"
    keys = "kohya" if summary.format == "kohya" else "diffusers/PEFT"
    lines = [
        f"### {_plain(label)}",
        f"- kind: plain LoRA ({keys} keys), loaded with diffusers' load_lora_weights",
        f"- weight {weight:g} × scale {scale:g} = LoRA weight {weight * scale:g}",
        f"- rank: {', '.join(map(str, summary.ranks))}",
        f"- layers: {summary.layers} ({parts})",
        f"- target modules: {targets}",
    ]
    for key, value in summary.metadata.items():
        lines.append(f"\n{key}: `{_plain(shareable(value))}`")
    return "\n".join(lines)
