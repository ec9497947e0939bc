"""Shared benchmark plumbing: UNets built in code, adapter variants, interleaved timing, memory accounting.

Everything here runs without downloads: the UNets are random-init ``UNet2DConditionModel``s with the layouts
of the real models, so step times and memory are representative while the weights are not.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The attention projections every variant adapts (PEFT's usual UNet targets)."""


# --- models ---------------------------------------------------------------------------------------------------
@dataclass
class UNetSpec:
    """A UNet layout plus the batch it trains on (latent size, batch, text length) and the adapter rank."""

    name: str
    unet: dict[str, Any]
    latent: int
    batch: int
    rank: int
    text_len: int = 77
    dtype: torch.dtype = torch.float32
    checkpointing: bool = False
    sdxl: bool = False


def tiny_spec(batch: int = 4, latent: int = 16, rank: int = 8) -> UNetSpec:
    """~1.5M parameters: the quick CPU configuration."""
    return UNetSpec(
        "tiny-unet (32,64,64)",
        dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=latent,
        ),
        latent=latent,
        batch=batch,
        rank=rank,
        text_len=16,
    )


def smoke_spec() -> UNetSpec:
    """The smallest UNet with every code path (cross-attention, resnet convs): the device suite's --smoke."""
    return UNetSpec(
        "smoke-unet (32,64)",
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=8,
            norm_num_groups=8,
            sample_size=8,
        ),
        latent=8,
        batch=1,
        rank=4,
        text_len=8,
    )


def medium_spec() -> UNetSpec:
    """~20M parameters, SD-like layout at reduced width: the full-mode configuration on a CPU."""
    return UNetSpec(
        "medium-unet (64,128,256)",
        dict(
            block_out_channels=(64, 128, 256),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=32,
        ),
        latent=32,
        batch=4,
        rank=16,
        text_len=77,
    )


def sd15_spec() -> UNetSpec:
    """SD1.5's UNet layout (860M parameters), bf16, 512 px (64x64 latents), batch 4, rank 32."""
    return UNetSpec(
        "sd1.5-size unet",
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        ),
        latent=64,
        batch=4,
        rank=32,
        text_len=77,
        dtype=torch.bfloat16,
    )


def sdxl_spec() -> UNetSpec:
    """SDXL's UNet layout (2.6B parameters), bf16, 1024 px (128x128 latents), batch 2, checkpointing."""
    return UNetSpec(
        "sdxl-size unet (grad ckpt)",
        dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
        ),
        latent=128,
        batch=2,
        rank=32,
        text_len=77,
        dtype=torch.bfloat16,
        checkpointing=True,
        sdxl=True,
    )


def cpu_layout_spec(
    layout: str, latent: int = 16, batch: int = 1, dtype: torch.dtype = torch.float32
) -> UNetSpec:
    """SD1.5's or SDXL's real UNet layout (every layer at full width, rank 32) at a CPU-sized batch.

    Only the latent size, the batch and the dtype shrink, so per-layer weight-space work (the fold) and
    per-token work keep their real ratio to each other at small latents, the regime of a launch-bound GPU.
    """
    spec = {"sd15": sd15_spec, "sdxl": sdxl_spec}[layout]()
    spec.unet["sample_size"] = latent
    spec.name = f"{layout} layout, {latent}x{latent} latents, batch {batch}, {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
    spec.latent, spec.batch, spec.dtype = latent, batch, dtype
    return spec


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares the (frozen) parameters and buffers: variants then add only their own tensors,
    so four variants of an SD-size UNet fit in a CPU's memory."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def build_unet(spec: UNetSpec, device: torch.device, seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):  # a GPU's random init is instant; SDXL's 2.6 B parameters take a CPU tens of s
        unet = UNet2DConditionModel(**spec.unet)
    return unet.to(dtype=spec.dtype).requires_grad_(False)


