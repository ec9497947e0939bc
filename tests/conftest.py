"""Shared, session-scoped fixtures: tiny pipelines of every family saved once, and one trained-looking
DeLoRA adapter per family (saved with ``save_delora_weights``) with its reference images."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny_pipelines as tp  # noqa: E402

import delora_diffusion as dd  # noqa: E402

torch.set_num_threads(1)  # the CI machine has 2 cores, shared: oversubscribing threads only slows tiny models

# Which components get an adapter in the per-family fixture (CLIP encoders only: diffusers' LoRA loaders
# take no T5 LoRA, and the export tests compare against them), and the init each family exercises.
ADAPTED = {
    "sd": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "sd3": ("transformer", "text_encoder", "text_encoder_2"),
    "flux": ("transformer", "text_encoder"),
}
INIT = {"sd": "paper", "sdxl": "paper", "sd3": "zero", "flux": "zero"}
PARTIAL_SCALE = 0.6


def make_nontrivial(module: torch.nn.Module, adapter_name: str = "default", seed: int = 0) -> None:
    """Move an injected adapter away from its start as training would (both inits): A, B and lambda."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, adapter in dd.iter_delora_layers(module, adapter_name):
            for param in (adapter.delora_A, adapter.delora_B):
                scale = param.abs().mean().item() or 0.1
                param.add_(torch.randn(param.shape, generator=generator) * 0.5 * scale)
            adapter.delora_lambda.mul_(1.0 + 0.5 * torch.rand(1, generator=generator))


def inject_family_adapter(pipe, family: str, adapter_name: str = "default", seed: int = 0, lam: float = 6.0):
    for component in ADAPTED[family]:
        module = getattr(pipe, component)
        config = dd.DeLoRAConfig(rank=2, lambda_init=lam, init=INIT[family])
        dd.inject_delora(module, config, adapter_name)
        make_nontrivial(module, adapter_name, seed)
        module.eval()


@dataclass
class Trained:
    family: str
    base_dir: Path
    adapter_dir: Path
    base: np.ndarray  # images of the base pipeline
    adapted: np.ndarray  # images with the adapter at scale 1
    partial: np.ndarray  # images with the adapter at PARTIAL_SCALE


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """``pipeline_dir(family)`` -> a saved tiny pipeline directory (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = tp.MAKERS[family](tmp_path_factory.mktemp(f"pipe_{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def trained(tmp_path_factory, pipeline_dir):
    """``trained(family)`` -> :class:`Trained`: an adapter saved by save_delora_weights, plus reference images."""
    cache: dict[str, Trained] = {}

    def get(family: str) -> Trained:
        if family not in cache:
            base_dir = pipeline_dir(family)
            pipe = tp.load_pipeline(base_dir)
            base = tp.run(pipe, family)
            inject_family_adapter(pipe, family)
            adapted = tp.run(pipe, family)
            with pipe.delora_scale(PARTIAL_SCALE):
                partial = tp.run(pipe, family)
            out = tmp_path_factory.mktemp(f"adapter_{family}")
            pipe.save_delora_weights(out, training_args={"learning_rate": 1e-3, "family": family})
            cache[family] = Trained(family, base_dir, out, base, adapted, partial)
        return cache[family]

    return get


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def sd_pipe(trained):
    """The tiny SD pipeline the io tests load files into (one per test module)."""
    return tp.load_pipeline(trained("sd").base_dir)


@pytest.fixture(scope="module")
def good_file(trained) -> Path:
    """A valid adapter file saved by save_delora_weights."""
    return trained("sd").adapter_dir / dd.io.WEIGHT_NAME


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and on a shared 2-core machine far more predictably."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
