"""The DreamBooth DeLoRA run: checks, data, models, the accelerate loop, checkpoints, outputs.

Order matters for the user: every check that can fail on a flag or a folder runs before any model loads, and
the final adapter is written before the (slower) final validation, each file atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DeLoRAConfig
from ..model import delora_parameters, inject_delora, iter_delora_layers
from ..targets import PRESETS
from . import checkpointing, data, distributed
from .args import resolve_embedded
from .families import Family, inspect_model, load_component
from .model_card import write_model_card
from .util import TrainingConfigError, TrainingDiverged, atomic_write_text, is_installed, require
from .validation import build_pipeline, generate, run_validation, save_image

logger = logging.getLogger("delora_diffusion.training")

MAX_BAD_STEPS = 5
"""Consecutive non-finite losses after which the run stops."""
HEALTH_EVERY = 10
"""Optimizer steps between recomputing mean |dW|/|W| (it needs every layer's dW)."""
ADAPTER_NAME = "default"


@dataclass
class TrainResult:
    """What a finished run leaves: where, how far, and the trained (unwrapped) models."""

    output_dir: Path
    adapter_path: Path | None
    global_step: int
    skipped_steps: int
    adapted: dict[str, nn.Module] = field(default_factory=dict)


# --- checks before any model loads -------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    """Flag checks that need no model; each failure is a TrainingConfigError naming the flag."""
    if args.instance_data_dir is None:
        raise TrainingConfigError("--instance_data_dir is required with --pretrained_model_name_or_path.")
    if not args.instance_prompt:
        raise TrainingConfigError('--instance_prompt is required (e.g. "a photo of sks dog").')
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise TrainingConfigError(
                "--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')."
            )
        if not args.class_data_dir:
            raise TrainingConfigError(
                "--with_prior_preservation needs --class_data_dir (created if missing)."
            )
    if args.extra_validation_prompts and not args.validation_prompt:
        raise TrainingConfigError(
            "--extra_validation_prompts needs --validation_prompt (the final validation)."
        )
    for flag in ("train_batch_size", "gradient_accumulation_steps", "repeats", "num_train_epochs", "rank"):
        if getattr(args, flag) < 1:
            raise TrainingConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise TrainingConfigError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise TrainingConfigError("--checkpoints_total_limit must be at least 1.")
    if not 0.0 <= args.delora_module_dropout < 1.0:
        raise TrainingConfigError("--delora_module_dropout must be in [0, 1).")
    if args.use_8bit_adam:
        if args.optimizer != "adamw":
            raise TrainingConfigError("--use_8bit_adam works with --optimizer adamw only.")
        require("bitsandbytes", "--use_8bit_adam")
    if args.optimizer == "prodigy":
        require("prodigyopt", "--optimizer prodigy")
    args.report_to = resolve_report_to(args.report_to)
    distributed.check_args(args)
    checkpointing.resolve_resume(args.resume_from_checkpoint, args.output_dir)


def resolve_report_to(report_to: str | None) -> str | None:
    """Tensorboard by default when installed; a named tracker that is missing is an error."""
    if report_to is None:
        if is_installed("tensorboard") or is_installed("tensorboardX"):
            return "tensorboard"
        logger.info(
            "tensorboard is not installed: metrics go to the progress bar only (pip install tensorboard)."
        )
        return None
    if report_to == "none":
        return None
    for name in ["tensorboard", "wandb"] if report_to == "all" else [report_to]:
        if name == "tensorboard" and not is_installed("tensorboardX"):
            require("tensorboard", "--report_to tensorboard")
        elif name == "wandb":
            require("wandb", "--report_to wandb")
    return report_to


def check_model(args: argparse.Namespace, family: Family) -> None:
    """Family defaults (resolution, sequence length) and the resolution / VAE check."""
    if args.resolution is None:
        args.resolution = family.default_resolution
    if args.max_sequence_length is None:
        args.max_sequence_length = family.default_max_sequence_length
    multiple = family.pixel_multiple()
    if args.resolution < multiple or args.resolution % multiple:
        extra = " (VAE factor x 2 for Flux's latent packing)" if family.latent_multiple > 1 else ""
        raise TrainingConfigError(
            f"--resolution {args.resolution} is not divisible by {multiple}, the VAE downsampling factor{extra} "
            f"of this {family.name} model. Use e.g. {max(multiple, args.resolution // multiple * multiple)}."
        )


def training_args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as JSON-safe values, with local paths resolved (recorded in the adapter's metadata)."""
    record = {}
    for key, value in sorted(vars(args).items()):
        if key in ("local_rank",):
            continue
        if key in ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "output_dir"):
            if value is not None and Path(value).exists():
                value = str(Path(value).resolve())
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[key] = value
        else:
            record[key] = str(value)
    return record


# --- models ------------------------------------------------------------------------------------------------


def load_models(family: Family, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    """Tokenizers, text encoders, VAE and denoiser: frozen, in eval mode, on `device` in `dtype`."""
    components: dict[str, Any] = {}
    for name in family.tokenizers:
        components[name] = load_component(family.info, name, args)
    for name in (*family.text_encoders, "vae", family.denoiser):
        model = load_component(family.info, name, args, dtype)
        if model is None:
            if name in (family.denoiser, "vae", family.text_encoders[0]):
                raise TrainingConfigError(f"The model {family.info.path!r} has no {name!r} component.")
            components[name] = None
            continue
        model.requires_grad_(False).eval()
        components[name] = model.to(device, dtype=dtype)
    return components


def denoiser_targets(value: str | None) -> list[str] | str | None:
    """--delora_targets: a preset name, a comma list of suffixes / patterns, or None for the model's preset."""
    if value is None or value in PRESETS:
        return value
    return [part.strip() for part in value.split(",") if part.strip()]


def inject_adapters(family: Family, components: dict, args: argparse.Namespace) -> dict[str, nn.Module]:
    """DeLoRA on the denoiser (and the trainable CLIP text encoders with --train_text_encoder)."""
    common = {
        "rank": args.rank,
        "lambda_init": args.delora_lambda,
        "init": args.delora_init,
        "module_dropout": args.delora_module_dropout,
    }
    adapted = {family.denoiser: components[family.denoiser]}
    try:
        inject_delora(
            adapted[family.denoiser],
            DeLoRAConfig(target_modules=denoiser_targets(args.delora_targets), **common),
            ADAPTER_NAME,
        )
    except ValueError as err:
        raise TrainingConfigError(f"--delora_targets: {err}") from None
    if args.train_text_encoder:
        for name in family.trainable_text_encoders:
            if components.get(name) is not None:
                inject_delora(components[name], DeLoRAConfig(**common), ADAPTER_NAME)
                adapted[name] = components[name]
    return adapted


def make_optimizer(
    args: argparse.Namespace, family: Family, adapted: dict[str, nn.Module]
) -> torch.optim.Optimizer:
    """A/B and lambda in separate groups (lambda has its own learning rate and no weight decay)."""
    groups = []
    for name, model in adapted.items():
        is_denoiser = name == family.denoiser
        lr = args.learning_rate if is_denoiser else args.text_encoder_lr
        decay = args.adam_weight_decay if is_denoiser else args.adam_weight_decay_text_encoder
        for group in delora_parameters(model, ADAPTER_NAME, lr=lr, lambda_lr=args.delora_lambda_lr):
            group["weight_decay"] = 0.0 if group["name"] == "delora_lambda" else decay
            groups.append(group)
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "prodigy":
        prodigyopt = require("prodigyopt", "--optimizer prodigy")
        if args.learning_rate < 0.1:
            logger.warning("Prodigy adapts the step size itself; --learning_rate around 1.0 is usual.")
        return prodigyopt.Prodigy(groups, betas=betas, beta3=args.prodigy_beta3, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        bnb = require("bitsandbytes", "--use_8bit_adam")
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=args.adam_epsilon)
    return torch.optim.AdamW(groups, betas=betas, eps=args.adam_epsilon)


# --- prior preservation ------------------------------------------------------------------------------------


def prepare_class_images(
    accelerator: Any, family: Family, components: dict, args: argparse.Namespace, dtype: torch.dtype
) -> list[data.Example]:
    """Generate the class images that are missing (in batches, reusing existing ones), then read them."""
    class_dir = Path(args.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
        existing = len(data.list_images(class_dir))
        missing = args.num_class_images - existing
        if missing > 0:
            logger.info("Generating %d class images for %r in %s", missing, args.class_prompt, class_dir)
            precision = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
            gen_dtype = precision.get(args.prior_generation_precision, dtype)
            if gen_dtype != dtype:
                gen_components = load_models(family, args, gen_dtype, accelerator.device)
            else:
                gen_components = components
            pipe = build_pipeline(family, gen_components, args, gen_dtype)
            seed = args.seed if args.seed is not None else 0
            done = 0
            with tqdm(total=missing, desc="Class images") as bar:
                while done < missing:
                    n = min(args.sample_batch_size, missing - done)
                    images = generate(pipe, family, args.class_prompt, args, n, seed + existing + done)
                    for image in images:
                        save_image(image, free_name(class_dir, existing + done))
                        done += 1
                    bar.update(n)
            del pipe
    accelerator.wait_for_everyone()
    classes = data.read_examples(class_dir, args.class_prompt, args.resolution, "", what="class")
    if not classes:
        raise TrainingConfigError(f"No usable class image in {str(class_dir)!r}.")
    return classes[: args.num_class_images]


def free_name(folder: Path, index: int) -> Path:
    """``class-<index>.png``, or the next index whose file does not exist yet (never overwrite)."""
    while (folder / f"class-{index:05d}.png").exists():
        index += 1
    return folder / f"class-{index:05d}.png"


# --- the run -----------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
    )
    # Module dropout skips whole layers, so some adapter parameters can go unused in a step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=args.delora_module_dropout > 0)
    # Under torchrun on a machine without a GPU, accelerate only sets up multi-process CPU (gloo) DDP when
    # asked for the CPU explicitly; otherwise every process would train alone.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_ddp,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=project,
        kwargs_handlers=[ddp],
    )


def setup_logging(accelerator: Any) -> None:
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger("delora_diffusion").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def adapter_health(adapted: dict[str, nn.Module]) -> float:
    """Mean |dW|/|W| over every adapted layer: DeLoRA's own training-health signal.

    |W| comes from the frozen column norms (|W|_F = |w|), not the layer's weight, which FSDP shards.
    """
    with torch.no_grad():
        values = [
            (a.delta_weight().norm() / a.delora_w_norm.float().norm().clamp_min(1e-12)).item()
            for m in adapted.values()
            for *_, a in iter_delora_layers(m, ADAPTER_NAME)
        ]
    return sum(values) / len(values)


def mean_lambda(adapted: dict[str, nn.Module]) -> float:
    values = [
        a.delora_lambda.item() for m in adapted.values() for *_, a in iter_delora_layers(m, ADAPTER_NAME)
    ]
    return sum(values) / len(values)


def save_adapter(path: Path, adapted: dict[str, nn.Module], family: Family, record: dict) -> Path:
    """The loadable adapter file (atomic write by io.save_delora_file), with the flags in its metadata."""
    from ..io import save_delora_file

    return save_delora_file(
        path,
        adapted,
        adapter_name=ADAPTER_NAME,
        base_model=record["pretrained_model_name_or_path"],
        training_args=record,
        pipeline_class=family.info.index.get("_class_name"),
    )


def train(args: argparse.Namespace) -> TrainResult:
    """Run DreamBooth DeLoRA training as configured by :func:`delora_diffusion.training.parse_args`."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from ..io import WEIGHT_NAME

    # 1. Everything that can fail on flags or files, before any model loads.
    args = resolve_embedded(args)
    tracker_requested = args.report_to
    check_args(args)
    info, family = inspect_model(args)
    check_model(args, family)
    instances = data.read_examples(
        args.instance_data_dir, args.instance_prompt, args.resolution, args.caption_extension
    )
    resume_dir = checkpointing.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    record = training_args_record(args)
    base_model = record["pretrained_model_name_or_path"]

    accelerator = make_accelerator(args)
    distributed.check_accelerator(accelerator)
    setup_logging(accelerator)
    distributed.configure(accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning(
            "fp16 on CPU runs without loss scaling (accelerate's GradScaler is for GPUs), so small gradients "
            "can underflow, and CPU half-precision matmuls are slow: --mixed_precision bf16 suits a CPU better."
        )
    logger.info(
        "%s model %s; %d instance image(s); %s", family.name, base_model, len(instances), accelerator.state
    )
    if tracker_requested is None and args.report_to is None:
        logger.info(
            "tensorboard is not installed, so metrics go to the progress bar only (pip install tensorboard)."
        )
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # 2. Models (frozen, in the mixed-precision dtype), class images, then adapters (fp32).
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    components = load_models(family, args, dtype, accelerator.device)
    family.bind(components, accelerator.device)
    classes = (
        prepare_class_images(accelerator, family, components, args, dtype)
        if args.with_prior_preservation
        else None
    )
    adapted = inject_adapters(family, components, args)
    if args.gradient_checkpointing:
        components[family.denoiser].enable_gradient_checkpointing()
        for name in adapted:
            if name != family.denoiser:
                adapted[name].gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
    noise_scheduler = family.load_noise_scheduler(args)

    # 3. Data. Prompt embeddings are computed once when the text encoders are frozen.
    dataset = data.DreamBoothDataset(
        instances, args.resolution, classes, args.repeats, args.center_crop, args.random_flip
    )
    if args.cache_latents:
        vae = components["vae"]
        with torch.no_grad():
            dataset.cache_latents(
                lambda px: vae.encode(px.to(accelerator.device, dtype)).latent_dist.parameters
            )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=data.collate,
        num_workers=args.dataloader_num_workers,
    )
    tokenizers = {name: components[name] for name in family.tokenizers}
    prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
    if not args.train_text_encoder:
        prompts = {e.prompt for e in dataset.instances} | {e.prompt for e in dataset.classes}
        encoders = {name: components[name] for name in family.text_encoders}
        with torch.no_grad():
            for prompt in sorted(prompts):
                prompt_cache[prompt] = family.encode_prompts(tokenizers, encoders, [prompt], args)

    # 4. Optimizer, schedule, accelerate.
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        args.text_encoder_lr *= factor
        args.delora_lambda_lr *= factor
    optimizer = make_optimizer(args, family, adapted)
    loader = accelerator.prepare(loader)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    names = list(adapted)
    distributed.prepare(accelerator, adapted[family.denoiser], args)
    prepared = accelerator.prepare(*[adapted[n] for n in names], optimizer, lr_scheduler)
    wrapped = dict(zip(names, prepared[: len(names)]))
    optimizer, lr_scheduler = prepared[len(names) :]
    distributed.check_prepared(accelerator, adapted[family.denoiser])
    checkpointing.register_hooks(accelerator, adapted)
    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers(
            "dreambooth-delora", config={k: v for k, v in record.items() if v is not None}
        )

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_dir is not None:
        logger.info("Resuming from %s", resume_dir)
        accelerator.load_state(str(resume_dir))
        global_step = checkpointing.checkpoint_step(resume_dir)
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    def export_adapter(checkpoint_dir: Path) -> None:
        save_adapter(checkpoint_dir / WEIGHT_NAME, adapted, family, {**record, "global_step": global_step})

    # 5. The loop.
    trainable = [wrapped[n] for n in names]
    adapter_params = [p for m in trainable for p in m.parameters() if p.requires_grad]
    encoders = {name: wrapped.get(name, components[name]) for name in family.text_encoders}
    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    bad_in_window, bad_in_row, skipped = False, 0, 0
    relative = 0.0
    last_loss = float("nan")
    for epoch in range(first_epoch, num_epochs):
        for model in trainable:
            model.train()
        epoch_loader = loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
        for batch in epoch_loader:
            with accelerator.accumulate(*trainable):
                loss = compute_loss(
                    family,
                    wrapped[family.denoiser],
                    noise_scheduler,
                    batch,
                    args,
                    dtype,
                    components,
                    tokenizers,
                    encoders,
                    prompt_cache,
                )
                finite = bool(torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all())
                bad_in_window |= not finite
                if finite:
                    last_loss = loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if bad_in_window:
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        distributed.average_gradients(accelerator, adapter_params)
                        # Every parameter of the model(s), so accelerate's FSDP branch recognises the model
                        # (frozen ones have no gradient and do not count).
                        everything = [p for m in trainable for p in m.parameters()]
                        accelerator.clip_grad_norm_(everything, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if bad_in_window:
                bad_in_window = False
                bad_in_row += 1
                skipped += 1
                logger.warning(
                    "Non-finite loss at step %d: update skipped (%d in a row).", global_step + 1, bad_in_row
                )
                if bad_in_row >= MAX_BAD_STEPS:
                    progress.close()
                    last = checkpointing.list_checkpoints(output_dir)
                    raise TrainingDiverged(
                        f"Training stopped at step {global_step}: the loss was non-finite (NaN or inf) for "
                        f"{MAX_BAD_STEPS} steps in a row. Lower --learning_rate / --delora_lambda_lr or "
                        f"--delora_lambda, or try --mixed_precision bf16 instead of fp16. Last good checkpoint: "
                        f"{last[-1] if last else 'none'} (left intact)."
                    )
                continue
            bad_in_row = 0
            global_step += 1
            if global_step % HEALTH_EVERY == 1 or global_step == args.max_train_steps:
                relative = adapter_health(adapted)
            lam = mean_lambda(adapted)
            logs = {"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0], "lambda": lam, "dW/W": relative}
            progress.update(1)
            progress.set_postfix(
                loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}", lam=f"{lam:.3f}", dWW=f"{relative:.2e}"
            )
            accelerator.log({**logs, "skipped_steps": skipped}, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                checkpointing.save_checkpoint(
                    accelerator, output_dir, global_step, args.checkpoints_total_limit, export_adapter
                )
            if args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0:
                validate(
                    accelerator, family, components, adapted, args, dtype, f"step-{global_step}", global_step
                )
            if global_step >= args.max_train_steps:
                break
        if (
            args.validation_prompt
            and args.validation_epochs
            and (epoch + 1) % args.validation_epochs == 0
            and global_step < args.max_train_steps
        ):
            validate(accelerator, family, components, adapted, args, dtype, f"epoch-{epoch + 1}", global_step)
        if global_step >= args.max_train_steps:
            break
    progress.close()

    # 6. Outputs: the adapter first (atomic), then validation grids and the model card.
    accelerator.wait_for_everyone()
    adapter_path = None
    if accelerator.is_main_process:
        adapter_path = save_adapter(
            output_dir / WEIGHT_NAME, adapted, family, {**record, "global_step": global_step}
        )
        logger.info("Saved the adapter to %s", adapter_path)
    grids: dict[str, Path] = {}
    if args.validation_prompt:
        grids = validate(
            accelerator, family, components, adapted, args, dtype, "final", global_step, sweep=True
        )
    if accelerator.is_main_process:
        pipeline_class = info.index.get("_class_name", "DiffusionPipeline")
        write_model_card(args, pipeline_class, base_model, output_dir, grids, global_step)
        atomic_write_text(output_dir / "training_args.json", json.dumps(record, indent=2) + "\n")
        if skipped:
            logger.warning("%d step(s) were skipped for non-finite losses.", skipped)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    for tmp in output_dir.glob("checkpoint-*.tmp"):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    return TrainResult(output_dir, adapter_path, global_step, skipped, adapted)


def validate(
    accelerator: Any,
    family: Family,
    components: dict,
    adapted: dict[str, nn.Module],
    args: argparse.Namespace,
    dtype: torch.dtype,
    name: str,
    step: int,
    sweep: bool = False,
) -> dict[str, Path]:
    """Validation images from the main process (every process generates under FSDP; only the main one writes)."""
    main = accelerator.is_main_process
    if not (main or distributed.runs_on_every_process(accelerator)):
        return {}
    models = list(adapted.values())
    return run_validation(
        family, components, models, args, dtype, name, accelerator.trackers, step, sweep=sweep, save=main
    )


def compute_loss(
    family: Family,
    denoiser: nn.Module,
    noise_scheduler: Any,
    batch: dict,
    args: argparse.Namespace,
    dtype: torch.dtype,
    components: dict,
    tokenizers: dict,
    encoders: dict,
    prompt_cache: dict,
) -> torch.Tensor:
    """Noise the batch, run the denoiser, and take the (weighted, prior-preserving) MSE."""
    if "latent_params" in batch:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # The posterior mean, not a sample: real SD/SDXL/SD3/Flux VAEs have a near-zero posterior std, so
        # this changes nothing there; the embedded VAE's std is large and its base model was trained on means.
        latents = DiagonalGaussianDistribution(batch["latent_params"]).mode()
    else:
        with torch.no_grad():
            latents = components["vae"].encode(batch["pixel_values"].to(dtype)).latent_dist.mode()
    latents = family.scale_latents(latents).to(dtype)
    prompts = batch["prompts"]
    if prompt_cache:
        cond = {k: torch.cat([prompt_cache[p][k] for p in prompts]) for k in prompt_cache[prompts[0]]}
    else:
        cond = family.encode_prompts(tokenizers, encoders, prompts, args)
    noised = family.noise(noise_scheduler, latents, args)
    pred = family.predict(denoiser, noised, cond, batch, args)
    error = (pred.float() - noised.target.float()) ** 2
    if noised.weight is not None:
        weight = noised.weight.float()
        error = error * weight.reshape(-1, *([1] * (error.ndim - 1))) if weight.ndim == 1 else error * weight
    per_example = error.reshape(error.shape[0], -1).mean(dim=1)
    n = batch["num_instance"]
    loss = per_example[:n].mean()
    if per_example.shape[0] > n:
        loss = loss + args.prior_loss_weight * per_example[n:].mean()
    return loss
