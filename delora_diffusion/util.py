"""Small helpers every room of the package shares: dtype names, number checks, atomic writes.

Each exists once, here, so a fix (e.g. to how a killed write is cleaned up) reaches every caller.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtype names users type (configs, flags, the app), mapped to torch dtypes."""

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "no": "float32"}
"""accelerate's mixed-precision spellings of the same dtypes."""


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"`` or a torch dtype -> the torch dtype; a clear error for anything else."""
    if isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}.")
    return DTYPES[key]


def finite_number(value: Any, what: str) -> float:
    """`value` as a float, or a ValueError naming `what` when it is not a finite real number (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}.")
    return float(value)


def check_adapter_name(name: Any) -> str:
    """Adapter names become key prefixes in files and module dicts: non-empty, no dots."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"Adapter names must be non-empty strings without '.', got {name!r}.")
    return name


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to `path`, then rename it over `path`.

    A process killed at any moment leaves either the old file or the new one, never a truncated one (at
    worst a hidden ``.<name>.*.tmp`` sibling, which readers ignore).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates the file 0600; a finished file gets the mode any other new file would get.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
