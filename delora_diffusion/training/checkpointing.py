"""Checkpoints: accelerate state (optimizer, scheduler, RNG) plus only the adapter tensors, tied to their run.

Writing ``checkpoint-N`` never exposes a partial directory under that name:

1. everything is written to ``checkpoint-N.tmp``, and a manifest (:data:`MANIFEST`: run id, step, the shape
   of every adapter tensor, the size of every file) is written last;
2. an existing ``checkpoint-N`` is renamed aside to ``checkpoint-N.old``;
3. ``checkpoint-N.tmp`` is renamed to ``checkpoint-N``;
4. ``checkpoint-N.old`` is deleted.

A process killed between any two of these leaves either a complete ``checkpoint-N`` or a complete
``.tmp`` / ``.old`` that :func:`recover` (run at the start of the next run) renames back. A checkpoint is
*complete* when its manifest is there and every file it lists has the recorded size; anything else is
skipped by ``--resume_from_checkpoint latest`` with a warning.

A run has an id, written into each of its checkpoints (a resumed run keeps the id it resumed from). Pruning
(``--checkpoints_total_limit``) only ever removes checkpoints of the current run, and resuming checks the
saved adapter shapes against the adapter being trained, so a new run in a folder holding an older run's
checkpoints neither deletes its own newest one nor resumes from a checkpoint of a different adapter.

The frozen base weights are not copied: the save hook keeps only the DeLoRA tensors (under FSDP accelerate
saves the whole sharded model and optimizer with torch.distributed.checkpoint regardless; the adapter file is
written too and loaded last).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .util import TrainingConfigError

logger = logging.getLogger(__name__)

STATE_FILE = "delora_state.safetensors"
MANIFEST = "delora_checkpoint.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_ASIDE = re.compile(r"checkpoint-(\d+)\.(tmp|old|trash)")


@dataclass(frozen=True)
class RunIdentity:
    """What ties a checkpoint to its run: the run's id and the shape of every adapter tensor it trains."""

    run_id: str
    shapes: dict[str, list[int]]

    @staticmethod
    def new_run_id() -> str:
        return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and what its manifest says."""

    path: Path
    step: int
    run_id: str
    saved_at: float
    shapes: dict[str, list[int]]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def adapter_tensors(model: nn.Module) -> dict[str, Any]:
    """The DeLoRA entries of the model's state dict (trainable factors, lambda and frozen buffers)."""
    return {k: v for k, v in model.state_dict().items() if ".delora." in f".{k}"}


def adapter_shapes(components: dict[str, nn.Module]) -> dict[str, list[int]]:
    """``{"<component>.<state-dict key>": shape}`` of every adapter tensor: the adapter's fingerprint."""
    return {
        f"{name}.{key}": list(value.shape)
        for name, model in components.items()
        for key, value in adapter_tensors(model).items()
    }


