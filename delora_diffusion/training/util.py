"""Small shared pieces of the training package: user-facing errors, optional packages, atomic writes."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


class TrainingConfigError(ValueError):
    """A bad flag, path or dataset. The script prints it without a traceback; nothing has been written."""


class TrainingDiverged(RuntimeError):
    """Training stopped on repeated non-finite losses. Earlier checkpoints are left as they were."""


def require(package: str, purpose: str, pip_name: str | None = None) -> ModuleType:
    """Import an optional package, or fail with the exact ``pip install`` that fixes it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise TrainingConfigError(
            f"{purpose} needs the optional package '{pip_name or package}', which is not installed. "
            f"Install it with: pip install {pip_name or package}"
        ) from None


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to `path`, then rename it over `path`.

    A run killed at any moment leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
