"""Flux: CLIP (pooled) and T5 feeding a DiT over packed 2x2 latent patches, with guidance embedding."""

from __future__ import annotations

from typing import Any

import torch

from .base import Family, FlowObjective, Noised, tokenize


class Flux(FlowObjective, Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    denoiser = "transformer"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)  # the T5 stays frozen, as in diffusers
    default_resolution = 1024
    default_max_sequence_length = 512
    latent_multiple = 2

    def encode_prompts(self, tokenizers, encoders, prompts, args) -> dict[str, torch.Tensor]:
        clip_ids = tokenize(tokenizers["tokenizer"], prompts).to(self.device)
        pooled = encoders["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
        t5_ids = tokenize(tokenizers["tokenizer_2"], prompts, args.max_sequence_length).to(self.device)
        return {"prompt_embeds": encoders["text_encoder_2"](t5_ids)[0], "pooled_prompt_embeds": pooled}

    def predict(self, denoiser: Any, noised: Noised, cond, batch, args) -> torch.Tensor:
        from diffusers import FluxPipeline

        x = noised.noisy
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if self.config("transformer").guidance_embeds:
            guidance = torch.full((b,), args.guidance_scale, device=x.device, dtype=x.dtype)
        pred = denoiser(
            hidden_states=packed,
            timestep=noised.timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = self.info.vae_scale_factor
        return FluxPipeline._unpack_latents(pred, height=h * scale, width=w * scale, vae_scale_factor=scale)

    def pipeline_kwargs(self, args) -> dict[str, Any]:
        return {"max_sequence_length": args.max_sequence_length}
