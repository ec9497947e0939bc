"""Experiment trackers: which ones run (``--report_to``), and images sent to every active one.

accelerate's ``log_images`` hands tensorboard a stack as NCHW unless told otherwise, and wandb a list; the
pipeline gives HWC PIL images. Each tracker gets them in the layout it documents, and a tracker that fails to
take an image costs a warning, never the run (the adapter, card and sweep are written after validation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .util import is_installed, require

logger = logging.getLogger(__name__)

KNOWN = ("tensorboard", "wandb")


def resolve_report_to(report_to: str | None) -> str | list[str] | None:
    """``--report_to`` as accelerate's ``log_with``: tensorboard by default when installed, ``all`` = every
    installed one of tensorboard / wandb, a comma list as given; a named tracker that is missing is an error.
    """
    if report_to is None:
        if is_installed("tensorboard") or is_installed("tensorboardX"):
            return "tensorboard"
        logger.info(
            "tensorboard is not installed: metrics go to the progress bar only (pip install tensorboard)."
        )
        return None
    if report_to == "none":
        return None
    if report_to == "all":
        names = [n for n in KNOWN if is_installed(n) or (n == "tensorboard" and is_installed("tensorboardX"))]
        return names or None
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name == "tensorboard":
            if not is_installed("tensorboardX"):
                require("tensorboard", "--report_to tensorboard")
        elif name == "wandb":
            require("wandb", "--report_to wandb")
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        logger.info(
            "wandb: no WANDB_API_KEY and no WANDB_MODE; set WANDB_MODE=offline to log without a login."
        )
    return names[0] if len(names) == 1 else names


def tracker_name(tracker: Any) -> str:
    """accelerate's tracker name (``tensorboard``, ``wandb``, ...), or the class name for custom ones."""
    return str(getattr(tracker, "name", type(tracker).__name__))


def _log_one(
    tracker: Any, tag: str, images: Sequence[Image.Image], step: int, captions: Sequence[str]
) -> None:
    name = tracker_name(tracker)
    if name == "tensorboard":
        writer = tracker.writer
        for i, image in enumerate(images):
            writer.add_image(f"{tag}/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        writer.flush()
    elif name == "wandb":
        import wandb

        logged = [wandb.Image(image, caption=c) for image, c in zip(images, captions)]
        tracker.log({tag: logged}, step=step)
    elif hasattr(tracker, "log_images"):
        tracker.log_images({tag: [np.asarray(image.convert("RGB")) for image in images]}, step)


def log_images(
    trackers: Sequence[Any],
    tag: str,
    images: Sequence[Image.Image],
    step: int,
    captions: Sequence[str] | None = None,
) -> list[str]:
    """Send `images` (HWC RGB) to every tracker under `tag`; returns the names that took them.

    Failures are warnings: an image a tracker cannot take must not cost the files written after it.
    """
    captions = list(captions) if captions is not None else [tag] * len(images)
    done = []
    for tracker in trackers:
        try:
            _log_one(tracker, tag, images, step, captions)
        except Exception as err:  # a tracker's own error types vary; the run must go on
            logger.warning(
                "Could not log %r images to %s: %s: %s", tag, tracker_name(tracker), type(err).__name__, err
            )
            continue
        done.append(tracker_name(tracker))
    return done
