"""The DreamBooth DeLoRA run as named phases: setup, models and adapters, data, optimizer, resume, steps, outputs.

Order matters for the user: every check that can fail on a flag or a folder runs before any model loads
(:mod:`.checks`), and the final adapter is written before the (slower) final validation, each file
atomically (:mod:`.outputs`). The step loop and its divergence guard are in :mod:`.steps`; checkpoints in
:mod:`.checkpointing`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DeLoRAConfig
from ..model import delora_parameters, inject_delora
from ..targets import PRESETS
from ..util import dtype_from_name
from . import buckets, checkpointing, data, distributed, sources
from .args import resolve_embedded
from .checks import check_args, check_model, training_args_record
from .compat import enable_attention_backends, prodigy_kwargs
from .families import Family, ModelInfo, inspect_model, load_component
from .outputs import TrainResult, write_outputs
from .steps import ADAPTER_NAME, StepState, train_steps
from .util import TrainingConfigError, remove_stale_temp_files, require
from .validation import build_pipeline, generate, save_image

logger = logging.getLogger("delora_diffusion.training")

__all__ = ["Run", "TrainResult", "train"]


@dataclass
class Run:
    """Everything the phases of one run share, filled in phase by phase."""

    args: argparse.Namespace
    info: ModelInfo
    family: Family
    instances: list[data.Example]
    record: dict[str, Any]  # the flags with full local paths: training_args.json only
    shared_record: dict[str, Any]  # without local paths: adapter metadata and model card
    accelerator: Any = None
    classes: list[data.Example] | None = None  # prior preservation
    output_dir: Path = Path(".")
    dtype: torch.dtype = torch.float32
    components: dict[str, Any] = field(default_factory=dict)
    adapted: dict[str, nn.Module] = field(default_factory=dict)  # unwrapped, what is saved
    wrapped: dict[str, nn.Module] = field(default_factory=dict)  # as accelerate prepared them
    adapter_params: list[nn.Parameter] = field(default_factory=list)
    noise_scheduler: Any = None
    loader: Any = None
    tokenizers: dict[str, Any] = field(default_factory=dict)
    prompt_cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer: Any = None
    lr_scheduler: Any = None
    steps_per_epoch: int = 1
    num_epochs: int = 1
    global_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0
    identity: checkpointing.RunIdentity | None = None
    state: StepState = field(default_factory=StepState)


def train(args: argparse.Namespace) -> TrainResult:
    """Run DreamBooth DeLoRA training as configured by :func:`delora_diffusion.training.parse_args`."""
    run = setup(args)
    build_models(run)
    build_data(run)
    build_optimizer(run)
    resume(run)
    train_steps(run)
    return write_outputs(run)


# --- 1. setup: checks before any model loads, then accelerate ----------------------------------------------


def setup(args: argparse.Namespace) -> Run:
    """Checks on flags and files, the Accelerator, logging, seeding, and a clean output dir."""
    from accelerate.utils import set_seed

    args = resolve_embedded(args)
    tracker_requested = args.report_to
    check_args(args)
    info, family = inspect_model(args)
    check_model(args, family)
    instances = sources.read_instances(args)  # --dataset_name or the folder; trigger word; caption warnings
    record = training_args_record(args)
    from ..io import shareable_args

    run = Run(args, info, family, instances, record, shareable_args(record))

    accelerator = run.accelerator = make_accelerator(args)
    distributed.check_accelerator(accelerator)
    setup_logging(accelerator)
    distributed.configure(accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning(
            "fp16 on CPU runs without loss scaling (accelerate's GradScaler is for GPUs), so small gradients "
            "can underflow, and CPU half-precision matmuls are slow: --mixed_precision bf16 suits a CPU better."
        )
    logger.info(
        "%s model %s; %d instance image(s); %s",
        family.name,
        record["pretrained_model_name_or_path"],
        len(instances),
        accelerator.state,
    )
    if tracker_requested is None and args.report_to is None:
        logger.info(
            "tensorboard is not installed, so metrics go to the progress bar only (pip install tensorboard)."
        )
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    run.output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        clean_output_dir(run.output_dir)
    accelerator.wait_for_everyone()
    run.dtype = dtype_from_name(accelerator.mixed_precision)
    return run


def clean_output_dir(output_dir: Path) -> None:
    """What a killed run left: half-replaced checkpoints are completed or undone, temp files deleted."""
    checkpointing.recover(output_dir)
    for folder in (output_dir, output_dir / "validation"):
        remove_stale_temp_files(folder)


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


# --- 2. models and adapters --------------------------------------------------------------------------------


def build_models(run: Run) -> None:
    """Frozen models (in the mixed-precision dtype), class images, then the fp32 adapters."""
    args, family = run.args, run.family
    run.components = components = load_models(family, args, run.dtype, run.accelerator.device)
    family.bind(components, run.accelerator.device)
    enable_attention_backends(components[family.denoiser], args)
    run.classes = prepare_class_images(run) if args.with_prior_preservation else None
    run.adapted = adapted = inject_adapters(family, components, args)
    if args.gradient_checkpointing:
        components[family.denoiser].enable_gradient_checkpointing()
        for name in adapted:
            if name != family.denoiser:
                adapted[name].gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
    run.noise_scheduler = family.load_noise_scheduler(args)


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
        "relative_bound": args.delora_relative_bound,
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


def prepare_class_images(run: Run) -> list[data.Example]:
    """Generate the class images that are missing (in batches, reusing existing ones), then read them."""
    args, accelerator = run.args, run.accelerator
    class_dir = Path(args.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
        existing = len(data.list_images(class_dir))
        missing = args.num_class_images - existing
        if missing > 0:
            generate_class_images(run, class_dir, existing, missing)
    accelerator.wait_for_everyone()
    classes = data.read_examples(class_dir, args.class_prompt, args.resolution, "", what="class")
    if not classes:
        raise TrainingConfigError(f"No usable class image in {str(class_dir)!r}.")
    return classes[: args.num_class_images]


def generate_class_images(run: Run, class_dir: Path, existing: int, missing: int) -> None:
    """`missing` class images from the base model, in batches of --sample_batch_size, never overwriting."""
    args, family = run.args, run.family
    logger.info("Generating %d class images for %r in %s", missing, args.class_prompt, class_dir)
    precision = args.prior_generation_precision
    gen_dtype = run.dtype if precision in (None, "no") else dtype_from_name(precision)
    if gen_dtype != run.dtype:
        components = load_models(family, args, gen_dtype, run.accelerator.device)
    else:
        components = run.components
    pipe = build_pipeline(family, components, args, gen_dtype)
    seed = args.seed if args.seed is not None else 0
    done = 0
    with tqdm(total=missing, desc="Class images") as bar:
        while done < missing:
            n = min(args.sample_batch_size, missing - done)
            for image in generate(pipe, family, args.class_prompt, args, n, seed + existing + done):
                save_image(image, free_name(class_dir, existing + done))
                done += 1
            bar.update(n)
    del pipe


def free_name(folder: Path, index: int) -> Path:
    """``class-<index>.png``, or the next index whose file does not exist yet (never overwrite)."""
    while (folder / f"class-{index:05d}.png").exists():
        index += 1
    return folder / f"class-{index:05d}.png"


# --- 3. data -----------------------------------------------------------------------------------------------


def build_data(run: Run) -> None:
    """The dataset and loader; prompt embeddings are computed once when the text encoders are frozen."""
    args, family, components = run.args, run.family, run.components
    dataset, loader_kwargs = buckets.make_dataset(run.instances, run.classes, args, family.pixel_multiple())
    if args.cache_latents:
        vae, device = components["vae"], run.accelerator.device
        with torch.no_grad():
            dataset.cache_latents(lambda px: vae.encode(px.to(device, run.dtype)).latent_dist.parameters)
    run.loader = torch.utils.data.DataLoader(
        dataset, num_workers=args.dataloader_num_workers, **loader_kwargs
    )
    run.tokenizers = {name: components[name] for name in family.tokenizers}
    if not args.train_text_encoder:
        prompts = {e.prompt for e in dataset.instances} | {e.prompt for e in dataset.classes}
        if args.caption_dropout_rate > 0:
            prompts.add("")  # dropped captions
        encoders = {name: components[name] for name in family.text_encoders}
        with torch.no_grad():
            for prompt in sorted(prompts):
                run.prompt_cache[prompt] = family.encode_prompts(run.tokenizers, encoders, [prompt], args)


# --- 4. optimizer, schedule, accelerate --------------------------------------------------------------------


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
        return prodigyopt.Prodigy(
            groups, betas=betas, beta3=args.prodigy_beta3, eps=args.adam_epsilon, **prodigy_kwargs(args)
        )
    if args.use_8bit_adam:
        bnb = require("bitsandbytes", "--use_8bit_adam")
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=args.adam_epsilon)
    if args.mixed_precision == "fp16":
        # A fused step takes GradScaler's inf check inside the kernel, so it is always "called" and accelerate,
        # which reads a skipped step from an uncalled one, would advance the LR schedule past skipped steps.
        return torch.optim.AdamW(groups, betas=betas, eps=args.adam_epsilon)
    return fused_adamw(groups, betas=betas, eps=args.adam_epsilon)


def fused_adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for every parameter (CPU, CUDA, ...), else the default.

    An adapter is ~3 small tensors per layer (A, B, lambda), so the step is overhead-bound: the default runs a
    Python loop over them on a CPU and several multi-tensor launches on a GPU. The bundled model's 210 tensors
    (benchmarks/optimizer_step.py): 13.6 ms looped, 2.65 ms fused. The update is the same elementwise AdamW."""
    params = [p for group in groups for p in group["params"]]
    # The fused kernel does not move the parameters' version counters; delora_diffusion.optim_versions' hook
    # does (and the training step itself, for DeepSpeed's sake).
    return torch.optim.AdamW(groups, fused=True if _fused_kernel_for(params) else None, **kwargs)


