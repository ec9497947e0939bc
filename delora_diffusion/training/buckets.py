"""Aspect-ratio buckets (``--enable_bucket``, as kohya's sd-scripts users know them) and the training dataset.

Buckets are (width, height) pairs with sides that are multiples of ``--bucket_reso_steps``, between
``--min_bucket_reso`` and ``--max_bucket_reso``, and an area of at most ``--resolution``². Each image goes to
the bucket nearest its aspect ratio, is resized to cover it and cropped (center or random); a batch holds
one bucket only. SDXL's size conditioning gets the bucket as target size and the crop corner in the resized
image, as diffusers computes it for square crops.

Latent caching and augmentation: cached latents are encoded once, center-cropped and unflipped, so random
crop and ``--random_flip`` are off while caching; :func:`make_dataset` warns when that drops augmentation the
user asked for (``--no_cache_latents`` keeps it).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from . import data
from .sources import caption_dropout, resampling
from .util import TrainingConfigError

logger = logging.getLogger(__name__)


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket list: for each width, the tallest height (a multiple of `step`) within the area."""
    if step < 1 or min_reso < step or max_reso < min_reso or not min_reso <= resolution <= max_reso:
        raise TrainingConfigError(
            f"Bucket settings need bucket_reso_steps <= min_bucket_reso <= resolution <= max_bucket_reso; got "
            f"steps {step}, min {min_reso}, resolution {resolution}, max {max_reso}."
        )
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}
    for width in range(min_reso // step * step, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (`size` is PIL's (width, height)), compared as
    log ratios so that portrait and landscape images are treated alike."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), -wh[0] * wh[1]))


def cover_and_crop(
    image: Image.Image,
    bucket: tuple[int, int],
    resample: Image.Resampling,
    random_crop: bool,
    flip: bool,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` to cover `bucket` (w, h), crop to it; returns the image and the crop's (top, left)."""
    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    size = (max(bw, round(image.width * scale)), max(bh, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, resample)
    if random_crop:
        left, top = random.randint(0, size[0] - bw), random.randint(0, size[1] - bh)
    else:
        left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    image = image.crop((left, top, left + bw, top + bh))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, (top, left)


class BucketDataset(torch.utils.data.Dataset):
    """Instances (repeated), each in its bucket; under prior preservation the paired class image is cropped
    to the same bucket. Items are those of :class:`data.DreamBoothDataset` plus ``target_size`` (h, w)."""

    def __init__(
        self,
        instances: list[data.Example],
        buckets: list[tuple[int, int]],
        classes: list[data.Example] | None = None,
        repeats: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
        resample: Image.Resampling = Image.Resampling.BICUBIC,
    ) -> None:
        self.instances = instances * repeats
        self.classes = classes or []
        self.buckets = buckets
        self.bucket_of = [nearest_bucket(e.image.size, buckets) for e in self.instances]
        self.center_crop, self.random_flip, self.resample = center_crop, random_flip, resample
        # (id(example), bucket) -> (VAE posterior parameters, the center crop's (top, left))
        self.latent_cache: dict[tuple[int, tuple[int, int]], tuple[torch.Tensor, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.instances)

    def pairs(self) -> Iterator[tuple[data.Example, tuple[int, int]]]:
        for index, bucket in enumerate(self.bucket_of):
            yield self.instances[index], bucket
            if self.classes:
                yield self.classes[index % len(self.classes)], bucket

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Encode each (image, bucket) once, center-cropped and unflipped."""
        for example, bucket in self.pairs():
            key = (id(example), bucket)
            if key not in self.latent_cache:
                item = self.transform(example, bucket, augment=False)
                latents = encode(item["pixel_values"][None])[0].float().cpu()
                self.latent_cache[key] = (latents, item["crop_top_left"])

    def transform(self, example: data.Example, bucket: tuple[int, int], augment: bool = True) -> dict:
        flip = augment and self.random_flip and random.random() < 0.5
        random_crop = augment and not self.center_crop
        image, crop = cover_and_crop(example.image, bucket, self.resample, random_crop, flip)
        return {
            "pixel_values": data.to_tensor(image),
            "prompt": example.prompt,
            "original_size": example.original_size,
            "crop_top_left": crop,
            "target_size": (bucket[1], bucket[0]),
        }

    def item(self, example: data.Example, bucket: tuple[int, int]) -> dict:
        cached = self.latent_cache.get((id(example), bucket))
        if cached is None:
            return self.transform(example, bucket)
        return {
            "latent_params": cached[0],
            "prompt": example.prompt,
            "original_size": example.original_size,
            "crop_top_left": cached[1],
            "target_size": (bucket[1], bucket[0]),
        }

    def __getitem__(self, index: int) -> dict:
        bucket = self.bucket_of[index]
        item = {"instance": self.item(self.instances[index], bucket)}
        if self.classes:
            item["class"] = self.item(self.classes[index % len(self.classes)], bucket)
        return item


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices from one bucket each, shuffled within buckets and across batches every epoch."""

    def __init__(self, bucket_of: list[Any], batch_size: int, shuffle: bool = True) -> None:
        self.groups: dict[Any, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size, self.shuffle = batch_size, shuffle

    def batches(self) -> list[list[int]]:
        out = []
        for indices in self.groups.values():
            indices = list(indices)
            if self.shuffle:
                random.shuffle(indices)
            out += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            random.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups.values())


def collate(items: list[dict]) -> dict:
    """:func:`data.collate` plus each item's target size (SDXL's conditioning)."""
    batch = data.collate(items)
    parts = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    if "target_size" in parts[0]:
        batch["target_sizes"] = [p["target_size"] for p in parts]
    return batch


def warn_augmentation_off(args: argparse.Namespace, examples: list[data.Example]) -> bool:
    """With latent caching, random crop and flips are off: warn when that drops what the data would use."""
    if not args.cache_latents:
        return False
    wide = any(e.image.width != e.image.height for e in examples)
    lost = (["--random_flip"] if args.random_flip else []) + (
        ["random crop"] if not args.center_crop and (wide or args.enable_bucket) else []
    )
    if lost:
        logger.warning(
            "Latent caching is on, so %s %s off: each image is encoded once, center-cropped and unflipped. "
            "Pass --no_cache_latents to keep augmentation (slower: the VAE then runs every step).",
            " and ".join(lost),
            "is" if len(lost) == 1 else "are",
        )
    return bool(lost)


def check_bucket_args(args: argparse.Namespace, pixel_multiple: int) -> list[tuple[int, int]]:
    """With --enable_bucket: the bucket flags fit the model (checked before any model loads); the buckets."""
    if not getattr(args, "enable_bucket", False):
        return []
    step = args.bucket_reso_steps
    if step % pixel_multiple:
        raise TrainingConfigError(
            f"--bucket_reso_steps {step} must be a multiple of {pixel_multiple} for this model (VAE factor"
            f"{' x 2 for Flux' if pixel_multiple % 16 == 0 else ''}); e.g. {max(pixel_multiple, step // pixel_multiple * pixel_multiple)}."
        )
    max_reso = args.max_bucket_reso or 2 * args.resolution
    return make_buckets(args.resolution, min(args.min_bucket_reso, args.resolution), max_reso, step)


def make_dataset(
    instances: list[data.Example],
    classes: list[data.Example] | None,
    args: argparse.Namespace,
    pixel_multiple: int = 8,
) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    """The training dataset and its DataLoader arguments (squares, or buckets with --enable_bucket), with
    caption dropout in the collate function."""
    warn_augmentation_off(args, instances)
    seed = getattr(args, "seed", None)
    if not getattr(args, "enable_bucket", False):
        dataset = data.DreamBoothDataset(
            instances, args.resolution, classes, args.repeats, args.center_crop, args.random_flip
        )
        kwargs = {"batch_size": args.train_batch_size, "shuffle": True}
        return dataset, {
            **kwargs,
            "collate_fn": caption_dropout(data.collate, args.caption_dropout_rate, seed),
        }
    buckets = check_bucket_args(args, pixel_multiple)
    dataset = BucketDataset(
        instances, buckets, classes, args.repeats, args.center_crop, args.random_flip, resampling(args)
    )
    used = sorted(set(dataset.bucket_of))
    logger.info("Aspect-ratio buckets (w x h) in use: %s", ", ".join(f"{w}x{h}" for w, h in used))
    sampler = BucketBatchSampler(dataset.bucket_of, args.train_batch_size)
    return dataset, {
        "batch_sampler": sampler,
        "collate_fn": caption_dropout(collate, args.caption_dropout_rate, seed),
    }
