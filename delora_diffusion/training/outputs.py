"""What a run writes besides checkpoints: the adapter file, validation images, the model card, the flags.

Order matters for the user: the adapter is written first (atomically), then the slower final validation,
then the card and ``training_args.json``. Only the local ``training_args.json`` holds full local paths; the
adapter's metadata and the card hold the shareable record (:func:`delora_diffusion.io.shareable_args`).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..util import atomic_write_text
from . import distributed
from .exports import write_lora_files
from .hub import push_to_hub
from .model_card import write_model_card
from .steps import ADAPTER_NAME
from .validation import run_validation

if TYPE_CHECKING:
    from .loop import Run

logger = logging.getLogger("delora_diffusion.training")


@dataclass
class TrainResult:
    """What a finished run leaves: where, how far, and the trained (unwrapped) models."""

    output_dir: Path
    adapter_path: Path | None
    global_step: int
    skipped_steps: int
    adapted: dict[str, nn.Module] = field(default_factory=dict)


def save_adapter(run: Run, path: Path) -> Path:
    """The loadable adapter file (atomic write by io.save_delora_file), with the shareable flags in its metadata."""
    from ..io import save_delora_file

    record = {**run.shared_record, "global_step": run.global_step}
    return save_delora_file(
        path,
        run.adapted,
        adapter_name=ADAPTER_NAME,
        base_model=record["pretrained_model_name_or_path"],
        training_args=record,
        pipeline_class=run.family.info.index.get("_class_name"),
    )


def export_adapter(run: Run, checkpoint_dir: Path) -> None:
    """The adapter file inside a checkpoint, so ``load_delora_weights("out/checkpoint-N")`` works."""
    from ..io import WEIGHT_NAME

    save_adapter(run, checkpoint_dir / WEIGHT_NAME)


def validate(run: Run, name: str, step: int, sweep: bool = False) -> dict[str, Path]:
    """Validation images from the main process (every process generates under FSDP; only the main one writes)."""
    accelerator = run.accelerator
    main = accelerator.is_main_process
    if run.args.num_validation_images == 0:  # as in diffusers' scripts, whose loop then makes no image
        return {}
    if not (main or distributed.runs_on_every_process(accelerator)):
        return {}
    models = list(run.adapted.values())
    return run_validation(
        run.family,
        run.components,
        models,
        run.args,
        run.dtype,
        name,
        accelerator.trackers,
        step,
        sweep=sweep,
        save=main,
    )


def write_outputs(run: Run) -> TrainResult:
    """The adapter first (atomic), then the final validation grids, the model card and training_args.json."""
    from ..io import WEIGHT_NAME, shareable_model_name

    accelerator, output_dir = run.accelerator, run.output_dir
    accelerator.wait_for_everyone()
    adapter_path = None
    if accelerator.is_main_process:
        adapter_path = save_adapter(run, output_dir / WEIGHT_NAME)
        logger.info("Saved the adapter to %s", adapter_path)
        write_lora_files(adapter_path, output_dir, kohya=run.args.output_kohya_format)
    grids: dict[str, Path] = {}
    if run.args.validation_prompt:
        grids = validate(run, "final", run.global_step, sweep=True)
    if accelerator.is_main_process:
        pipeline_class = run.info.index.get("_class_name", "DiffusionPipeline")
        base_model = shareable_model_name(run.args.pretrained_model_name_or_path)
        card = functools.partial(
            write_model_card, run.args, pipeline_class, base_model, output_dir, grids, run.global_step
        )
        card(family=run.family.name)
        atomic_write_text(output_dir / "training_args.json", json.dumps(run.record, indent=2) + "\n")
        if run.state.skipped:
            logger.warning("%d step(s) were skipped for non-finite losses.", run.state.skipped)
        if run.args.push_to_hub:
            push_to_hub(run.args, before_upload=lambda repo_id: card(family=run.family.name, repo_id=repo_id))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, adapter_path, run.global_step, run.state.skipped, run.adapted)
