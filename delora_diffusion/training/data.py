"""DreamBooth data: reading instance and class images (PIL and torch only), captions, and the dataset.

Images are read once, up front: a DreamBooth set is a handful of pictures, and reading them before any model
loads means a bad folder fails in seconds with a clear message.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .util import TrainingConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Example:
    """One training image with the prompt it is trained on."""

    image: Image.Image  # RGB, resized so its short side equals the resolution
    prompt: str
    original_size: tuple[int, int]  # (height, width) before resizing: SDXL conditions on it
    path: Path


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder` (sub-folders, e.g. a subject's ``heldout/``, are not read)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_rgb(path: Path) -> Image.Image:
    """Open an image the way a camera meant it: EXIF orientation applied, any mode (L, RGBA, CMYK, P) to RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in WIDE_GRAY_MODES:
            image = wide_gray_to_l(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Grayscale modes wider than 8 bits (16-bit PNG/TIFF): PIL's convert("RGB") clips them instead of scaling."""


def wide_gray_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale (0..65535) to 8-bit "L" (0..255) by scaling, as a viewer shows it.

    PIL's own conversion clips every value above 255 to white, so a normal 16-bit photo comes out blank.
    Mode "I" (32-bit) is what some PIL versions give 16-bit PNGs, so it is read in the same 16-bit range.
    """
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def read_caption(path: Path, fallback: str) -> str:
    """A sidecar caption (UTF-8, a BOM allowed), or `fallback` when it is empty.

    Any other encoding is a TrainingConfigError naming the file and the first bad byte: guessing a code page
    could silently train on a wrong trigger word.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TrainingConfigError(
            f"The caption file {str(path)!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} at position "
            f"{err.start}). Save it as UTF-8, or pass --caption_extension '' to ignore caption files."
        ) from None
    return text.strip() or fallback


def resize_short_side(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image if new == (w, h) else image.resize(new, resample)


def read_examples(
    folder: str | Path,
    prompt: str,
    resolution: int,
    caption_extension: str = ".txt",
    what: str = "instance",
    resample: Image.Resampling = Image.Resampling.BICUBIC,  # --image_interpolation_mode
) -> list[Example]:
    """Read every usable image of `folder`; unreadable files are listed in one warning and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingConfigError(
            f"The {what} data dir {str(folder)!r} does not exist or is not a directory."
        )
    paths = list_images(folder)
    examples, bad = [], []
    for path in paths:
        try:
            image = load_rgb(path)
        except Exception as err:  # PIL raises many types for broken files
            bad.append(f"{path.name} ({type(err).__name__}: {err})")
            continue
        caption = prompt
        sidecar = path.with_suffix(caption_extension) if caption_extension else None
        if sidecar is not None and sidecar.is_file():
            caption = read_caption(sidecar, prompt)
        original = (image.height, image.width)
        examples.append(Example(resize_short_side(image, resolution, resample), caption, original, path))
    if bad:
        logger.warning("Skipped %d unreadable %s image(s) in %s: %s", len(bad), what, folder, "; ".join(bad))
    if not examples and what == "instance":
        others = sorted(p.name for p in folder.iterdir())[:10]
        raise TrainingConfigError(
            f"No usable image in the instance data dir {str(folder)!r} (readable {'/'.join(IMAGE_EXTENSIONS)} "
            f"files directly inside it). Found: {others or 'nothing'}."
        )
    return examples


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float CHW tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples (repeated `repeats` times), each paired with a class example under prior preservation.

    Items carry the pixel tensor, the prompt, and SDXL's size conditioning (original size, crop corner).
    """

    def __init__(
        self,
        instances: list[Example],
        resolution: int,
        classes: list[Example] | None = None,
        repeats: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
    ) -> None:
        self.instances = instances * repeats
        self.classes = classes or []
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.latent_cache: dict[int, torch.Tensor] = {}

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Encode each distinct image once (center crop, no flip): items then carry VAE posterior parameters."""
        if self.random_flip or not self.center_crop:
            logger.info("--cache_latents: each image is encoded once with a center crop and no flip.")
        for example in {id(e): e for e in self.instances + self.classes}.values():
            pixels = self.transform(example, augment=False)["pixel_values"]
            self.latent_cache[id(example)] = encode(pixels[None])[0].float().cpu()

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def transform(self, example: Example, augment: bool = True) -> dict:
        image, size = example.image, self.resolution
        if self.center_crop or not augment:
            left, top = (image.width - size) // 2, (image.height - size) // 2
        else:
            left, top = random.randint(0, image.width - size), random.randint(0, image.height - size)
        image = image.crop((left, top, left + size, top + size))
        if augment and self.random_flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {
            "pixel_values": to_tensor(image),
            "prompt": example.prompt,
            "original_size": example.original_size,
            "crop_top_left": (top, left),
        }

    def item(self, example: Example) -> dict:
        if id(example) in self.latent_cache:
            return {
                "latent_params": self.latent_cache[id(example)],
                "prompt": example.prompt,
                "original_size": example.original_size,
                "crop_top_left": (
                    (example.image.height - self.resolution) // 2,
                    (example.image.width - self.resolution) // 2,
                ),
            }
        return self.transform(example)

    def __getitem__(self, index: int) -> dict:
        item = {"instance": self.item(self.instances[index % len(self.instances)])}
        if self.classes:
            item["class"] = self.item(self.classes[index % len(self.classes)])
        return item


def collate(items: list[dict]) -> dict:
    """Stack a batch; with prior preservation the class half follows the instance half."""
    parts = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    key = "latent_params" if "latent_params" in parts[0] else "pixel_values"
    return {
        key: torch.stack([p[key] for p in parts]).contiguous(),
        "prompts": [p["prompt"] for p in parts],
        "original_sizes": [p["original_size"] for p in parts],
        "crops_top_left": [p["crop_top_left"] for p in parts],
        "num_instance": len(items),
    }
