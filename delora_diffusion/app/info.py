"""The info panel's data and text: a per-layer report cached per adapter load, shown at any weight and scale.

Why a cache works: ΔW is linear in the effective λ (trained λ × weight × scale), so every norm in the report,
the actual ‖ΔW‖ and its bound alike, is the value at effective scale 1 times |weight × scale|. The report is
computed once, when an adapter is loaded, and a slider move only multiplies numbers.

Metadata comes from files other people wrote, so every value is shown as inert text, and values that are
absolute local paths are shown by their last component: the panel shows what a user would share.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

NORM_KEYS = ("delta_norm", "bound", "relative_delta", "relative_bound")
"""The report columns that scale with |effective scale| (see :func:`delora_diffusion.functional.norm_stats`)."""

_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class AdapterInfo:
    """What the panel needs about one loaded adapter: its report at effective scale 1, and its metadata."""

    rows: tuple[dict[str, Any], ...]
    metadata: dict[str, Any]


def unit_rows(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """``delora_report`` rows brought to effective scale 1 (each row records the scale it was taken at)."""
    out = []
    for row in rows:
        scale = abs(float(row.get("scale", 1.0)))
        if scale == 0.0:
            raise ValueError("a report taken at scale 0 cannot be rescaled; take it right after loading")
        out.append({**row, **{k: float(row[k]) / scale for k in NORM_KEYS if k in row}, "scale": 1.0})
    return tuple(out)


def scaled_rows(info: AdapterInfo, effective_scale: float) -> list[dict[str, Any]]:
    """The cached rows as they are at `effective_scale` (weight × scale): norms times its magnitude."""
    factor = abs(effective_scale)
    return [
        {**r, **{k: r[k] * factor for k in NORM_KEYS if k in r}, "scale": effective_scale} for r in info.rows
    ]


def _is_local_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith("~") or bool(_WINDOWS_ABSOLUTE.match(text))


def shareable(value: Any) -> Any:
    """`value` with absolute local paths replaced by their last component (in lists and dicts too).

    A hub id ('org/name') and relative names stay as they are: they say nothing about the machine.
    """
    if isinstance(value, str):
        if _is_local_path(value):
            name = re.split(r"[\\/]", value.rstrip("\\/"))[-1]
            return name or "(a local path)"
        return value
    if isinstance(value, dict):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shareable(v) for v in value]
    return value


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"min {min(values):.4g} · mean {sum(values) / len(values):.4g} · max {max(values):.4g}"


def _plain(value: Any, limit: int = 200) -> str:
    """A metadata value as one line of inert text (it comes from a file, so it must not become markup)."""
    value = shareable(value)
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("`", "'").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _layer_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The eight layers that move most, largest first."""
    top = sorted(rows, key=lambda r: -float(r.get("relative_delta", 0.0)))[:8]
    if not top:
        return []
    lines = ["", "| layer | rank | ρ | λ | bound ‖ΔW‖/‖W‖ | actual ‖ΔW‖/‖W‖ |", "|---|---|---|---|---|---|"]
    for r in top:
        layer = _plain(r.get("layer", "?"), 80).replace("|", "/")
        if r.get("component"):
            layer = f"{_plain(r['component'], 30)}.{layer}"
        lines.append(
            f"| {layer} | {r.get('rank', '?')} | {_rho(r.get('rho'))} | {float(r.get('lambda', math.nan)):.4g} | "
            f"{float(r.get('relative_bound', math.nan)):.4g} | {float(r.get('relative_delta', math.nan)):.4g} |"
        )
    return lines


def _rho(value: Any) -> str:
    return "–" if value is None else f"{float(value):g}"


def _rho_line(rows: Sequence[dict[str, Any]]) -> str:
    """The relative bound as trained (|ΔW| <= ρ |W| on every layer at λ scale 1), or that there is none."""
    rhos = sorted({float(r["rho"]) for r in rows if r.get("rho") is not None})
    if not rhos:
        return "- relative bound ρ: none (absolute λ)"
    shown = ", ".join(f"{v:g}" for v in rhos)
    return f"- relative bound ρ (‖ΔW‖ ≤ ρ‖W‖ per layer at λ scale 1): {shown}"


def _training_args(metadata: dict[str, Any]) -> list[str]:
    args = metadata.get("training_args")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if isinstance(args, dict) and args:
        lines = ["", "Training arguments:", "```"]
        lines += [f"{_plain(k, 60)}: {_plain(v)}" for k, v in sorted(args.items(), key=lambda kv: str(kv[0]))]
        return [*lines, "```"]
    if args:
        return ["", f"Training arguments: `{_plain(args, 1000)}`"]
    return ["", "No training arguments in the metadata (not written by the training script)."]


def format_adapter_info(
    choice: str, weight: float, scale: float, rows: Sequence[dict[str, Any]], metadata: dict[str, Any] | None
) -> str:
    """One adapter's section of the info panel, from ``delora_report`` rows and ``get_delora_metadata``."""
    metadata = metadata if isinstance(metadata, dict) else {}
    ranks = sorted({int(r["rank"]) for r in rows if "rank" in r})
    lambdas = [float(r["lambda"]) for r in rows if "lambda" in r]
    relative = [float(r["relative_delta"]) for r in rows if "relative_delta" in r]
    bounds = [float(r["relative_bound"]) for r in rows if "relative_bound" in r]
    lines = [
        f"### {_plain(choice)}",
        f"- weight {weight:g}, λ scale {scale:g} ({len(rows)} layers)",
        f"- rank: {', '.join(map(str, ranks)) or 'n/a'}",
        _rho_line(rows),
        f"- λ per layer (as trained): {_stats(lambdas)}",
        f"- bound on ‖ΔW‖/‖W‖ now: {_stats(bounds)}",
        f"- actual ‖ΔW‖/‖W‖ now: {_stats(relative)}",
        *_layer_table(rows),
    ]
    for key in ("base_model", "format_version"):
        if key in metadata:
            lines.append(f"\n{key}: `{_plain(metadata[key])}`")
    lines += _training_args(metadata)
    return "\n".join(lines)
