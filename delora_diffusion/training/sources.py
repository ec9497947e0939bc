"""Where training images and captions come from: a folder, or a Hugging Face dataset; the trigger word;
caption dropout.

No caption source is ignored silently: a ``metadata.jsonl`` / ``metadata.csv`` next to ``--instance_data_dir``
images, ``.txt`` sidecars inside a ``--dataset_name`` folder, or a dataset's text column without
``--caption_column`` each get a warning that says how to use them.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from . import data
from .util import TrainingConfigError, require

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "prompts", "description", "label_text")
STOPWORDS = frozenset(
    "a an the of in on at with and photo photograph picture image painting drawing portrait style".split()
)

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,  # PIL's nearest is the exact one
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
"""diffusers' --image_interpolation_mode names (torchvision's) as PIL filters."""


def resampling(args: argparse.Namespace) -> Image.Resampling:
    return RESAMPLING[getattr(args, "image_interpolation_mode", None) or "bicubic"]


def resize_short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image if new == (w, h) else image.resize(new, resample)


def to_rgb(image: Image.Image) -> Image.Image:
    """A dataset's PIL image as RGB, EXIF orientation applied, transparency over white (as folder images)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def warn_ignored_folder_captions(folder: str | Path) -> list[str]:
    """``--instance_data_dir`` reads images and ``.txt`` sidecars; an imagefolder metadata file there is not
    read, so say so (and how to read it). Returns the ignored files' names."""
    ignored = [name for name in METADATA_FILES if (Path(folder) / name).is_file()]
    if ignored:
        logger.warning(
            "%s in %s is ignored with --instance_data_dir (captions come from .txt sidecars or "
            "--instance_prompt). To train on its captions: --dataset_name %s --caption_column <its text column>.",
            " and ".join(ignored),
            folder,
            folder,
        )
    return ignored


def load_hf_dataset(args: argparse.Namespace) -> Any:
    """The ``train`` split of ``--dataset_name`` (hub id or local folder), as diffusers' scripts load it."""
    datasets = require("datasets", "--dataset_name")
    try:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as err:  # datasets raises many types (FileNotFound, ConnectionError, DatasetNotFound)
        raise TrainingConfigError(
            f"Could not load --dataset_name {args.dataset_name!r} ({type(err).__name__}: {err}). Offline, a hub "
            "dataset must be in the cache (--cache_dir / HF_DATASETS_CACHE) or be a local folder."
        ) from None
    if isinstance(loaded, dict) or hasattr(loaded, "keys"):
        if "train" not in loaded:
            raise TrainingConfigError(
                f"--dataset_name {args.dataset_name!r} has no 'train' split: {list(loaded)}."
            )
        loaded = loaded["train"]
    return loaded


def dataset_captions(dataset: Any, args: argparse.Namespace) -> list[str]:
    """One caption per row: ``--caption_column`` values (empty ones fall back to the instance prompt), or
    the instance prompt everywhere, with a warning when the dataset has a text column that goes unused."""
    columns = list(dataset.column_names)
    if args.image_column not in columns:
        raise TrainingConfigError(
            f"--image_column {args.image_column!r} is not a column of {args.dataset_name!r}; it has {columns}."
        )
    if args.caption_column is None:
        text = [
            c for c in columns if c != args.image_column and (c in CAPTION_COLUMNS or _is_text(dataset, c))
        ]
        if text:
            logger.warning(
                "The dataset's column(s) %s are ignored: every image trains on --instance_prompt %r. Pass "
                "--caption_column %s to train on them.",
                text,
                args.instance_prompt,
                text[0],
            )
        return [args.instance_prompt] * len(dataset)
    if args.caption_column not in columns:
        raise TrainingConfigError(
            f"--caption_column {args.caption_column!r} is not a column of {args.dataset_name!r}; it has {columns}."
        )
    return [
        str(c).strip() if c is not None and str(c).strip() else args.instance_prompt
        for c in dataset[args.caption_column]
    ]


def _is_text(dataset: Any, column: str) -> bool:
    feature = dataset.features.get(column)
    return getattr(feature, "dtype", None) in ("string", "large_string")