def keep_fused_setting(optimizer: torch.optim.Optimizer) -> None:
    """After loading an optimizer state: the fused setting this run chose, not the saved run's.

    ``load_state_dict`` restores every group's hyperparameters, ``fused`` among them: a checkpoint of an
    unfused run would make this one unfused, and a fused one met where there is no fused kernel would fail
    at the first step. Step counts go where that setting keeps them (the parameter's device when fused)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not isinstance(inner, torch.optim.AdamW) or "fused" not in inner.defaults:
        return
    fused = bool(inner.defaults["fused"])
    for group in inner.param_groups:
        group["fused"] = inner.defaults["fused"]
        for param in group["params"]:
            step = inner.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                inner.state[param]["step"] = step.to(param.device if fused else "cpu", torch.float32)


def _fused_kernel_for(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter: a plain floating-point tensor on a device
    it lists (torch checks only at the first step). Tensor subclasses (DTensor, ...) take the default."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the list: keep its default
        return False
    devices = _get_fused_kernels_supported_devices()
    return all(
        type(p) in (torch.Tensor, nn.Parameter) and p.device.type in devices and p.is_floating_point()
        for p in params
    )


def build_optimizer(run: Run) -> None:
    """Optimizer and LR schedule, everything through accelerate.prepare, checkpoint hooks, trackers."""
    from diffusers.optimization import get_scheduler

    args, accelerator, family, adapted = run.args, run.accelerator, run.family, run.adapted
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        args.text_encoder_lr *= factor
        args.delora_lambda_lr *= factor
    optimizer = make_optimizer(args, family, adapted)
    run.loader = accelerator.prepare(run.loader)
    run.steps_per_epoch = math.ceil(len(run.loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * run.steps_per_epoch
    run.num_epochs = math.ceil(args.max_train_steps / run.steps_per_epoch)
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
    run.wrapped = dict(zip(names, prepared[: len(names)]))
    run.optimizer, run.lr_scheduler = prepared[len(names) :]
    distributed.check_prepared(accelerator, adapted[family.denoiser])
    checkpointing.register_hooks(accelerator, adapted)
    run.adapter_params = [p for m in run.wrapped.values() for p in m.parameters() if p.requires_grad]
    if accelerator.is_main_process and args.report_to:
        config = {k: v for k, v in run.record.items() if v is not None}
        accelerator.init_trackers("dreambooth-delora", config=config)


# --- 5. resume ---------------------------------------------------------------------------------------------


def resume(run: Run) -> None:
    """Tie the run to its checkpoints: a new run id, or the id, state and step of the checkpoint resumed."""
    args, accelerator = run.args, run.accelerator
    shapes = checkpointing.adapter_shapes(run.adapted)
    found = checkpointing.choose_resume(args.resume_from_checkpoint, run.output_dir, shapes)
    run_id = found.run_id if found is not None else checkpointing.RunIdentity.new_run_id()
    run.identity = checkpointing.RunIdentity(run_id, shapes)
    if accelerator.is_main_process:
        checkpointing.warn_other_runs(run.output_dir, run_id)
    if found is None:
        return
    logger.info("Resuming from %s", found.path)
    accelerator.load_state(str(found.path))
    keep_fused_setting(run.optimizer)
    run.global_step = found.step
    run.first_epoch = run.global_step // run.steps_per_epoch
    run.skip_batches = (run.global_step % run.steps_per_epoch) * args.gradient_accumulation_steps
