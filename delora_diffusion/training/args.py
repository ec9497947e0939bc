"""Command-line flags of the DreamBooth DeLoRA script.

Flag names follow diffusers' ``examples/dreambooth/train_dreambooth_lora*.py``, so switching from those scripts
means changing only the script name. DeLoRA adds ``--delora_*`` flags.

With no ``--pretrained_model_name_or_path`` the script trains on the embedded default: the bundled tiny model
and subject, with the hyperparameters in :data:`EMBEDDED_DEFAULTS`. Flags the user passes always win.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from .compat import apply_diffusers_flags, str2bool

logger = logging.getLogger(__name__)

INTERPOLATION_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "box", "hamming", "lanczos")
"""diffusers' --image_interpolation_mode choices (torchvision's names), read with PIL's filters."""

DEFAULT_OUTPUT_DIR = "outputs/dreambooth-delora"

DEFAULT_RELATIVE_BOUND = 0.3
"""rho: every adapted layer keeps |dW|_F <= 0.3 |W|_F (benchmarks/RESULTS.md, "Relative bound"). Unlike an
absolute lambda it means the same on every layer width, so it carries from the bundled model to real ones."""

# The default run (no flags): the bundled 64x64 model and subject. Tuned to finish in a few minutes on a
# 2-core CPU. Change the embedded default's hyperparameters here, and only here.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "resolution": 64,
    "train_batch_size": 4,
    "max_train_steps": 1000,
    "learning_rate": 1e-3,
    "delora_relative_bound": DEFAULT_RELATIVE_BOUND,
    "delora_lambda_lr": 1e-3,
    "rank": 4,
    # Attention alone learned the subject's shape but not its two colours in 1000 steps; adding the
    # feed-forward layers did (benchmarks/RESULTS.md, "Default run"), for ~20% more step time.
    "delora_targets": "unet-ff",
    "lr_warmup_steps": 0,
    "num_validation_images": 4,
    "validation_inference_steps": 25,
    "validation_guidance_scale": 7.5,  # the bundled model follows prompts best at 7.5
    "checkpointing_steps": 1000,
    "cache_latents": True,
    "seed": 0,
}

EMBEDDED_VALIDATION_BACKGROUND = "pink"
"""The default run validates the subject on this background (one the subject's training images do not use)."""

# Any other model: DeLoRA wants learning rates 10-100x LoRA's (PEFT's advice); lambda 15 as in PEFT's benchmark.
GENERIC_DEFAULTS: dict[str, Any] = {
    "resolution": None,  # the family's native size (SD 512, SDXL / SD3 / Flux 1024)
    "train_batch_size": 4,
    "max_train_steps": None,  # num_train_epochs decides
    "learning_rate": 1e-3,
    "delora_relative_bound": DEFAULT_RELATIVE_BOUND,
    "delora_lambda_lr": None,  # same as --learning_rate
    "rank": 8,
    "lr_warmup_steps": 0,
    "num_validation_images": 4,
    "validation_inference_steps": 25,
    "validation_guidance_scale": None,  # the pipeline's default
    "checkpointing_steps": 500,
    "cache_latents": False,
    "seed": None,
}

