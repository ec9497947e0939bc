"""Flags of diffusers' ``train_dreambooth_lora{,_sdxl,_sd3,_flux}.py`` that need more than a name.

Every flag of those scripts parses here (see ``docs/TRAINING.md``). Most mean the same thing; the few that
cannot apply to DeLoRA are refused with a message naming what to use instead, and the ones that map onto
DeLoRA flags (``--lora_layers``, ``--lora_blocks``) are translated. All of it runs right after parsing,
before any model loads.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from .util import TrainingConfigError, is_installed

logger = logging.getLogger(__name__)

REFUSED: dict[str, str] = {
    "use_dora": "DoRA rescales the columns of W + dW; DeLoRA already decouples the update's direction "
    "(A, B) from its strength, a learnable lambda per layer. Drop --use_dora; bound the strength with "
    "--delora_relative_bound (every layer keeps |dW| <= rho |W|; lambda's learning rate: --delora_lambda_lr).",
    "lora_alpha": "DeLoRA has no alpha: each layer's strength is its learnable lambda, bounded by "
    "--delora_relative_bound (|dW| <= rho |W| per layer). For an absolute initial lambda instead, use "
    "--delora_lambda (alpha/rank in LoRA terms is lambda/rank here).",
    "lora_dropout": "DeLoRA's normalisation divides by the norms of A's rows, so input dropout on the "
    "adapter path would change them per step. Use --delora_module_dropout (drops a whole layer's update).",
    "validation_images": "it feeds image-conditioned pipelines (image variation, upscalers); this script "
    "trains text-to-image models. Use --validation_prompt (and --extra_validation_prompts).",
    "class_labels_conditioning": "it is for UNets with class-label embeddings (DeepFloyd IF stage II), "
    "which this script does not train; pass an SD1.x/2.x, SDXL, SD3 or Flux pipeline as "
    "--pretrained_model_name_or_path.",
    "do_edm_style_training": "EDM-style preconditioning (Playground v2.5) is not implemented; SDXL trains "
    "with its scheduler's epsilon / v objective (--snr_gamma for min-SNR weighting).",
}
"""diffusers flags that cannot apply to DeLoRA, with what to use instead."""

NO_OP_VALUES: dict[str, Any] = {"lora_dropout": 0.0, "use_dora": False}
"""Values of refused flags that change nothing (diffusers' defaults): accepted silently."""


def refuse_inapplicable(args: argparse.Namespace) -> None:
    """A refused flag with a value that would change training is an error naming our equivalent."""
    for flag, why in REFUSED.items():
        value = getattr(args, flag, None)
        if value is None or (flag in NO_OP_VALUES and value == NO_OP_VALUES[flag]):
            continue
        raise TrainingConfigError(f"--{flag} does not apply to DeLoRA: {why}")


def lora_layer_targets(lora_layers: str | None, lora_blocks: str | None) -> str | None:
    """``--lora_layers`` / ``--lora_blocks`` (diffusers' SD3 / Flux) as a ``--delora_targets`` comma list.

    ``--lora_layers "attn.to_k,attn.to_q"`` are module-name suffixes, as ours; ``--lora_blocks "0,12"``
    limits them to ``transformer_blocks.<i>`` (with the SD3 preset's layers when no ``--lora_layers``).
    """
    if not lora_layers and not lora_blocks:
        return None
    from ..targets import PRESETS

    layers = [re.escape(x.strip()) for x in (lora_layers or "").split(",") if x.strip()]
    layers = layers or PRESETS["sd3"]
    if not lora_blocks:
        return ",".join(layers)
    try:
        blocks = [int(b) for b in lora_blocks.split(",") if b.strip()]
    except ValueError:
        raise TrainingConfigError(
            f'--lora_blocks takes block indices like "0,12", got {lora_blocks!r}.'
        ) from None
    return ",".join(rf"transformer_blocks\.{b}\.(.*\.)?(?:{layer})" for b in blocks for layer in layers)


def apply_diffusers_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse, translate and cross-check diffusers-named flags (after parsing, before any model loads)."""
    refuse_inapplicable(args)
    mapped = lora_layer_targets(args.lora_layers, args.lora_blocks)
    if mapped is not None:
        if args.delora_targets is not None:
            raise TrainingConfigError(
                "--lora_layers / --lora_blocks and --delora_targets both choose the adapted layers; pass one."
            )
        args.delora_targets = mapped
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        raise TrainingConfigError(
            "--pre_compute_text_embeddings cannot be used with --train_text_encoder (as in diffusers)."
        )
    if args.upcast_before_saving:
        logger.info("--upcast_before_saving: adapters are always trained and saved in float32.")
    if args.dataset_name and args.instance_data_dir:
        raise TrainingConfigError("Pass --dataset_name or --instance_data_dir, not both.")
    if not 0.0 <= args.caption_dropout_rate < 1.0:
        raise TrainingConfigError(
            f"--caption_dropout_rate must be in [0, 1), got {args.caption_dropout_rate}."
        )
    return args


def enable_attention_backends(denoiser: Any, args: argparse.Namespace) -> None:
    """``--enable_xformers_memory_efficient_attention`` / ``--enable_npu_flash_attention`` on the denoiser."""
    if getattr(args, "enable_xformers_memory_efficient_attention", False):
        if not is_installed("xformers"):
            raise TrainingConfigError(
                "--enable_xformers_memory_efficient_attention needs xformers, which is not installed "
                "(pip install xformers, matching your torch and CUDA). PyTorch's own scaled-dot-product "
                "attention, used without the flag, is as memory-efficient on recent torch."
            )
        denoiser.enable_xformers_memory_efficient_attention()
    if getattr(args, "enable_npu_flash_attention", False):
        if not is_installed("torch_npu"):
            raise TrainingConfigError(
                "--enable_npu_flash_attention is for Ascend NPUs and needs torch_npu, which is not installed."
            )
        denoiser.set_attention_backend("_native_npu")


def prodigy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """diffusers' Prodigy options (``--prodigy_decouple`` & co.) as keyword arguments of ``Prodigy``."""
    return {
        "decouple": args.prodigy_decouple,
        "use_bias_correction": args.prodigy_use_bias_correction,
        "safeguard_warmup": args.prodigy_safeguard_warmup,
    }


def str2bool(value: str) -> bool:
    """diffusers parses these with ``type=bool`` (so "False" is true); accept the words a user means."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
