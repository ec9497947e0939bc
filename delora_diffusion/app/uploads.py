"""Uploaded adapters: ``.safetensors`` only, size-limited, copied into the app's own dir, then validated.

Why the copy comes first: what is loaded later must be exactly what was checked, and the web server's copy is
deleted as soon as the upload is accepted or refused. A DeLoRA file is checked like ``load_delora_weights``
(:func:`delora_diffusion.io.read_delora_file`), a plain LoRA file by :func:`.lora.validate_lora_file` (every
key a LoRA key, factors that multiply, finite values); anything else is refused with what it is and what to
upload instead. No Gradio, no pipeline: an upload never touches a loaded model.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from .adapters import scrub_paths
from .inputs import AppError
from .lora import DELORA, LORA, file_kind, validate_lora_file

UPLOAD_PREFIX = "upload:"
_WHAT = {
    None: "a valid DeLoRA adapter or LoRA file",
    DELORA: "a valid DeLoRA adapter",
    LORA: "a valid LoRA file",
}


def _check_size(path: Path, shown: str, max_bytes: int) -> None:
    if path.suffix.lower() != ".safetensors" or not shown.lower().endswith(".safetensors"):
        raise AppError(f"Uploads must be .safetensors files, got {shown!r}.")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise AppError(f"Could not read the upload {shown!r}: {err.strerror}") from err
    if size > max_bytes:
        raise AppError(
            f"The upload {shown!r} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB."
        )


def accept_upload(
    path: Path, shown: str, upload_dir: Path, max_bytes: int, known: dict[str, tuple[Path, str]]
) -> tuple[str, Path, str]:
    """(name, validated copy, kind) for the file at `path`, shown to the user as `shown`.

    The name is stable for the same bytes (``upload:<stem>-<hash>``); `known` (name -> (copy, kind)) makes a
    second upload of the same bytes free. A refused copy is deleted again.
    """
    _check_size(path, shown, max_bytes)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(shown).stem)[:40] or "adapter"
    name = f"{UPLOAD_PREFIX}{stem}-{digest.hexdigest()[:8]}"
    if name in known:
        return name, *known[name]
    copy = upload_dir / f"{digest.hexdigest()[:16]}.safetensors"
    shutil.copyfile(path, copy)
    from ..io import read_delora_file

    kind = None
    try:
        kind = file_kind(copy)  # the header says which full check applies
        if kind == DELORA:
            read_delora_file(copy)
        else:
            validate_lora_file(copy)
    except Exception as err:  # noqa: BLE001  (a hostile file may raise anything; none of it is fatal)
        copy.unlink(missing_ok=True)
        text = scrub_paths(str(err), {copy: shown, path: shown})
        what = _WHAT[kind]
        raise AppError(f"The upload {shown!r} is not {what}: {text}") from err
    return name, copy, kind
