"""Small shared pieces of the training package: user-facing errors, optional packages, stale temp files.

Atomic writes are :func:`delora_diffusion.util.atomic_write` (one implementation for the whole package).
"""

from __future__ import annotations

import importlib
import logging
import re
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


logger = logging.getLogger("delora_diffusion.training")

_TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")
"""The hidden ``.<name>.<random>.tmp`` siblings :func:`delora_diffusion.util.atomic_write` writes first."""


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files a killed write left in `folder` (not recursive); returns what was removed.

    Run at the start, before anything of this run writes there: only a dead process's temp files can exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _TEMP_FILE.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info(
            "Removed %d temp file(s) left by an interrupted write: %s", len(stale), [p.name for p in stale]
        )
    return stale