def shape_differences(
    saved: dict[str, list[int]], current: dict[str, list[int]], limit: int = 3
) -> list[str]:
    """Human-readable differences between two shape maps (missing, extra, or differently shaped tensors)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            out.append(f"{key} is in the checkpoint but not in the adapter being trained")
        elif key not in saved:
            out.append(f"{key} is not in the checkpoint")
        elif list(saved[key]) != list(current[key]):
            out.append(f"{key} has shape {list(saved[key])} there, {list(current[key])} now")
        if len(out) == limit:
            break
    return out


# --- reading ----------------------------------------------------------------------------------------------


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_checkpoint(path: Path) -> tuple[Checkpoint | None, str]:
    """The checkpoint at `path` when it is complete, else None and the reason (for the warning)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {MANIFEST} (interrupted, or written by an older version)"
    except (OSError, ValueError) as err:
        return None, f"unreadable {MANIFEST} ({err})"
    try:
        files = manifest["files"]
        for name, size in files.items():
            file = path / name
            if not file.is_file() or file.stat().st_size != size:
                return None, f"{name} is missing or truncated"
        return (
            Checkpoint(
                path,
                int(manifest["step"]),
                str(manifest["run_id"]),
                float(manifest["saved_at"]),
                {k: list(v) for k, v in manifest["adapter_shapes"].items()},
            ),
            "",
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return None, f"malformed {MANIFEST} ({type(err).__name__}: {err})"


def scan(output_dir: str | Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """Complete checkpoints (oldest written first) and the incomplete ``checkpoint-N`` dirs with reasons.

    A ``checkpoint-N`` missing after a kill mid-replace counts through its complete ``.tmp`` / ``.old``
    (what :func:`recover` will rename back), so checks made before recovery see the same set.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return [], []
    complete, incomplete = [], []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if _CHECKPOINT.fullmatch(path.name):
            found, reason = read_checkpoint(path)
            if found is None:
                incomplete.append((path, reason))
            else:
                complete.append(found)
        elif _ASIDE.fullmatch(path.name) and path.name.endswith((".tmp", ".old")):
            final = root / path.name.rsplit(".", 1)[0]
            if final.exists() or (
                path.name.endswith(".old")
                and (root / f"{final.name}.tmp").is_dir()
                and read_checkpoint(root / f"{final.name}.tmp")[0] is not None
            ):
                continue
            found, _ = read_checkpoint(path)
            if found is not None:
                complete.append(Checkpoint(final, found.step, found.run_id, found.saved_at, found.shapes))
    complete.sort(key=lambda c: (c.saved_at, c.step))
    return complete, incomplete


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete ``checkpoint-N`` dirs of `output_dir` (of one run when `run_id` is given), oldest written first."""
    complete, _ = scan(output_dir)
    return [c.path for c in complete if run_id is None or c.run_id == run_id]


def recover(output_dir: str | Path) -> None:
    """Finish or undo a replace a killed run left half-done, and delete stale temp and pruned dirs (main process)."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        match = _ASIDE.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        final = root / f"checkpoint-{match.group(1)}"
        if not final.exists() and match.group(2) != "trash":
            tmp, old = root / f"{final.name}.tmp", root / f"{final.name}.old"
            for candidate in (tmp, old):  # the newer complete one wins
                if candidate.is_dir() and read_checkpoint(candidate)[0] is not None:
                    logger.warning(
                        "Restoring %s from %s (a run was killed while replacing it).", final, candidate.name
                    )
                    os.replace(candidate, final)
                    break
        if path.exists():
            logger.info("Removing %s, left by an interrupted run.", path)
            shutil.rmtree(path, ignore_errors=True)


# --- resuming ---------------------------------------------------------------------------------------------


def _named(resume: str, output_dir: str | Path) -> Path:
    path = Path(resume)
    if not path.is_dir():
        path = Path(output_dir) / resume
    return path


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """Before any model loads: the checkpoint dir to resume from, or a clear error when there is none.

    Which checkpoint is finally used also depends on the adapter's shapes: see :func:`choose_resume`.
    """
    if resume is None:
        return None
    complete, incomplete = scan(output_dir)
    if resume == "latest":
        if not complete:
            skipped = (
                f" that is complete ({len(incomplete)} incomplete one(s) skipped: {_describe(incomplete)})"
                if incomplete
                else ""
            )
            raise TrainingConfigError(
                f"--resume_from_checkpoint latest: there is no checkpoint-N directory in "
                f"{str(output_dir)!r} to resume from{skipped}. Drop the flag to start a new run."
            )
        return complete[-1].path
    path = _named(resume, output_dir)
    if _CHECKPOINT.fullmatch(path.name):
        if any(c.path.resolve() == path.resolve() for c in complete):
            return path
        if path.is_dir():
            return _complete_or_error(path)
    raise TrainingConfigError(
        f"--resume_from_checkpoint {resume!r}: no such checkpoint directory (expected a checkpoint-N dir "
        f"or 'latest'). Checkpoints in {str(output_dir)!r}: {[c.path.name for c in complete]}."
    )


def _complete_or_error(path: Path) -> Path:
    found, reason = read_checkpoint(path)
    if found is None:
        raise TrainingConfigError(f"--resume_from_checkpoint {str(path)!r} is incomplete: {reason}.")
    return path


def _describe(items: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{p.name}: {reason}" for p, reason in items)


def choose_resume(
    resume: str | None, output_dir: str | Path, shapes: dict[str, list[int]]
) -> Checkpoint | None:
    """After the adapters exist: the checkpoint to resume from, matching the adapter's tensor shapes.

    ``latest`` is the most recently written complete checkpoint of the same adapter; incomplete ones and
    those of a different adapter are skipped with a warning (an error when nothing is left).
    """
    if resume is None:
        return None
    complete, incomplete = scan(output_dir)
    if resume != "latest":
        path = _named(resume, output_dir)
        found = next((c for c in complete if c.path.resolve() == path.resolve()), None)
        if found is None:
            found, reason = read_checkpoint(path)
            if found is None:
                raise TrainingConfigError(f"--resume_from_checkpoint {str(path)!r} is incomplete: {reason}.")
        diff = shape_differences(found.shapes, shapes)
        if diff:
            raise TrainingConfigError(
                f"--resume_from_checkpoint {str(path)!r} holds a different adapter than the one being trained "
                f"({'; '.join(diff)}). Resume with the DeLoRA flags of that run, or drop the flag."
            )
        return found
    if incomplete:
        logger.warning(
            "--resume_from_checkpoint latest skips incomplete checkpoints: %s", _describe(incomplete)
        )
    matching = [c for c in complete if not shape_differences(c.shapes, shapes)]
    others = [c for c in complete if c not in matching]
    if others:
        logger.warning(
            "--resume_from_checkpoint latest skips %s: written for a different adapter (%s).",
            [c.path.name for c in others],
            "; ".join(shape_differences(others[-1].shapes, shapes)),
        )
    if not matching:
        raise TrainingConfigError(
            f"--resume_from_checkpoint latest: no checkpoint in {str(output_dir)!r} holds the adapter being "
            f"trained ({len(others)} of a different adapter, {len(incomplete)} incomplete). Resume with that "
            "run's DeLoRA flags, use another --output_dir, or drop the flag to start a new run."
        )
    return matching[-1]


def warn_other_runs(output_dir: str | Path, run_id: str) -> None:
    """Say once that checkpoints of other runs in `output_dir` are kept, never pruned nor resumed by this run."""
    others = [c.path.name for c in scan(output_dir)[0] if c.run_id != run_id]
    if others:
        logger.warning(
            "%s holds %d checkpoint(s) of another run (%s): this run keeps them (never pruned by "
            "--checkpoints_total_limit) and may replace one only by writing the same step number.",
            output_dir,
            len(others),
            ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""),
        )


# --- accelerate hooks -------------------------------------------------------------------------------------


def register_hooks(accelerator: Any, components: dict[str, nn.Module]) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` handle adapter tensors only, keyed by component."""
    from safetensors.torch import load_file, save_file

    def name_of(model: nn.Module) -> str:
        unwrapped = accelerator.unwrap_model(model)
        for name, module in components.items():
            if module is unwrapped:
                return name
        raise RuntimeError(f"Unexpected model {type(unwrapped).__name__} in the accelerate state.")

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = {}
            for model in models:
                name = name_of(model)
                for key, value in adapter_tensors(accelerator.unwrap_model(model)).items():
                    state[f"{name}.{key}"] = value.detach().contiguous().cpu()
            save_file(state, os.path.join(output_dir, STATE_FILE))
        weights.clear()  # the frozen weights are not checkpointed

    def load_hook(models: list, input_dir: str) -> None:
        # Every adapted component, also under FSDP, where accelerate restores the whole models itself and
        # passes none here: the adapter file is the reference either way.
        state = load_file(os.path.join(input_dir, STATE_FILE))
        models.clear()
        for name, target in components.items():
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            expected = adapter_tensors(target)
            diff = shape_differences(
                {k: list(v.shape) for k, v in own.items()}, {k: list(v.shape) for k, v in expected.items()}
            )
            if diff:
                raise TrainingConfigError(
                    f"The checkpoint in {input_dir} does not match the {name} adapter being trained "
                    f"({'; '.join(diff)}). Resume with the same DeLoRA flags."
                )
            target.load_state_dict(own, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --- writing ----------------------------------------------------------------------------------------------


def write_manifest(folder: Path, step: int, identity: RunIdentity) -> None:
    """The completion mark, written last: run id, step, adapter shapes and every file's size."""
    manifest = {
        "run_id": identity.run_id,
        "step": step,
        "saved_at": time.time(),
        "adapter_shapes": identity.shapes,
        "files": _file_sizes(folder),
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final` so a kill at any point leaves a complete one of them (see the module docstring)."""
    old = final.with_name(f"{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(output_dir: str | Path, run_id: str, total_limit: int) -> None:
    """Keep the newest `total_limit` checkpoints of this run; other runs' checkpoints are never touched."""
    for old in list_checkpoints(output_dir, run_id)[:-total_limit]:
        logger.info("Removing %s (checkpoints_total_limit=%d)", old, total_limit)
        trash = old.with_name(f"{old.name}.trash")  # renamed first: a kill mid-delete leaves no partial one
        os.replace(old, trash)
        shutil.rmtree(trash)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    identity: RunIdentity,
    total_limit: int | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` (tmp dir, manifest, atomic replace), then prune this run's to `total_limit`."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(f"{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process and extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp, step, identity)
        replaced = read_checkpoint(final)[0] if final.exists() else None
        if replaced is not None and replaced.run_id != identity.run_id:
            logger.warning("Replacing %s, written by another run.", final)
        replace_dir(tmp, final)
        if total_limit is not None:
            prune(output_dir, identity.run_id, total_limit)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final
