"""SD3: two CLIPs and a T5 feeding an MMDiT, trained with flow matching."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Family, FlowObjective, Noised, clip_encode, tokenize


class StableDiffusion3(FlowObjective, Family):
    name = "sd3"
    pipeline_classes = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    )
    denoiser = "transformer"
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # the T5 stays frozen, as in diffusers
    default_resolution = 1024
    default_max_sequence_length = 77

    def encode_prompts(self, tokenizers, encoders, prompts, args) -> dict[str, torch.Tensor]:
        states, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            hidden, pool = clip_encode(encoders[enc], tokenize(tokenizers[tok], prompts).to(self.device))
            states.append(hidden)
            pooled.append(pool)
        clip_states = torch.cat(states, dim=-1)
        length = args.max_sequence_length
        if encoders.get("text_encoder_3") is not None:
            ids = tokenize(tokenizers["tokenizer_3"], prompts, length).to(self.device)
            t5_states = encoders["text_encoder_3"](ids)[0]
        else:  # pipelines saved without T5 condition on zeros there
            t5_states = clip_states.new_zeros(
                len(prompts), length, self.config("transformer").joint_attention_dim
            )
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def noise(self, scheduler: Any, latents: torch.Tensor, args) -> Noised:
        noised = super().noise(scheduler, latents, args)
        if getattr(args, "precondition_outputs", 0):
            noised.target = latents  # diffusers' SD3 default: regress the denoised latents
        return noised

    def predict(self, denoiser: Any, noised: Noised, cond, batch, args) -> torch.Tensor:
        pred = denoiser(
            hidden_states=noised.noisy,
            timestep=noised.timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        if getattr(args, "precondition_outputs", 0):
            pred = pred * (-noised.extra["sigmas"]) + noised.noisy  # x_t - sigma * v = the denoised latents
        return pred

    def pipeline_kwargs(self, args) -> dict[str, Any]:
        return {"max_sequence_length": args.max_sequence_length}