def make_batch(spec: UNetSpec, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Noisy latents, timesteps, text states and the noise target of one training step."""
    gen = torch.Generator().manual_seed(seed)
    cross = spec.unet["cross_attention_dim"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=spec.dtype)

    batch: dict[str, Any] = {
        "sample": rand(spec.batch, 4, spec.latent, spec.latent),
        "timestep": torch.randint(0, 1000, (spec.batch,), generator=gen).to(device),
        "encoder_hidden_states": rand(spec.batch, spec.text_len, cross),
        "target": rand(spec.batch, 4, spec.latent, spec.latent),
    }
    if spec.sdxl:
        batch["added_cond_kwargs"] = {"text_embeds": rand(spec.batch, 1280), "time_ids": rand(spec.batch, 6)}
    return batch


def unet_forward(unet: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    kwargs = {k: v for k, v in batch.items() if k != "target"}
    return unet(**kwargs, return_dict=False)[0]


# --- variants -----------------------------------------------------------------------------------------------
VARIANTS = ("ours-paper", "ours-zero", "peft-lora", "peft-delora")
EXTRA_VARIANTS = (
    "ours-paper-keep",
    "ours-zero-keep",
    "ours-paper-factors",
    "ours-zero-factors",
    "ours-paper-per-layer",
    "ours-zero-per-layer",
)
"""Opt-in: ours with ``fastpath_options(recompute_hidden=False)`` (``-keep``: autograd keeps the T x r hidden;
less compute, more memory); ours on the accelerator path wherever it runs (``-factors``: stacked fold and
factor fold, the default off the CPU); and ours without the factor fold wherever it runs (``-per-layer``: the
CPU's default, so on a GPU it measures what the factor fold buys)."""


def variant_context(variant: str) -> Any:
    """The fast-path switches a variant runs with, as a context manager around each of its steps."""
    from delora_diffusion.fastpath import fastpath_options

    if variant.endswith("-factors"):
        return fastpath_options(stack_fold=True, fold_factors=True)
    if variant.endswith("-per-layer"):
        return fastpath_options(fold_factors=False)
    return fastpath_options(recompute_hidden=not variant.endswith("-keep"))


LAMBDA = 15.0


def inject_variant(unet: nn.Module, variant: str, rank: int) -> nn.Module:
    """Add one variant's adapter (rank, targets as given) with trainable parameters in fp32."""
    if variant.startswith("ours"):
        import delora_diffusion as dd

        init = variant.split("-")[1]
        dd.inject_delora(
            unet, dd.DeLoRAConfig(rank=rank, lambda_init=LAMBDA, init=init, target_modules=TARGETS)
        )
        return unet
    from peft import DeloraConfig, LoraConfig, inject_adapter_in_model

    if variant == "peft-lora":
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian")
    elif variant == "peft-delora":
        config = DeloraConfig(r=rank, delora_lambda=LAMBDA, target_modules=TARGETS)
    else:
        raise ValueError(f"Unknown variant {variant!r}; known: {VARIANTS}.")
    unet = inject_adapter_in_model(config, unet)
    for name, param in unet.named_parameters():
        trainable = "lora_" in name or "delora_" in name
        param.requires_grad_(trainable)
        if trainable:
            param.data = param.data.float()  # adapters train in fp32, as diffusers' scripts cast them
    return unet


def trainable_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@dataclass
class Trainer:
    """One variant's model, optimizer and a closure doing forward + backward + AdamW step."""

    variant: str
    unet: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]
    base_bytes: int = 0
    times: list[float] = field(default_factory=list)

    def step(self) -> float:
        with variant_context(self.variant):
            loss = torch.nn.functional.mse_loss(
                unet_forward(self.unet, self.batch).float(), self.batch["target"].float()
            )
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def make_trainer(base: nn.Module, spec: UNetSpec, variant: str, batch: dict[str, Any]) -> Trainer:
    unet = shared_copy(base)
    base_bytes = tensor_bytes(list(unet.parameters()) + list(unet.buffers()))
    inject_variant(unet, variant, spec.rank)
    if spec.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=1e-4)
    return Trainer(variant, unet, optimizer, batch, base_bytes)


# --- timing -------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call, with the device synchronized before and after.

    On a shared CPU the wall time includes waiting for other jobs; the CPU time of this process does not, so
    it is the steadier cross-check (exact with one intra-op thread).
    """
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3


@dataclass
class Timings:
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    device: torch.device,
    budget_s: float | None = None,
    min_rounds: int = 5,
) -> Timings:
    """Round-robin timing: every round calls each fn once, rotating the order so none always runs first.

    Machine noise (other jobs, thermal, frequency) then hits all variants alike; report medians. With
    `budget_s`, rounds stop once that many seconds have passed (after at least `min_rounds`).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    result = Timings({name: [] for name in names}, {name: [] for name in names})
    start = time.perf_counter()
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and time.perf_counter() - start > budget_s:
            break  # a loaded machine: stop after whole rounds rather than overrun the time budget
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu = timed(fns[name], device)
            result.wall[name].append(wall)
            result.cpu[name].append(cpu)
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- memory -------------------------------------------------------------------------------------------------
def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors` (views and shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _persistent_adapter_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """Adapter parameters, buffers, gradients, optimizer state and any stacked copies our fast path keeps."""
    unet = trainer.unet
    tensors = [t for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if "lora_" in n]
    tensors += [p.grad for p in trainer_params(trainer) if p.grad is not None]
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    plan = unet.__dict__.get("_delora_plan")
    if plan is not None:
        for group in plan.groups.values():
            for value in vars(group).values():  # lambda_max and the paper init's frozen unit scales
                values = value if isinstance(value, tuple) else (value,)
                tensors += [t for t in values if isinstance(t, torch.Tensor)]
    return tensors


def trainer_params(trainer: Trainer) -> list[nn.Parameter]:
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def memory_report(trainer: Trainer, device: torch.device) -> dict[str, float]:
    """Training memory above the frozen model, in MiB, from one untimed step.

    - ``saved``: distinct storages autograd keeps for backward (``saved_tensors_hooks``), excluding the model's
      own parameters and buffers, which exist anyway. This is the activation memory each variant adds or saves.
    - ``state``: adapter parameters and buffers, their gradients, AdamW's moments, and any extra persistent
      tensors (our fast path's stacked frozen copies), measured after the step with grads still present.
    - ``peak``: on CUDA, ``torch.cuda.max_memory_allocated`` during the step minus the memory before it
      (the model itself); on CPU, ``saved + state``, an allocator-free estimate of the same quantity.
    """
    unet = trainer.unet
    owned = {t.untyped_storage().data_ptr() for t in list(unet.parameters()) + list(unet.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned and storage.nbytes() > 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with variant_context(trainer.variant):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.mse_loss(
                unet_forward(unet, trainer.batch).float(), trainer.batch["target"].float()
            )
        loss.backward()
    trainer.optimizer.step()
    state = tensor_bytes(_persistent_adapter_tensors(trainer))
    trainer.optimizer.zero_grad(set_to_none=True)
    mib = 2.0**20
    report = {"saved_mib": sum(saved.values()) / mib, "state_mib": state / mib}
    if device.type == "cuda":
        synchronize(device)
        report["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / mib
    else:
        report["peak_mib"] = report["saved_mib"] + report["state_mib"]
    return report
