"""FSDP and DeepSpeed under ``accelerate launch``: what the script supports, and clear errors for the rest.

DDP (multi-GPU, multi-node, multi-CPU) needs nothing here. Under FSDP (version 2, ``fully_shard``) the frozen
base weights are sharded, which is where the memory is; the DeLoRA tensors are tiny, so they are left out of
the sharding (``ignored_params``) and stay whole and identical on every process, as under DDP. Everything that
reads the adapter (saving, checkpoints, the batched fast path, the progress-bar statistics) then sees full
tensors. FSDP does not reduce the gradients of ignored parameters, so :func:`average_gradients` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from .util import TrainingConfigError, require

logger = logging.getLogger(__name__)

ON_CPU_HINT = (
    "On CPU, train with DDP instead: `accelerate launch --cpu --num_processes N` or "
    "`torchrun --nproc_per_node N train_scripts/dreambooth_delora.py ...`."
)


def requested() -> str | None:
    """The sharding backend the accelerate config asks for ("FSDP", "DEEPSPEED"), read from its env vars."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def check_args(args: argparse.Namespace) -> None:
    """Before anything loads: the package is there, and the config is one this script can train with."""
    backend = requested()
    if backend is None:
        return
    if backend == "DEEPSPEED":
        require("deepspeed", "The accelerate config's DeepSpeed (distributed_type: DEEPSPEED)")
    elif os.environ.get("FSDP_VERSION", "1") != "2":
        raise TrainingConfigError(
            "The accelerate config asks for FSDP version 1, which this script does not support (FSDP1 flattens "
            "the frozen and the DeLoRA parameters together). Use FSDP2: set `fsdp_version: 2` in the accelerate "
            "config, or pass `accelerate launch --use_fsdp --fsdp_version 2`."
        )
    if args.train_text_encoder:
        raise TrainingConfigError(
            f"--train_text_encoder does not work with {backend}: accelerate shards or wraps one model per run "
            "there, and the text encoder is a second one. Drop the flag, or train with DDP."
        )


def check_accelerator(accelerator: Any) -> None:
    """After the Accelerator exists, before models load: it set up what the config asked for."""
    from accelerate.utils import DistributedType

    backend = requested()
    if backend is None:
        return
    got = accelerator.distributed_type
    if got != getattr(DistributedType, backend):
        # accelerate/state.py turns FSDP on only inside `elif self.distributed_type in [MULTI_GPU, MULTI_NPU,
        # ...]` (no MULTI_CPU), and DeepSpeed only `and not cpu`: here the run would silently be plain DDP.
        reason = {
            "FSDP": "accelerate enables FSDP on GPUs (and other accelerators) only",
            "DEEPSPEED": "accelerate does not enable DeepSpeed for a CPU process group",
        }[backend]
        raise TrainingConfigError(
            f"The accelerate config asks for {backend}, but accelerate set up {got.value} on "
            f"{accelerator.device.type}: {reason}, so the run would silently train without sharding. "
            f"{ON_CPU_HINT}"
        )
    if backend == "DEEPSPEED" and not torch.distributed.is_initialized():
        # Only the environment asks for DeepSpeed (no launcher set up a process group): every collective
        # (the first barrier) would fail with a ValueError from torch.distributed.
        raise TrainingConfigError(
            "The environment asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED), but no process group was set up. "
            "Start the script with `accelerate launch --use_deepspeed ...` (or an accelerate config with "
            "distributed_type: DEEPSPEED)."
        )
    if backend == "DEEPSPEED" and accelerator.state.deepspeed_plugin.hf_ds_config.is_zero3():
        raise TrainingConfigError(
            "DeepSpeed ZeRO stage 3 is not supported: it gathers a module's parameters only while that module's "
            "own forward runs, and DeLoRA's update reads them from the adapted layer's forward hook. Use ZeRO "
            "stage 1 or 2, or FSDP (fsdp_version: 2), which shards the frozen weights."
        )


def configure(accelerator: Any) -> None:
    """Before models load under FSDP: every process loads its own full copy of the frozen models.

    With accelerate's ``cpu_ram_efficient_loading``, transformers' ``from_pretrained`` would leave the text
    encoders of all but the first process on the meta device, and only the denoiser is sharded (and filled).
    """
    from accelerate.utils import DistributedType

    if (
        accelerator.distributed_type == DistributedType.FSDP
        and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    ):
        logger.info(
            "FSDP: cpu_ram_efficient_loading turned off (each process loads the frozen models itself)."
        )
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def prepare(accelerator: Any, model: nn.Module, args: argparse.Namespace) -> None:
    """Settings `accelerator.prepare` needs for `model` under FSDP / DeepSpeed (nothing under DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # As diffusers' scripts do: the loader is prepared on its own, so DeepSpeed's "auto" batch size has
        # nothing to read it from.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            args.train_batch_size
        )
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    ignored = plugin.ignored_modules or []
    if isinstance(ignored, str):  # a regex over module names, as accelerate reads it
        ignored = [m for name, m in model.named_modules() if re.fullmatch(ignored, name)]
    plugin.ignored_modules = [*ignored, *adapter_containers(model)]
    # Without DDP's initial broadcast, an unseeded run would start each process from different random A/B.
    with torch.no_grad():
        for module in adapter_containers(model):
            for tensor in (*module.parameters(), *module.buffers()):
                torch.distributed.broadcast(tensor, src=0)


def check_prepared(accelerator: Any, model: nn.Module) -> None:
    """The adapter was left whole by FSDP (``ignored_params`` needs torch >= 2.7 and accelerate's FSDP2)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for m in adapter_containers(model) for p in m.parameters()):
        raise TrainingConfigError(
            "FSDP sharded the DeLoRA parameters: this torch / accelerate does not pass `ignored_params` to "
            "fully_shard. Upgrade to torch >= 2.7 and a recent accelerate, or train with DDP."
        )


def adapter_containers(model: nn.Module) -> list[nn.Module]:
    """Each adapted layer's ``delora`` module (the adapter parameters and frozen copies, nothing else)."""
    from ..layers import DeLoRAContainer

    return [m for m in model.modules() if isinstance(m, DeLoRAContainer)]


def average_gradients(accelerator: Any, params: list[nn.Parameter]) -> None:
    """Average the adapter gradients over processes (FSDP leaves its ignored parameters to the caller).

    A parameter without a gradient here (module dropout) counts as zero, so every process reduces the same
    tensors in the same order.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP or accelerator.num_processes == 1:
        return
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)  # SUM: gloo has no AVG
        flat /= accelerator.num_processes
        for p, chunk in zip(group, flat.split([p.numel() for p in group])):
            p.grad = chunk.view_as(p)


def runs_on_every_process(accelerator: Any) -> bool:
    """Whether a forward pass (validation) needs every process: FSDP's all-gathers are collective."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1
