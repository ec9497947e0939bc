"""Tiny diffusers pipelines of every family, built in code and saved with ``save_pretrained``: no download.

Each ``make_*_pipeline(path)`` writes a complete pipeline directory (loadable with ``from_pretrained``) and
returns ``path``. They are seeded, so two calls give the same weights. Sizes are the smallest that keep every
code path of the real models (cross-attention, joint attention, pooled projections, text-time embeddings):
a two-step generation at 32x32 (Flux: 16x16) takes well under a second on a CPU.

Helpers for tests:
- :func:`load_pipeline` loads one back (the family's ``from_pretrained``), on CPU, in fp32.
- :func:`run` generates a small image batch as a numpy array with a fixed seed.
- :func:`perturb_delora` makes a freshly injected DeLoRA adapter non-trivial, as training would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Tokenizers: CLIP's byte-level BPE over the 256 byte symbols (no merges needed), and a T5 Unigram over
# printable characters. Every text tokenizes; the vocabularies fit the tiny text encoders.
CLIP_VOCAB_SIZE = 1000
T5_VOCAB_SIZE = 200
MAX_LENGTH = 77

GENERATION: dict[str, dict[str, Any]] = {
    "sd": {"height": 32, "width": 32},
    "sdxl": {"height": 32, "width": 32},
    "sd3": {"height": 32, "width": 32, "max_sequence_length": 16},
    "flux": {"height": 16, "width": 16, "max_sequence_length": 16},
}
"""Call arguments that suit each family's tiny pipeline."""


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def clip_tokenizer():
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + chr(c), -2.5) for c in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_LENGTH)


def _clip_config(with_projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_LENGTH,
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_act="gelu",
    )


def _clip(with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config()).eval()


def _t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int = 4, blocks: int = 2, flow: bool = False):
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = {}
    if flow:  # SD3 / Flux VAEs: shifted latents, no quant convs
        kwargs = {"shift_factor": 0.0609, "scaling_factor": 1.5035, "use_quant_conv": False}
        kwargs["use_post_quant_conv"] = False
    return AutoencoderKL(
        block_out_channels=[8] * blocks,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=32,
        **kwargs,
    ).eval()


def _save(pipe, path: str | Path) -> Path:
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_sd_pipeline(path: str | Path, seed: int = 0) -> Path:
    """StableDiffusionPipeline: UNet (one cross-attention down/up block), one CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=_clip(),
        tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _save(pipe, path)


def make_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """StableDiffusionXLPipeline: text-time UNet, CLIPTextModel + CLIPTextModelWithProjection."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=_clip(),
        text_encoder_2=_clip(with_projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True,
    )
    return _save(pipe, path)


def make_sd3_pipeline(path: str | Path, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline: one-block MMDiT, two CLIPs with projection and a T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_vae(flow=True),
        text_encoder=_clip(with_projection=True),
        text_encoder_2=_clip(with_projection=True),
        text_encoder_3=_t5(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _save(pipe, path)


def make_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """FluxPipeline: one double and one single block, CLIPTextModel (pooled) and a T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer,
        vae=_vae(latent_channels=4, flow=True),
        text_encoder=_clip(),
        text_encoder_2=_t5(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _save(pipe, path)


MAKERS = {
    "sd": make_sd_pipeline,
    "sdxl": make_sdxl_pipeline,
    "sd3": make_sd3_pipeline,
    "flux": make_flux_pipeline,
}
FAMILIES = tuple(MAKERS)


def load_pipeline(path: str | Path, pipeline_class: Any = None):
    """Load a saved tiny pipeline (default: the class recorded in its model_index.json) on CPU in fp32."""
    from diffusers import DiffusionPipeline

    cls = pipeline_class or DiffusionPipeline
    pipe = cls.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of(pipe) -> str:
    name = json.loads((Path(pipe.name_or_path) / "model_index.json").read_text())["_class_name"]
    return {
        "StableDiffusionPipeline": "sd",
        "StableDiffusionXLPipeline": "sdxl",
        "StableDiffusion3Pipeline": "sd3",
        "FluxPipeline": "flux",
    }[name]


def run(
    pipe, family: str | None = None, seed: int = 0, prompt: str = "a photo of sks dog", **kwargs
) -> np.ndarray:
    """Two denoising steps with a fixed seed; returns the images as a float numpy array in [0, 1]."""
    args = dict(GENERATION[family or family_of(pipe)])
    args.update(kwargs)
    args.setdefault("num_inference_steps", 2)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt, generator=generator, output_type="np", **args).images


def perturb_delora(
    model: torch.nn.Module, adapter_name: str = "default", seed: int = 0, std: float = 0.5
) -> None:
    """Move a freshly injected adapter away from its start (as training would), so its update is non-zero."""
    from delora_diffusion import iter_delora_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, adapter in iter_delora_layers(model, adapter_name):
            for param in (adapter.delora_A, adapter.delora_B):
                noise = torch.randn(param.shape, generator=generator) * std * param.abs().mean()
                param.add_(noise.to(param.dtype))
