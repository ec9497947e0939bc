"""SDXL: two CLIP text encoders (penultimate states concatenated, pooled from the second) and size time ids."""

from __future__ import annotations

from typing import Any

import torch

from .base import DDPMObjective, Family, Noised, clip_encode, tokenize


class StableDiffusionXL(DDPMObjective, Family):
    name = "sdxl"
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    default_resolution = 1024

    def encode_prompts(self, tokenizers, encoders, prompts, args) -> dict[str, torch.Tensor]:
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            hidden, pooled = clip_encode(encoders[enc], tokenize(tokenizers[tok], prompts).to(self.device))
            states.append(hidden)
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, denoiser: Any, noised: Noised, cond, batch, args) -> torch.Tensor:
        # (original h, w) + (crop top, left) + (target h, w): the target is the bucket with --enable_bucket.
        targets = batch.get("target_sizes") or [(args.resolution, args.resolution)] * len(
            batch["original_sizes"]
        )
        time_ids = torch.tensor(
            [
                tuple(o) + tuple(c) + tuple(t)
                for o, c, t in zip(batch["original_sizes"], batch["crops_top_left"], targets)
            ],
            device=noised.noisy.device,
            dtype=cond["prompt_embeds"].dtype,
        )
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids}
        return denoiser(
            noised.noisy, noised.timesteps, cond["prompt_embeds"], added_cond_kwargs=added, return_dict=False
        )[0]
