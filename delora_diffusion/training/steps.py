"""The step loop: accumulate, update, guard against divergence, log, checkpoint, validate.

The divergence guard watches both the loss and the adapter itself. A non-finite loss skips its update
(after :data:`MAX_BAD_STEPS` in a row the run stops). A finite loss does not prove a healthy adapter: with a
huge learning rate one step can take lambda to 1e27 while the loss is still a number. So the adapter is
checked too (every lambda each step; every layer's norm report every :data:`HEALTH_EVERY` steps and before
every checkpoint), and a non-finite or absurd adapter stops the run before it is saved, so the checkpoint
named as the last good one is one that passed the check.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fastpath import project_lambdas
from ..model import delora_norm_report, iter_delora_layers
from . import checkpointing, distributed
from .families import Family
from .util import TrainingDiverged

if TYPE_CHECKING:
    from .loop import Run

logger = logging.getLogger("delora_diffusion.training")

ADAPTER_NAME = "default"
MAX_BAD_STEPS = 5
"""Consecutive non-finite losses after which the run stops."""
HEALTH_EVERY = 10
"""Optimizer steps between per-layer norm reports (they need every layer's dW)."""
MAX_RELATIVE_BOUND = 1e3
"""A layer whose bound |lambda| max_j w_j exceeds this many times |W|_F has diverged (lambda 15 gives 3-6)."""


@dataclass
class StepState:
    """What the loop carries from step to step."""

    bad_in_window: bool = False
    bad_in_row: int = 0
    skipped: int = 0
    last_loss: float = float("nan")
    relative: float = 0.0


def norm_rows(adapted: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """:func:`delora_norm_report` of every adapted component, each row tagged with its component."""
    return [
        {"component": name, **row}
        for name, model in adapted.items()
        for row in delora_norm_report(model, ADAPTER_NAME)
    ]


def adapter_health(adapted: dict[str, nn.Module], rows: list[dict[str, Any]] | None = None) -> float:
    """Mean |dW|/|W| over every adapted layer: DeLoRA's own training-health signal.

    |W| comes from the frozen column norms (|W|_F = |w|), not the layer's weight, which FSDP shards.
    """
    rows = norm_rows(adapted) if rows is None else rows
    return sum(r["relative_delta"] for r in rows) / len(rows)


def diverged_layer(rows: list[dict[str, Any]]) -> str | None:
    """A description of the first non-finite or absurd layer of a norm report, or None when all are sane."""
    for row in rows:
        values = (row["lambda"], row["delta_norm"], row["bound"], row["relative_bound"])
        if not all(math.isfinite(v) for v in values) or row["relative_bound"] > MAX_RELATIVE_BOUND:
            return (
                f"{row['component']}.{row['layer']} has lambda {row['lambda']:.3g}, a bound of "
                f"{row['relative_bound']:.3g} x |W| (the limit is {MAX_RELATIVE_BOUND:g}) and |dW|/|W| "
                f"{row['relative_delta']:.3g}"
            )
    return None


def lambdas(adapted: dict[str, nn.Module]) -> torch.Tensor:
    return torch.stack(
        [
            a.delora_lambda.detach().float().reshape(())
            for m in adapted.values()
            for *_, a in iter_delora_layers(m, ADAPTER_NAME)
        ]
    )


def mean_lambda(adapted: dict[str, nn.Module]) -> float:
    return lambdas(adapted).mean().item()


def stop(run: Run, step: int, why: str, advice: str) -> TrainingDiverged:
    """The error that ends a diverged run, naming this run's last checkpoint (all passed the guard)."""
    last = checkpointing.list_checkpoints(run.output_dir, run.identity.run_id)
    return TrainingDiverged(
        f"Training stopped at step {step}: {why}. {advice} Last good checkpoint: "
        f"{last[-1] if last else 'none'} (left intact)."
    )


ADVICE = "Lower --learning_rate / --delora_lambda_lr or --delora_lambda, or try --mixed_precision bf16 instead of fp16."


def check_adapter(run: Run, full: bool) -> None:
    """Stop on a diverged adapter; `full` also runs the per-layer norm report and refreshes |dW|/|W|."""
    step = run.global_step
    if full:
        rows = norm_rows(run.adapted)
        bad = diverged_layer(rows)
        if bad is None:
            run.state.relative = adapter_health(run.adapted, rows)
            return
        raise stop(run, step, f"the adapter diverged ({bad})", ADVICE)
    if not bool(torch.isfinite(lambdas(run.adapted)).all()):
        raise stop(run, step, "a lambda is no longer finite", ADVICE)


def compute_loss(run: Run, batch: dict, denoiser: nn.Module, encoders: dict) -> torch.Tensor:
    """Noise the batch, run the denoiser, and take the (weighted, prior-preserving) MSE."""
    family: Family = run.family
    args: argparse.Namespace = run.args
    if "latent_params" in batch:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # The posterior mean, not a sample: real SD/SDXL/SD3/Flux VAEs have a near-zero posterior std, so
        # this changes nothing there; the embedded VAE's std is large and its base model was trained on means.
        latents = DiagonalGaussianDistribution(batch["latent_params"]).mode()
    else:
        with torch.no_grad():
            latents = run.components["vae"].encode(batch["pixel_values"].to(run.dtype)).latent_dist.mode()
    latents = family.scale_latents(latents).to(run.dtype)
    prompts = batch["prompts"]
    cache = run.prompt_cache
    if cache:
        cond = {k: torch.cat([cache[p][k] for p in prompts]) for k in cache[prompts[0]]}
    else:
        cond = family.encode_prompts(run.tokenizers, encoders, prompts, args)
    noised = family.noise(run.noise_scheduler, latents, args)
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


def accumulate(run: Run, batch: dict, trainable: list[nn.Module], encoders: dict) -> bool:
    """Forward and backward one batch; on the last batch of a window, update unless a loss was non-finite.

    Returns whether this batch ended an accumulation window (accelerate's ``sync_gradients``).
    """
    accelerator, state = run.accelerator, run.state
    with accelerator.accumulate(*trainable):
        loss = compute_loss(run, batch, run.wrapped[run.family.denoiser], encoders)
        finite = bool(torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all())
        state.bad_in_window |= not finite
        if finite:
            state.last_loss = loss.item()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if state.bad_in_window:
                run.optimizer.zero_grad(set_to_none=True)
            else:
                distributed.average_gradients(accelerator, run.adapter_params)
                # Every parameter of the model(s), so accelerate's FSDP branch recognises the model
                # (frozen ones have no gradient and do not count).
                everything = [p for m in trainable for p in m.parameters()]
                accelerator.clip_grad_norm_(everything, run.args.max_grad_norm)
                run.optimizer.step()
                # DeepSpeed's ZeRO writes the parameters through .data, unseen by version counters (and by the
                # fast path's hook, which sees torch optimizers only); the caches and the projection read them.
                for param in run.adapter_params:
                    torch.autograd.graph.increment_version(param)
                project_lambdas(delora_layers(run))  # the relative bound holds in every saved state too
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
    return accelerator.sync_gradients


def delora_layers(run: Run) -> list[nn.Module]:
    """The run's DeLoRA layers, listed once (walking every module each step would cost a little)."""
    layers = run.__dict__.get("_delora_layers")
    if layers is None:
        layers = [a for m in run.adapted.values() for *_, a in iter_delora_layers(m, ADAPTER_NAME)]
        run.__dict__["_delora_layers"] = layers
    return layers


def skip_bad_update(run: Run) -> None:
    """Count a window whose loss was non-finite (its update was skipped); stop after too many in a row."""
    state = run.state
    state.bad_in_window = False
    state.bad_in_row += 1
    state.skipped += 1
    logger.warning(
        "Non-finite loss at step %d: update skipped (%d in a row).", run.global_step + 1, state.bad_in_row
    )
    if state.bad_in_row >= MAX_BAD_STEPS:
        raise stop(
            run,
            run.global_step,
            f"the loss was non-finite (NaN or inf) for {MAX_BAD_STEPS} steps in a row",
            ADVICE,
        )


def after_update(run: Run, progress: Any) -> None:
    """One optimizer step done: guard, log, then checkpoint and validate when due."""
    args, state = run.args, run.state
    state.bad_in_row = 0
    run.global_step += 1
    step = run.global_step
    checkpoint_due = step % args.checkpointing_steps == 0
    check_adapter(run, full=step % HEALTH_EVERY == 1 or step == args.max_train_steps or checkpoint_due)
    lam = mean_lambda(run.adapted)
    logs = {
        "loss": state.last_loss,
        "lr": run.lr_scheduler.get_last_lr()[0],
        "lambda": lam,
        "dW/W": state.relative,
    }
    progress.update(1)
    progress.set_postfix(
        loss=f"{state.last_loss:.4f}", lr=f"{logs['lr']:.2e}", lam=f"{lam:.3f}", dWW=f"{state.relative:.2e}"
    )
    run.accelerator.log({**logs, "skipped_steps": state.skipped}, step=step)
    if checkpoint_due:
        from .outputs import export_adapter

        checkpointing.save_checkpoint(
            run.accelerator,
            run.output_dir,
            step,
            run.identity,
            args.checkpoints_total_limit,
            lambda folder: export_adapter(run, folder),
        )
    if args.validation_prompt and args.validation_steps and step % args.validation_steps == 0:
        from .outputs import validate

        validate(run, f"step-{step}", step)


def train_steps(run: Run) -> None:
    """Train from ``run.global_step`` up to ``--max_train_steps`` (nothing when a resumed run is already there)."""
    from .outputs import validate

    args, accelerator = run.args, run.accelerator
    if run.global_step >= args.max_train_steps:
        logger.info(
            "Resumed at step %d, and --max_train_steps is %d: nothing left to train.",
            run.global_step,
            args.max_train_steps,
        )
        return
    trainable = [run.wrapped[n] for n in run.wrapped]
    encoders = {name: run.wrapped.get(name, run.components[name]) for name in run.family.text_encoders}
    progress = tqdm(
        total=args.max_train_steps,
        initial=run.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    try:
        for epoch in range(run.first_epoch, run.num_epochs):
            for model in trainable:
                model.train()
            batches = run.loader
            if epoch == run.first_epoch and run.skip_batches:
                batches = accelerator.skip_first_batches(run.loader, run.skip_batches)
            for batch in batches:
                if not accumulate(run, batch, trainable, encoders):
                    continue
                if run.state.bad_in_window:
                    skip_bad_update(run)
                    continue
                after_update(run, progress)
                if run.global_step >= args.max_train_steps:
                    break
            done = run.global_step >= args.max_train_steps
            if (
                args.validation_prompt
                and args.validation_epochs
                and (epoch + 1) % args.validation_epochs == 0
                and not done
            ):
                validate(run, f"epoch-{epoch + 1}", run.global_step)
            if done:
                break
    finally:
        progress.close()
