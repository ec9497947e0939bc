"""A small CNN that reads the world's attributes off a 64×64 image, and embeds images for similarity.

It is the measuring stick for the bundled model: prompt-following accuracy (does the image show what the
caption says?) and subject similarity (the cosine of L2-normalized penultimate features stands in for DINOv2).
Weights are plain safetensors plus a json config; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .world import CHOICES, COLORS, to_tensor

PROBE_DIR = Path(__file__).parent / "probe"
# The probe reads one more attribute than the base world varies: the accent colour of stripes or dots
# ("none" is the base world's dark shade). It tells a DreamBooth subject apart from its base-world lookalikes.
HEADS: dict[str, tuple[str, ...]] = {**CHOICES, "accent": ("none", *COLORS)}


def _block(cin: int, cout: int, convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Probe(nn.Module):
    """Four conv stages (64→8 px), global pooling, an embedding layer, and one linear head per attribute."""

    def __init__(self, width: int = 16, embed_dim: int = 128):
        super().__init__()
        self.config = {
            "width": width,
            "embed_dim": embed_dim,
            "heads": {k: list(v) for k, v in HEADS.items()},
        }
        w = width
        self.stages = nn.ModuleList(
            [_block(3, w, convs=1), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w)]
        )
        self.fc = nn.Linear(8 * w, embed_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], shape (N, 3, 64, 64)."""
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1:
                x = F.max_pool2d(x, 2)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return F.relu(self.fc(pooled))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    def _as_tensor(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else to_tensor(list(images))
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def embed(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings (N, embed_dim); cosine similarity is their dot product."""
        return F.normalize(self.features(self._as_tensor(images)).float(), dim=-1)

    @torch.no_grad()
    def predict(self, images: list[Image.Image] | torch.Tensor) -> dict[str, list[str]]:
        """The most likely value of every attribute, per image: ``{"shape": ["star", ...], ...}``."""
        logits = self(self._as_tensor(images))
        return {k: [HEADS[k][int(i)] for i in v.argmax(-1)] for k, v in logits.items()}


def save_probe(probe: Probe, out_dir: str | Path = PROBE_DIR) -> Path:
    """Save as ``model.safetensors`` + ``config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(probe.config, indent=2) + "\n")
    return out


def load_probe(path: str | Path = PROBE_DIR, device: str | torch.device = "cpu") -> Probe:
    """Load the bundled probe (or one saved with ``save_probe``) in eval mode."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if {k: tuple(v) for k, v in config["heads"].items()} != HEADS:
        raise ValueError(f"probe at {path} was trained for other attributes: {config['heads']}")
    probe = Probe(width=config["width"], embed_dim=config["embed_dim"])
    probe.load_state_dict(load_file(str(path / "model.safetensors")))
    return probe.to(device).eval()
