"""What differs between model families, behind one small interface.

A family says which components it has, how prompts become conditioning tensors, and how the denoiser is
called. The noise objective (DDPM epsilon/v for SD/SDXL, flow matching for SD3/Flux) is a separate mix-in, so
a family module is only its text encoding and denoiser call.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..util import TrainingConfigError


@dataclass
class ModelInfo:
    """What the script knows about the base model before loading any weights."""

    path: str  # local dir or hub id, as given
    index: dict[str, Any]  # model_index.json
    family: str
    vae_scale_factor: int
    local_dir: Path | None = None


@dataclass
class Noised:
    """One noised batch: the denoiser's input, its timesteps, the regression target and the loss weights."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None  # broadcastable to the target, or (B,)
    extra: dict[str, Any] = field(default_factory=dict)


def load_component(
    info: ModelInfo, name: str, args: argparse.Namespace, dtype: torch.dtype | None = None
) -> Any:
    """Load one pipeline component with the class recorded in model_index.json."""
    entry = info.index.get(name)
    if not entry or entry[0] is None:
        return None
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    path, kwargs = component_source(info, name, args)
    if "Tokenizer" not in class_name:
        kwargs["variant"] = args.variant
        if dtype is not None:
            kwargs[dtype_kwarg(library)] = dtype
    return cls.from_pretrained(path, **kwargs)


def component_source(info: ModelInfo, name: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Where a component loads from: the pipeline's subfolder, or diffusers' overrides
    (``--pretrained_vae_model_name_or_path``: a VAE at the root of another repo / dir; ``--tokenizer_name``).
    """
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    tokenizer = getattr(args, "tokenizer_name", None)
    if name == "vae" and vae:
        return vae, {"revision": args.revision}
    if name == "tokenizer" and tokenizer:
        return tokenizer, {"revision": args.revision}
    return info.path, {"subfolder": name, "revision": args.revision}


def dtype_kwarg(library: str = "diffusers") -> str:
    """The from_pretrained dtype argument: ``dtype`` (transformers 5, newer diffusers) or ``torch_dtype``."""
    if library == "transformers":
        return "dtype"
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


class DDPMObjective:
    """Noise prediction (epsilon or v, from the scheduler config) with optional min-SNR weighting."""

    scheduler_class = "DDPMScheduler"

    def noise(self, scheduler: Any, latents: torch.Tensor, args: argparse.Namespace) -> Noised:
        from diffusers.training_utils import compute_snr

        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        elif kind == "sample":
            target = latents
        else:
            raise TrainingConfigError(f"Unsupported scheduler prediction_type {kind!r}.")
        weight = None
        if args.snr_gamma is not None:
            snr = compute_snr(scheduler, timesteps)
            weight = torch.clamp(snr, max=args.snr_gamma)
            weight = (
                weight / snr
                if kind == "epsilon"
                else weight / (snr + 1)
                if kind == "v_prediction"
                else weight
            )
        return Noised(noisy, timesteps, target, weight)


class FlowObjective:
    """Rectified flow: x_t = (1 - s) x + s noise, target noise - x, SD3's timestep densities and weights."""

    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    def noise(self, scheduler: Any, latents: torch.Tensor, args: argparse.Namespace) -> Noised:
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme,
            batch_size=latents.shape[0],
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
        )
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype)
        sigmas = sigmas.reshape(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weight = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
        return Noised(noisy, timesteps, noise - latents, weight, extra={"sigmas": sigmas})


class Family:
    """Base of the per-family strategies."""

    name = ""
    pipeline_classes: tuple[str, ...] = ()
    denoiser = "unet"
    tokenizers: tuple[str, ...] = ("tokenizer",)
    text_encoders: tuple[str, ...] = ("text_encoder",)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)
    default_resolution = 512
    latent_multiple = 1  # Flux packs 2x2 latent patches
    scheduler_class = ""
    default_max_sequence_length: int | None = None

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.device = torch.device("cpu")
        self.components: dict[str, Any] = {}

    def bind(self, components: dict[str, Any], device: torch.device) -> None:
        """Give the strategy the loaded (unwrapped) components and the training device."""
        self.components, self.device = components, device

    def config(self, name: str) -> Any:
        return self.components[name].config

    def pixel_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE downsampling times latent packing)."""
        return self.info.vae_scale_factor * self.latent_multiple

    def load_noise_scheduler(self, args: argparse.Namespace) -> Any:
        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        return cls.from_pretrained(self.info.path, subfolder="scheduler", revision=args.revision)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's space: SD scales; SD3 / Flux also shift."""
        config = self.config("vae")
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    def encode_prompts(
        self,
        tokenizers: dict[str, Any],
        encoders: dict[str, Any],
        prompts: list[str],
        args: argparse.Namespace,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(
        self, denoiser: Any, noised: Noised, cond: dict[str, torch.Tensor], batch: dict, args
    ) -> torch.Tensor:
        raise NotImplementedError

    def noise(self, scheduler: Any, latents: torch.Tensor, args: argparse.Namespace) -> Noised:
        raise NotImplementedError

    def pipeline_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        """Extra call arguments for validation and class-image generation."""
        return {}


def tokenize(
    tokenizer: Any, prompts: list[str], max_length: int | None = None, with_mask: bool = False
) -> Any:
    """Padded token ids (and the attention mask with `with_mask`)."""
    out = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return (out.input_ids, out.attention_mask) if with_mask else out.input_ids


def clip_encode(encoder: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled output) of a CLIP text encoder, with or without projection."""
    out = encoder(ids, output_hidden_states=True)
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return out.hidden_states[-2], pooled


def read_model_index(path: str, args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    """model_index.json of a local dir or hub repo (through the hub cache; honours HF_HUB_OFFLINE)."""
    local = Path(path)
    if local.is_dir():
        file = local / "model_index.json"
        if not file.is_file():
            raise TrainingConfigError(f"{path!r} is not a diffusers pipeline: it has no model_index.json.")
        return json.loads(file.read_text()), local
    if local.exists() or path.startswith((".", "/", "~")):
        raise TrainingConfigError(f"--pretrained_model_name_or_path {path!r} is not a directory.")
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(path, "model_index.json", revision=args.revision)
    except Exception as err:
        raise TrainingConfigError(
            f"Could not find the model {path!r} locally or on the hub ({type(err).__name__}: {err})."
        ) from None
    return json.loads(Path(file).read_text()), None


def read_vae_scale_factor(info_path: str, local_dir: Path | None, args: argparse.Namespace) -> int:
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    if vae and Path(vae).is_dir():
        config_file = Path(vae) / "config.json"
        if not config_file.is_file():
            raise TrainingConfigError(
                f"--pretrained_vae_model_name_or_path {vae!r} has no config.json at its root."
            )
    elif vae:
        from huggingface_hub import hf_hub_download

        try:
            config_file = Path(hf_hub_download(vae, "config.json", revision=args.revision))
        except Exception as err:
            raise TrainingConfigError(
                f"Could not find the VAE {vae!r} locally or on the hub ({type(err).__name__}: {err})."
            ) from None
    elif local_dir is not None:
        config_file = local_dir / "vae" / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(info_path, "config.json", subfolder="vae", revision=args.revision))
    blocks = json.loads(config_file.read_text()).get("block_out_channels", [0] * 4)
    return 2 ** (len(blocks) - 1)
