"""The matmul and conv FLOPs of one training step per variant: the part of a step no implementation can skip.

    python benchmarks/step_flops.py --layout sdxl    # SDXL's layout at 16x16 latents, batch 1, fp32 (~3 min)
    python benchmarks/step_flops.py --quick          # the tiny UNet of speed.py --quick

Same models, batch and variants as ``speed.py`` (its layouts' CPU mode), counted with torch's
``FlopCounterMode`` over one forward + backward + AdamW step, after one step untimed. Elementwise ops are not
counted: the difference between two variants here is the arithmetic one of them adds (the paper init's frozen
pair, the zero init's recomputed hidden), so ``× PEFT LoRA`` is the floor under that variant's step-time
ratio wherever the step is matmul-bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def step_flops(spec: C.UNetSpec, variants: list[str]) -> dict[str, int]:
    """FLOPs of one training step of each variant (matmuls and convs, as FlopCounterMode counts them)."""
    device = torch.device("cpu")
    base = C.build_unet(spec, device)
    batch = C.make_batch(spec, device)
    flops = {}
    for variant in variants:
        trainer = C.make_trainer(base, spec, variant, batch)
        trainer.step()  # the first step builds caches and optimizer state
        with FlopCounterMode(display=False) as counter:
            trainer.step()
        flops[variant] = counter.get_total_flops()
        del trainer
    return flops


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=["sd15", "sdxl"], default="sdxl")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="the tiny UNet instead of a real layout")
    parser.add_argument("--variants", nargs="+", default=list(C.VARIANTS), choices=C.VARIANTS)
    args = parser.parse_args(argv)
    if "peft-lora" not in args.variants:
        parser.error("peft-lora is the reference; keep it in --variants")
    spec = C.tiny_spec(batch=1, latent=8) if args.quick else C.cpu_layout_spec(args.layout, args.latent)
    flops = step_flops(spec, args.variants)
    print(f"| {spec.name} | GFLOP per step | × PEFT LoRA |\n| --- | ---: | ---: |")
    for variant, count in flops.items():
        print(f"| {variant} | {count / 1e9:.2f} | {count / flops['peft-lora']:.4f} |")
    return flops


if __name__ == "__main__":
    main()