def warn_ignored_sidecars(dataset_name: str, caption_extension: str) -> None:
    folder = Path(dataset_name)
    if caption_extension and folder.is_dir():
        sidecars = sorted(folder.rglob(f"*{caption_extension}"))
        if sidecars:
            logger.warning(
                "%d %s caption file(s) in %s are ignored with --dataset_name (the dataset's metadata and "
                "--caption_column give captions); use --instance_data_dir %s to train on them.",
                len(sidecars),
                caption_extension,
                folder,
                folder,
            )


def read_dataset_examples(args: argparse.Namespace, resolution: int) -> list[data.Example]:
    """Every row of ``--dataset_name`` as an Example (image resized so its short side is `resolution`)."""
    warn_ignored_sidecars(args.dataset_name, getattr(args, "caption_extension", ""))
    dataset = load_hf_dataset(args)
    captions = dataset_captions(dataset, args)
    resample = resampling(args)
    examples = []
    for i, (image, caption) in enumerate(zip(dataset[args.image_column], captions)):
        if not isinstance(image, Image.Image):
            raise TrainingConfigError(
                f"--image_column {args.image_column!r} holds {type(image).__name__}, not images."
            )
        image = to_rgb(image)
        original = (image.height, image.width)
        path = Path(f"{args.dataset_name}[{i}]")
        examples.append(data.Example(resize_short_side(image, resolution, resample), caption, original, path))
    if not examples:
        raise TrainingConfigError(f"--dataset_name {args.dataset_name!r} has no rows in its 'train' split.")
    logger.info("Read %d image(s) from the dataset %s", len(examples), args.dataset_name)
    return examples


def derive_trigger(instance_prompt: str, class_prompt: str | None = None) -> str:
    """The instance prompt's identifier: its words minus filler words and the class prompt's words
    ('a photo of sks dog' with class 'a photo of dog' -> 'sks'; without a class prompt -> 'sks dog')."""
    drop = STOPWORDS | set(re.findall(r"[\w-]+", (class_prompt or "").lower()))
    words = [w for w in re.findall(r"[\w-]+", instance_prompt) if w.lower() not in drop]
    return " ".join(words)


def has_trigger(caption: str, trigger: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE) is not None


def apply_trigger(examples: list[data.Example], trigger: str) -> int:
    """Prepend `trigger` to each caption that lacks it (``"sks, a dog on grass"``); returns how many."""
    if not trigger:
        return 0
    changed = 0
    for example in examples:
        if not has_trigger(example.prompt, trigger):
            example.prompt = f"{trigger}, {example.prompt}" if example.prompt else trigger
            changed += 1
    if changed:
        # A warning, not info: it changes the user's captions (and runs before logging is configured).
        logger.warning(
            "Prepended the trigger word %r to %d caption(s) that lacked it (--trigger_word '' turns this off).",
            trigger,
            changed,
        )
    return changed


def read_instances(args: argparse.Namespace) -> list[data.Example]:
    """The instance examples from ``--dataset_name`` or ``--instance_data_dir``, trigger word applied."""
    if getattr(args, "dataset_name", None):
        examples = read_dataset_examples(args, args.resolution)
    else:
        warn_ignored_folder_captions(args.instance_data_dir)
        resample = resampling(args)
        extra = {} if resample == Image.Resampling.BICUBIC else {"resample": resample}  # data's default
        examples = data.read_examples(
            args.instance_data_dir, args.instance_prompt, args.resolution, args.caption_extension, **extra
        )
    trigger = args.trigger_word
    if trigger is None:
        trigger = derive_trigger(args.instance_prompt, args.class_prompt)
    apply_trigger(examples, trigger)
    return examples


def caption_dropout(collate: Callable[[list[dict]], dict], rate: float, seed: int | None = None) -> Callable:
    """Wrap a collate function: each instance caption becomes "" with probability `rate` (kohya's
    ``--caption_dropout_rate``; class captions under prior preservation are kept)."""
    if rate <= 0:
        return collate
    rng = random.Random(seed)

    def collate_with_dropout(items: list[dict]) -> dict:
        batch = collate(items)
        n = batch["num_instance"]
        batch["prompts"] = [
            "" if i < n and rng.random() < rate else p for i, p in enumerate(batch["prompts"])
        ]
        return batch

    return collate_with_dropout