LAMBDA_SWEEP = (0.0, 0.5, 1.0, 1.5)
"""lambda scales of the validation sweep grid written at the end of training."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreambooth_delora.py",
        description="DreamBooth with DeLoRA adapters for SD1.x/2.x, SDXL, SD3 and Flux pipelines. "
        "With no flags it trains the bundled tiny model on the bundled subject.",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Diffusers pipeline dir or hub id (default: the bundled tiny model).",
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="Weights variant, e.g. fp16.")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=None, help="Folder of subject images (jpg/png/webp/bmp).")
    g.add_argument("--instance_prompt", default=None, help='E.g. "a photo of sks dog".')
    g.add_argument("--class_data_dir", default=None)
    g.add_argument("--class_prompt", default=None)
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop).")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--repeats", type=int, default=1, help="Repeat the instance images this many times.")
    g.add_argument(
        "--caption_extension",
        default=".txt",
        help="Sidecar caption files (image.png + image.txt) replace the instance prompt; '' turns them off.",
    )
    g.add_argument(
        "--dataset_name",
        default=None,
        help="A Hugging Face dataset instead of --instance_data_dir: a hub id (from the cache) or a local "
        "imagefolder (images + metadata.jsonl / metadata.csv captions). Needs the `datasets` package.",
    )
    g.add_argument(
        "--dataset_config_name", default=None, help="The dataset's config name, if it has several."
    )
    g.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloaded datasets.")
    g.add_argument("--image_column", default="image", help="The dataset column holding the images.")
    g.add_argument(
        "--caption_column",
        default=None,
        help="The dataset column holding per-image captions (default: every image gets --instance_prompt).",
    )
    g.add_argument(
        "--image_interpolation_mode",
        default=None,
        type=str.lower,
        choices=INTERPOLATION_MODES,
        help="Resampling filter for resizing images (default: bicubic).",
    )
    g.add_argument(
        "--trigger_word",
        default=None,
        help="Prepended to captions that lack it (default: the instance prompt's rare token, e.g. 'sks' of "
        "'a photo of sks dog' with --class_prompt 'a photo of dog'); '' turns it off.",
    )
    g.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.0,
        help="Probability of training an instance image on the empty caption (kohya's option).",
    )
    g.add_argument(
        "--enable_bucket",
        action="store_true",
        help="Aspect-ratio buckets (kohya): each image trains at the bucket of about --resolution^2 pixels "
        "nearest its aspect ratio instead of a square crop.",
    )
    g.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side (pixels).")
    g.add_argument(
        "--max_bucket_reso", type=int, default=None, help="Largest bucket side (default: 2x resolution)."
    )
    g.add_argument(
        "--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this (pixels)."
    )

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--sample_batch_size", type=int, default=4)
    g.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None)
    g.add_argument(
        "--num_validation_images",
        type=int,
        default=None,
        help="Images per validation (0: no validation images).",
    )
    g.add_argument("--validation_steps", type=int, default=None, help="Validate every N optimizer steps.")
    g.add_argument("--validation_epochs", type=int, default=None, help="Validate every N epochs.")
    g.add_argument("--validation_inference_steps", type=int, default=None)
    g.add_argument("--validation_guidance_scale", type=float, default=None)
    g.add_argument(
        "--extra_validation_prompts",
        nargs="+",
        default=None,
        help="More prompts for the final validation, e.g. the subject in new contexts: one row each in "
        "validation/prompts.png (with --num_validation_images images per row).",
    )

    g = p.add_argument_group("run and output")
    g.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--checkpointing_steps", type=int, default=None)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument(
        "--resume_from_checkpoint", default=None, help="A checkpoint-N dir, or 'latest' in --output_dir."
    )
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument(
        "--report_to",
        default=None,
        help="tensorboard, wandb, a comma list, all (every installed one) or none (default: tensorboard when "
        "installed, else none). Validation images and the lambda sweep go to each.",
    )
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the output dir to a Hub model repo.")
    g.add_argument("--hub_model_id", default=None, help="The repo (default: the output dir's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`).")
    g.add_argument(
        "--output_kohya_format",
        action="store_true",
        help="Also write pytorch_lora_weights_kohya.safetensors (ComfyUI, A1111).",
    )
    g.add_argument(
        "--license", default=None, help="The model card's license (default: the base model's usual one)."
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)

    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=None, help="For DeLoRA's A and B.")
    g.add_argument("--text_encoder_lr", type=float, default=None, help="Default: --learning_rate.")
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
    )
    g.add_argument("--lr_warmup_steps", type=int, default=None)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting (SD / SDXL).")
    g.add_argument("--optimizer", default="adamw", type=str.lower, choices=["adamw", "prodigy"])
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--prodigy_beta3", type=float, default=None)
    g.add_argument("--prodigy_decouple", type=str2bool, default=True, help="Prodigy: AdamW-style decay.")
    g.add_argument(
        "--prodigy_use_bias_correction", type=str2bool, default=True, help="Prodigy: Adam's bias correction."
    )
    g.add_argument(
        "--prodigy_safeguard_warmup", type=str2bool, default=True, help="Prodigy: safeguard warmup."
    )
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)

    g = p.add_argument_group("model-specific")
    g.add_argument("--train_text_encoder", action="store_true", help="Also adapt the CLIP text encoder(s).")
    g.add_argument(
        "--cache_latents",
        action="store_true",
        default=None,
        help="Encode each image with the VAE once: faster, but images are then center-cropped and never "
        "flipped (random crop and --random_flip are off). On by default for the bundled model only.",
    )
    g.add_argument(
        "--no_cache_latents",
        dest="cache_latents",
        action="store_false",
        help="Encode images every step (keeps random crop and --random_flip).",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix): a model dir or hub id with the VAE at its root.",
    )
    g.add_argument("--tokenizer_name", default=None, help="SD: a tokenizer other than the model's.")
    g.add_argument("--tokenizer_max_length", type=int, default=None, help="SD: tokens per prompt.")
    g.add_argument(
        "--text_encoder_use_attention_mask",
        action="store_true",
        help="SD: pass the tokenizer's attention mask to the text encoder.",
    )
    g.add_argument(
        "--pre_compute_text_embeddings",
        action="store_true",
        help="Accepted for diffusers compatibility: prompt embeddings are always computed once when the text "
        "encoders are frozen.",
    )
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers attention in the denoiser (needs xformers).",
    )
    g.add_argument(
        "--enable_npu_flash_attention", action="store_true", help="Ascend NPU flash attention (torch_npu)."
    )
    g.add_argument(
        "--upcast_before_saving",
        action="store_true",
        help="Accepted for diffusers compatibility: adapters are always saved in float32.",
    )
    g.add_argument(
        "--precondition_outputs",
        type=int,
        default=1,
        choices=[0, 1],
        help="SD3 (diffusers' default 1): regress the denoised latents (EDM-style preconditioning) instead of "
        "the flow velocity.",
    )
    g.add_argument("--rank", type=int, default=None)
    g.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens (SD3 77, Flux 512).")
    g.add_argument(
        "--weighting_scheme",
        default="none",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="Timestep density and loss weighting of flow models (SD3, Flux).",
    )
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--guidance_scale", type=float, default=3.5, help="Flux guidance during training.")

    g = p.add_argument_group("DeLoRA")
    g.add_argument(
        "--delora_relative_bound",
        type=float,
        default=None,
        help=f"rho: every layer keeps |dW| <= rho |W| at every step (default {DEFAULT_RELATIVE_BOUND}).",
    )
    g.add_argument(
        "--delora_lambda",
        type=float,
        default=None,
        help="An absolute initial lambda for every layer instead of --delora_relative_bound (PEFT's way).",
    )
    g.add_argument(
        "--delora_lambda_lr", type=float, default=None, help="Learning rate of lambda (own param group)."
    )
    g.add_argument("--delora_init", choices=["paper", "zero"], default="paper")
    g.add_argument(
        "--delora_targets",
        default=None,
        help="Denoiser targets: a preset (unet, unet-all, sd3, flux, flux-all, ...) or a comma list of "
        "module-name suffixes (default: the model's preset).",
    )
    g.add_argument("--delora_module_dropout", type=float, default=0.0)

    g = p.add_argument_group(
        "diffusers LoRA flags",
        "Translated to DeLoRA (--lora_layers, --lora_blocks) or refused with the equivalent.",
    )
    g.add_argument(
        "--lora_layers", default=None, help='Comma list of module suffixes, e.g. "attn.to_q,attn.to_k".'
    )
    g.add_argument("--lora_blocks", default=None, help='SD3: only these transformer blocks, e.g. "0,12".')
    g.add_argument("--lora_alpha", type=float, default=None, help="Refused: use --delora_lambda.")
    g.add_argument(
        "--lora_dropout", type=float, default=None, help="Refused unless 0: use --delora_module_dropout."
    )
    g.add_argument(
        "--use_dora", action="store_true", help="Refused: DeLoRA decouples direction and strength."
    )
    g.add_argument("--validation_images", nargs="+", default=None, help="Refused: use --validation_prompt.")
    g.add_argument("--class_labels_conditioning", default=None, help="Refused (DeepFloyd IF only).")
    g.add_argument(
        "--do_edm_style_training", action="store_true", default=None, help="Refused (not implemented)."
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags and fill the unset tunables from the embedded or the generic defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.delora_lambda is not None and args.delora_relative_bound is not None:
        parser.error(
            "--delora_lambda and --delora_relative_bound are mutually exclusive: give rho (the same bound on "
            "every layer width) or an absolute lambda, not both."
        )
    absolute_lambda = args.delora_lambda is not None
    args.embedded = args.pretrained_model_name_or_path is None
    cache_given = args.cache_latents is not None
    defaults = EMBEDDED_DEFAULTS if args.embedded else GENERIC_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if absolute_lambda:
        args.delora_relative_bound = None
    if args.delora_lambda_lr is None:
        args.delora_lambda_lr = args.learning_rate
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate
    if args.cache_latents and not cache_given and (args.random_flip or args.enable_bucket):
        # Caching is only a default here; the augmentation the user asked for wins over it.
        logger.info("--random_flip / --enable_bucket given: latent caching (a default) is off for this run.")
        args.cache_latents = False
    return apply_diffusers_flags(args)


def resolve_embedded(args: argparse.Namespace) -> argparse.Namespace:
    """Point the model, data and prompts at the bundled default where the user gave none."""
    if not args.embedded:
        return args
    from ..embedded import default_model_path, default_subject
    from ..embedded.subjects import write_subjects

    model = default_model_path()
    if not (model / "model_index.json").is_file():
        from .util import TrainingConfigError

        raise TrainingConfigError(
            f"The bundled model is missing from {model}. Build it with "
            "`python train_scripts/train_embedded_base.py`, or pass --pretrained_model_name_or_path."
        )
    args.pretrained_model_name_or_path = str(model)
    if args.instance_data_dir is None and not args.dataset_name:
        try:
            subject = default_subject()
        except FileNotFoundError:
            write_subjects()
            subject = default_subject()
        args.instance_data_dir = str(subject.path)
        args.instance_prompt = args.instance_prompt or subject.instance_prompt
        args.class_prompt = args.class_prompt or subject.class_prompt
        if args.validation_prompt is None:
            wanted = f"on a {EMBEDDED_VALIDATION_BACKGROUND} background"
            matching = [p for p in subject.validation_prompts if p.endswith(wanted)]
            args.validation_prompt = (matching or subject.validation_prompts)[0]
        if args.extra_validation_prompts is None:
            args.extra_validation_prompts = subject.validation_prompts  # every background: new contexts
    return args
