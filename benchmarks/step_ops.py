"""Kernel launches per training step, per variant: what a launch-bound GPU step pays for, counted on a CPU.

    python benchmarks/step_ops.py --layout sd15     # SD1.5's layout (~2 min)
    python benchmarks/step_ops.py --layout sdxl     # SDXL's, with gradient checkpointing (~6 min)
    python benchmarks/step_ops.py --quick           # the tiny UNet of speed.py --quick

Counts the ops dispatched in one forward + backward (after one step uncounted) that launch a kernel on a GPU:
every aten op but views and detach. The setting is a GPU's: frozen weights in bf16 under bf16 autocast,
adapters in fp32, and ours with the fast path's accelerator defaults (stacked fold, factor fold), which a CPU
does not take by default; ``ours-*-per-layer`` rows are ours on the CPU's per-layer path. The count does not
depend on the latent size except through which per-layer path ours takes (fewer tokens than outputs or not),
so a small latent keeps this quick. The optimizer step is not counted (one fused or foreach call for all).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROWS = ("ours-paper", "ours-zero", "peft-lora", "peft-delora", "ours-paper-per-layer", "ours-zero-per-layer")


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops that would launch a kernel on a GPU (views and detach launch none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if not func.is_view and func.overloadpacket is not torch.ops.aten.detach:
            self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def _options(row: str) -> contextlib.AbstractContextManager:
    from delora_diffusion.fastpath import fastpath_options

    if not row.startswith("ours"):
        return contextlib.nullcontext()
    on_accelerator = not row.endswith("-per-layer")
    return fastpath_options(stack_fold=on_accelerator, fold_factors=on_accelerator)


def step_launches(spec: C.UNetSpec, rows: list[str]) -> tuple[dict[str, collections.Counter[str]], int]:
    """Per row, the kernel-launching ops of one forward + backward, by op name; and how many layers are
    adapted (PEFT LoRA's count)."""
    device = torch.device("cpu")
    base = C.build_unet(spec, device)
    batch = C.make_batch(spec, device)
    counts = {}
    for row in rows:
        variant = row.removesuffix("-per-layer")
        with _options(row), torch.autocast("cpu", torch.bfloat16):
            trainer = C.make_trainer(base, spec, variant, batch)
            trainer.step()  # the first step builds caches and optimizer state
            with C.variant_context(variant):
                with LaunchCounter() as counter:
                    loss = torch.nn.functional.mse_loss(
                        C.unet_forward(trainer.unet, batch).float(), batch["target"].float()
                    )
                    loss.backward()
        counts[row] = counter.ops
        if row == "peft-lora":
            layers = sum(1 for name, _ in trainer.unet.named_modules() if name.endswith(".lora_A"))
        del trainer
    return counts, layers


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="the tiny UNet instead of a real layout")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = parser.parse_args(argv)
    if "peft-lora" not in args.rows:
        parser.error("peft-lora is the reference; keep it in --rows")
    if args.latent < 8 or args.latent % 8:
        parser.error(f"--latent {args.latent}: use a multiple of 8 (the UNets halve it up to three times)")
    if args.quick:
        spec = C.tiny_spec(batch=1, latent=args.latent)
    else:
        spec = C.cpu_layout_spec(args.layout, args.latent, dtype=torch.bfloat16)
    spec.dtype = torch.bfloat16
    counts, layers = step_launches(spec, args.rows)
    totals = {row: sum(ops.values()) for row, ops in counts.items()}
    lora = totals["peft-lora"]
    print(f"{spec.name}, bf16 autocast, {layers} adapted layers: kernel launches per forward + backward\n")
    print(
        "| variant | launches | × PEFT LoRA | per adapted layer vs PEFT LoRA |\n| --- | ---: | ---: | ---: |"
    )
    for row, total in totals.items():
        print(f"| {row} | {total} | {total / lora:.3f} | {(total - lora) / layers:+.1f} |")
    return totals


if __name__ == "__main__":
    main()
