"""``--push_to_hub``: the finished output dir to a Hub model repo, as diffusers' DreamBooth scripts do it.

Through huggingface_hub (``create_repo`` + ``upload_folder``), so ``HF_ENDPOINT``, ``HF_TOKEN`` and a
``hf auth login`` work as users expect. Checkpoints, tracker logs and temp files stay local.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .util import TrainingConfigError

logger = logging.getLogger(__name__)

IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "step_*", "epoch_*", "*.tmp", ".*"]
"""Never uploaded: resumable state, intermediate validations of diffusers' naming, temp files."""


def check_hub_args(args: argparse.Namespace) -> None:
    """Flag checks before any model loads (diffusers' own rule on tokens and wandb included)."""
    token = getattr(args, "hub_token", None)
    report_to = getattr(args, "report_to", None) or ""
    names = report_to if isinstance(report_to, list) else str(report_to).split(",")
    if token is not None and "wandb" in names:
        raise TrainingConfigError(
            "--hub_token cannot be used with --report_to wandb: wandb records the command line, which would "
            "expose the token. Log in with `hf auth login` (or set HF_TOKEN) instead."
        )
    if (args.hub_model_id or token) and not args.push_to_hub:
        logger.warning("--hub_model_id / --hub_token have no effect without --push_to_hub.")


def repo_name(args: argparse.Namespace) -> str:
    """``--hub_model_id``, or the output dir's name (diffusers' default)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def push_to_hub(
    args: argparse.Namespace,
    logging_dir: str | None = None,
    before_upload: Callable[[str], Any] | None = None,
) -> str:
    """Create the repo (if needed) and upload the output dir; returns the repo id.

    `before_upload(repo_id)` runs once the repo id is known (e.g. to name it in the model card's usage).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)  # built now, so it reads HF_ENDPOINT as set for this run

    ignore = list(IGNORE_PATTERNS)
    logging_dir = logging_dir or getattr(args, "logging_dir", None)
    if logging_dir:
        ignore += [f"{logging_dir}/*", f"{logging_dir}/**"]
    repo_id = api.create_repo(repo_name(args), exist_ok=True).repo_id
    if before_upload is not None:
        before_upload(repo_id)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(args.output_dir),
        commit_message="End of training",
        ignore_patterns=ignore,
    )
    logger.info("Pushed %s to the Hub repo %s", args.output_dir, repo_id)
    return repo_id
