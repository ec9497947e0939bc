"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, epsilon or v-prediction from the scheduler."""

from __future__ import annotations

from typing import Any

import torch

from .base import DDPMObjective, Family, Noised, tokenize


class StableDiffusion(DDPMObjective, Family):
    name = "sd"
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    )

    def encode_prompts(self, tokenizers, encoders, prompts, args) -> dict[str, torch.Tensor]:
        length = getattr(args, "tokenizer_max_length", None)
        ids, mask = tokenize(tokenizers["tokenizer"], prompts, length, with_mask=True)
        use_mask = getattr(args, "text_encoder_use_attention_mask", False)
        mask = mask.to(self.device) if use_mask else None
        return {"prompt_embeds": encoders["text_encoder"](ids.to(self.device), attention_mask=mask)[0]}

    def predict(self, denoiser: Any, noised: Noised, cond, batch, args) -> torch.Tensor:
        pred = denoiser(noised.noisy, noised.timesteps, cond["prompt_embeds"], return_dict=False)[0]
        if pred.shape[1] == 2 * noised.noisy.shape[1]:  # learned variance: train the mean only
            pred = pred[:, : noised.noisy.shape[1]]
        return pred
