"""Everything that can fail on a flag, a path or a folder, run before any model loads; and the flag records.

Two records of the flags are kept: the full one (local paths resolved) goes only into the local
``training_args.json``; the shareable one (:func:`delora_diffusion.io.shareable_args`: a hub id as given, a
local path cut to its folder name) goes into the adapter's metadata, which users upload and share.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any

from . import checkpointing, distributed
from .buckets import check_bucket_args
from .families import Family
from .hub import check_hub_args
from .trackers import resolve_report_to
from .util import TrainingConfigError, require

PATH_FLAGS = ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "output_dir")
"""Flags whose value is (or may be) a local path."""

MODEL_FLAGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path")
"""Flags that take a local pipeline dir or a hub id."""


def check_args(args: argparse.Namespace) -> None:
    """Flag checks that need no model; each failure is a TrainingConfigError naming the flag."""
    if args.instance_data_dir is None and not args.dataset_name:
        raise TrainingConfigError(
            "--instance_data_dir (or --dataset_name) is required with --pretrained_model_name_or_path."
        )
    if not args.instance_prompt:
        raise TrainingConfigError('--instance_prompt is required (e.g. "a photo of sks dog").')
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise TrainingConfigError(
                "--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')."
            )
        if not args.class_data_dir:
            raise TrainingConfigError(
                "--with_prior_preservation needs --class_data_dir (created if missing)."
            )
    if args.extra_validation_prompts and not args.validation_prompt:
        raise TrainingConfigError(
            "--extra_validation_prompts needs --validation_prompt (the final validation)."
        )
    for flag in ("train_batch_size", "gradient_accumulation_steps", "repeats", "num_train_epochs", "rank"):
        if getattr(args, flag) < 1:
            raise TrainingConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.num_validation_images < 0:
        raise TrainingConfigError(
            f"--num_validation_images must be 0 (no validation images) or more, got {args.num_validation_images}."
        )
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise TrainingConfigError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise TrainingConfigError("--checkpoints_total_limit must be at least 1.")
    if not 0.0 <= args.delora_module_dropout < 1.0:
        raise TrainingConfigError("--delora_module_dropout must be in [0, 1).")
    check_delora_bound(args)
    if args.use_8bit_adam:
        if args.optimizer != "adamw":
            raise TrainingConfigError("--use_8bit_adam works with --optimizer adamw only.")
        require("bitsandbytes", "--use_8bit_adam")
    if args.optimizer == "prodigy":
        require("prodigyopt", "--optimizer prodigy")
    args.report_to = resolve_report_to(args.report_to)
    check_hub_args(args)
    distributed.check_args(args)
    for flag in MODEL_FLAGS:
        if getattr(args, flag, None):
            check_model_path(getattr(args, flag), flag)
    checkpointing.resolve_resume(args.resume_from_checkpoint, args.output_dir)


def check_delora_bound(args: argparse.Namespace) -> None:
    """--delora_relative_bound / --delora_lambda as DeLoRAConfig will take them, named by their flags."""
    from ..config import DeLoRAConfig

    bound = (
        {"relative_bound": args.delora_relative_bound}
        if getattr(args, "delora_relative_bound", None) is not None
        else {"lambda_init": args.delora_lambda}
    )
    try:
        DeLoRAConfig(**bound)
    except ValueError as err:
        flag = "--delora_relative_bound" if "relative_bound" in bound else "--delora_lambda"
        raise TrainingConfigError(f"{flag}: {err}") from None


def check_model_path(value: str, flag: str = "pretrained_model_name_or_path") -> None:
    """A value that can only be a local path, and does not exist, is reported now instead of asking the hub.

    Sent to the hub, a mistyped ``outputs/dreambooth-delra`` would only fail after a minute of retries, with
    a message about the hub. What counts as a local path is :func:`delora_diffusion.io.sources.
    looks_like_local_path`, the rule adapter loading uses too.
    """
    from ..io.sources import looks_like_local_path

    path = Path(os.path.expanduser(value))
    if path.exists() or not looks_like_local_path(value):
        return
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    close = (
        difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3)
        if parent.is_dir()
        else []
    )
    hint = f" Did you mean {' or '.join(repr(str(parent / c)) for c in close)}?" if close else ""
    raise TrainingConfigError(
        f"--{flag} {value!r} is a local path that does not exist (so it is not looked up on the hub).{hint}"
    )


def check_model(args: argparse.Namespace, family: Family) -> None:
    """Family defaults (resolution, sequence length) and the resolution / VAE check."""
    if args.resolution is None:
        args.resolution = family.default_resolution
    if args.max_sequence_length is None:
        args.max_sequence_length = family.default_max_sequence_length
    multiple = family.pixel_multiple()
    check_bucket_args(args, multiple)
    if args.resolution < multiple or args.resolution % multiple:
        extra = " (VAE factor x 2 for Flux's latent packing)" if family.latent_multiple > 1 else ""
        raise TrainingConfigError(
            f"--resolution {args.resolution} is not divisible by {multiple}, the VAE downsampling factor{extra} "
            f"of this {family.name} model. Use e.g. {max(multiple, args.resolution // multiple * multiple)}."
        )


def training_args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as JSON-safe values, with local paths resolved: for the local ``training_args.json`` only."""
    record = {}
    for key, value in sorted(vars(args).items()):
        if key in ("local_rank", "hub_token"):  # the token must not reach files, metadata or trackers
            continue
        if key in PATH_FLAGS and value is not None and Path(value).exists():
            value = str(Path(value).resolve())
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[key] = value
        else:
            record[key] = str(value)
    return record
