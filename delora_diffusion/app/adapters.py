"""What the adapters dir offers: a listing of usable adapters, and of unreadable entries with the reason.

One bad entry (a corrupt header, a symlink loop, a file or folder the app may not read) must never break the
listing: every entry is looked at on its own, and whatever goes wrong with it becomes a line in
``AdapterListing.unreadable`` instead of an exception. Only headers are read here, never tensor data.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io import FORMAT_NAME, WEIGHT_NAME, read_safetensors_header
from .lora import DELORA, LORA, has_lora_keys, summarize_header

MAX_DEPTH = 2
"""The adapters dir plus one or two levels of sub-directories (a run, and its checkpoints)."""


@dataclass
class AdapterListing:
    """Usable adapter names (relative to the adapters dir; '.' is the dir itself), each one's kind ('delora' or
    'lora', see :mod:`.lora`), and unreadable entries."""

    found: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)


def adapter_key(choice: str) -> str:
    """A stable adapter_name for a choice: readable, unique, and free of the '.' adapter names forbid."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", choice).strip("_")[:40] or "adapter"
    return f"{slug}_{hashlib.sha1(choice.encode()).hexdigest()[:6]}"


def scrub_paths(text: str, replacements: dict[Path, str]) -> str:
    """`text` with each absolute path in `replacements` shown by its short name (messages reach the browser)."""
    for path, shown in sorted(replacements.items(), key=lambda kv: -len(str(kv[0]))):
        text = text.replace(str(path), shown)
    return text


def _reason(err: BaseException) -> str:
    """A short reason for an unreadable entry, without the entry's absolute path."""
    if isinstance(err, RuntimeError) and "loop" in str(err).lower():
        return "symlink loop"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, ValueError):  # the library's file errors: their message says what is wrong
        return str(err)
    return f"{type(err).__name__}: {err}"


def _adapter_kind(path: Path) -> str | None:
    """'delora' for one of ours, 'lora' for a plain LoRA file, None for other weights; raises for a file that
    cannot be read or parsed, or a LoRA-looking one with keys diffusers would not load.

    Other weights that live in the adapters dir (a checkpoint's optimizer or model state) are valid
    safetensors files with neither our format mark nor LoRA keys: they are skipped, not reported. Only the
    header is read.
    """
    header, metadata = read_safetensors_header(path)
    if not isinstance(metadata, dict):
        raise ValueError(f"its header's __metadata__ is a {type(metadata).__name__}, not a JSON object")
    if path.name == WEIGHT_NAME or metadata.get("delora_format") == FORMAT_NAME:
        return DELORA
    if has_lora_keys(header):
        summarize_header(header, metadata, "this LoRA file")
        return LORA
    return None


def _visit(root: Path, entry: Path, depth: int, listing: AdapterListing) -> None:
    """Classify one entry (recursing into folders); any error is recorded for this entry alone."""
    if entry.name.startswith("."):
        return
    if entry.is_symlink() and not entry.exists():
        entry.resolve()  # raises for a loop; otherwise the link is dangling
        raise FileNotFoundError(2, "broken symlink")
    if not entry.resolve().is_relative_to(root):
        return  # a symlink leaving the adapters dir: never offered
    if entry.is_dir():
        if depth < MAX_DEPTH:
            _scan(root, entry, depth + 1, listing)
        return
    kind = _adapter_kind(entry) if entry.is_file() and entry.suffix == ".safetensors" else None
    if kind:
        rel = entry.relative_to(root)
        name = rel.parent.as_posix() if entry.name == WEIGHT_NAME else rel.as_posix()
        listing.found.append(name)
        listing.kinds[name] = kind


def _scan(root: Path, directory: Path, depth: int, listing: AdapterListing) -> None:
    try:
        entries = sorted(directory.iterdir())
    except OSError as err:
        listing.unreadable[directory.relative_to(root).as_posix()] = _reason(err)
        return
    for entry in entries:
        try:
            _visit(root, entry, depth, listing)
        except Exception as err:  # noqa: BLE001  (any failure is this entry's problem, not the listing's)
            rel = entry.relative_to(root)
            name = rel.parent if entry.name == WEIGHT_NAME else rel  # an adapter folder by its name
            listing.unreadable[name.as_posix()] = scrub_paths(_reason(err), {root: root.name})


def scan_adapters(root: Path) -> AdapterListing:
    """List the adapters under `root` (resolved): the adapters dir first ('.'), then by name.

    A directory holding ``delora_weights.safetensors`` is listed by its path relative to `root`; any other
    ``.safetensors`` file whose header marks it as a DeLoRA adapter, or whose keys are plain LoRA keys, by its
    relative file path. Hidden entries and anything whose real path leaves `root` (symlinks) are skipped.
    """
    listing = AdapterListing()
    if os.path.isdir(root):
        _scan(root, root, 0, listing)
    listing.found.sort(key=lambda n: (n != ".", n))
    return listing


def resolve_listed(root: Path, listing: AdapterListing, name: str) -> Path:
    """The path behind a listed adapter name; anything that could escape `root` is refused first."""
    from .inputs import AppError

    parts = name.split("/")
    if (
        "\x00" in name
        or "\\" in name
        or ":" in name
        or Path(name).is_absolute()
        or name.startswith("~")
        or ".." in parts
    ):
        raise AppError(
            f"Adapter {name!r} is not a name inside the adapters dir; absolute paths and '..' are refused."
        )
    if name in listing.unreadable:
        raise AppError(f"Adapter {name!r} is unreadable: {listing.unreadable[name]}.")
    if name not in listing.found:
        raise AppError(f"No adapter named {name!r} in {root.name}. Rescan, or upload a file.")
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise AppError(f"Adapter {name!r} resolves outside the adapters dir.")
    return path
