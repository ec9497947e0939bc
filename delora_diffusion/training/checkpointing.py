"""Checkpoints: accelerate state (optimizer, scheduler, RNG) plus only the adapter tensors, written atomically.

A checkpoint is written to ``checkpoint-N.tmp`` and renamed when complete, so a killed run never leaves a
half-written ``checkpoint-N`` for ``--resume_from_checkpoint latest`` to pick up. The frozen base weights are
not copied: the save hook keeps only the DeLoRA tensors (under FSDP accelerate saves the whole sharded model
and optimizer with torch.distributed.checkpoint regardless; the adapter file is written too and loaded last).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .util import TrainingConfigError

logger = logging.getLogger(__name__)

STATE_FILE = "delora_state.safetensors"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` dirs of `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint dir to resume from, or a clear error when there is none."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainingConfigError(
                f"--resume_from_checkpoint latest: there is no checkpoint-N directory in {str(output_dir)!r} "
                "to resume from. Drop the flag to start a new run."
            )
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        path = Path(output_dir) / resume
    if not path.is_dir() or not _CHECKPOINT.fullmatch(path.name):
        raise TrainingConfigError(
            f"--resume_from_checkpoint {resume!r}: no such checkpoint directory (expected a checkpoint-N dir "
            f"or 'latest'). Checkpoints in {str(output_dir)!r}: {[p.name for p in list_checkpoints(output_dir)]}."
        )
    return path


def adapter_tensors(model: nn.Module) -> dict[str, Any]:
    """The DeLoRA entries of the model's state dict (trainable factors, lambda and frozen buffers)."""
    return {k: v for k, v in model.state_dict().items() if ".delora." in f".{k}"}


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
            expected = set(adapter_tensors(target))
            if set(own) != expected:
                raise TrainingConfigError(
                    f"The checkpoint in {input_dir} does not match the {name} adapter being trained "
                    f"({len(own)} tensors saved, {len(expected)} expected). Resume with the same DeLoRA flags."
                )
            target.load_state_dict(own, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    total_limit: int | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (tmp dir then rename), then prune to `total_limit`."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process and extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                logger.info("Removing %s (checkpoints_total_limit=%d)", old, total_limit)
                shutil.rmtree(old)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final
