"""The safetensors container: a strict header check, tensor loading, atomic writes. No DeLoRA meaning here.

safetensors' own parser trusts the header's JSON types; a crafted header (string offsets, a list as metadata,
float8 tensors) then surfaces as TypeError or NotImplementedError deep inside the caller. Everything here turns
such a file into a :class:`DeLoRAFileError` that says what is wrong, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..util import atomic_write

_MAX_HEADER = 100 * 1024 * 1024
_MAX_NDIM = 8
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_DTYPE_SIZES.update({"BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8})
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_FIX = "re-download or re-save the adapter"


class DeLoRAFileError(ValueError):
    """A bad adapter file or source. The message names the problem and how to fix it."""


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict
) -> Path:
    """safetensors' save_file through :func:`delora_diffusion.util.atomic_write`: never a half-written file."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


# --- reading ---------------------------------------------------------------------------------------------------
def is_json_int(value: Any) -> bool:
    """A JSON integer (bools are ints to Python, not to a header)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(key: str, entry: Any, where: str) -> tuple[int, int]:
    """One tensor entry of a header: its (start, end) data offsets once dtype, shape and offsets agree."""
    bad = f"{where} is corrupted: bad header entry for {key!r}"
    if not isinstance(entry, dict):
        raise DeLoRAFileError(f"{bad} (not an object); {_FIX}.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise DeLoRAFileError(f"{bad} (unknown dtype {dtype!r}); {_FIX}.")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(is_json_int(d) and d >= 0 for d in shape)
    ):
        raise DeLoRAFileError(f"{bad} (shape {shape!r} is not a list of sizes); {_FIX}.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_json_int(o) for o in offsets)):
        raise DeLoRAFileError(f"{bad} (data_offsets {offsets!r} are not two integers); {_FIX}.")
    start, end = offsets
    if not 0 <= start <= end or end - start != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise DeLoRAFileError(f"{where} is corrupted: tensor {key!r} has inconsistent offsets; {_FIX}.")
    return start, end


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data: (tensor entries, metadata).

    Catches truncated, corrupted and malformed files (wrong JSON types anywhere) with a message that says so;
    safetensors' own errors are terse.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Adapter file {str(path)!r} does not exist; check the path.")
    if not path.is_file():
        raise DeLoRAFileError(f"{str(path)!r} is not a file.")
    where = repr(str(path))
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise DeLoRAFileError(
                f"{where} is truncated ({size} bytes): too short to be a safetensors file; {_FIX}."
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise DeLoRAFileError(
                f"{where} is truncated or not a safetensors file: its header claims {header_len} bytes "
                f"but the file has {size}; {_FIX}."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DeLoRAFileError(
            f"{where} is corrupted or not a safetensors file (unreadable header: {err}); {_FIX}."
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DeLoRAFileError(f"{where} is corrupted: its __metadata__ is not a map of strings; {_FIX}.")
    needed = max((_check_entry(key, entry, where)[1] for key, entry in header.items()), default=0)
    data_size = size - 8 - header_len
    if needed > data_size:
        raise DeLoRAFileError(
            f"{where} is truncated: it should hold {needed} bytes of tensor data but has {data_size} "
            f"(an interrupted download or copy?); {_FIX}."
        )
    return header, metadata


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file whose header passed :func:`read_safetensors_header`; floats only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header, _ = read_safetensors_header(path)
    for key, entry in header.items():
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise DeLoRAFileError(
                f"{str(path)!r}: tensor {key!r} has dtype {entry['dtype']}; DeLoRA adapters hold float32, "
                "float16 or bfloat16 tensors. The file is damaged or not an adapter."
            )
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError, RuntimeError) as err:
        raise DeLoRAFileError(f"{str(path)!r} is corrupted ({err}); {_FIX}.") from None
