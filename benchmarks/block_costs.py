"""Training-step time of a stack of real transformer blocks per variant, as paired per-round ratios to LoRA.

    python benchmarks/block_costs.py    # 4 SDXL level-3 blocks: dim 1280, 16 tokens, text 77 x 2048 (~3 min)

Between ``layer_costs.py`` (one adapted Linear, its parts timed) and ``speed.py --layouts`` (a whole UNet,
checkpointed): diffusers' ``BasicTransformerBlock`` (self- and cross-attention, GEGLU feed-forward), adapters
on to_q/k/v/out as in speed.py, fp32, one thread. Each round runs forward + backward + AdamW of every variant
(order rotated); the table gives CPU-time medians and the median over rounds of each variant's step over PEFT
LoRA's in the same round. ``--checkpointing`` runs each block under activation checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


class Blocks(nn.Module):
    def __init__(
        self, dim: int, head_dim: int, text_dim: int, count: int, checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        heads = dim // head_dim
        self.blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, heads, head_dim, cross_attention_dim=text_dim) for _ in range(count)]
        )

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing:  # as diffusers checkpoints a UNet's blocks: forward again in backward
                x = checkpoint(lambda h, b=block: b(h, encoder_hidden_states=text), x, use_reentrant=False)
            else:
                x = block(x, encoder_hidden_states=text)
        return x


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    base = Blocks(args.dim, args.head_dim, args.text_dim, args.blocks, args.checkpointing).requires_grad_(
        False
    )
    x = torch.randn(1, args.tokens, args.dim, requires_grad=True)
    text = torch.randn(1, args.text_tokens, args.text_dim)
    runs = {}
    for variant in args.variants:
        model = C.inject_variant(copy.deepcopy(base), variant, args.rank).train()
        optimizer = torch.optim.AdamW(C.trainable_parameters(model), lr=1e-4)
        runs[variant] = (model, optimizer)

    def step(variant: str) -> None:
        model, optimizer = runs[variant]
        with C.variant_context(variant):
            model(x, text).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for variant in args.variants:  # warm-up: caches, optimizer state
        step(variant)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for variant in order:
            start = time.process_time()
            step(variant)
            times[variant].append(time.process_time() - start)
    lora = times["peft-lora"]
    return {
        v: {
            "ms": statistics.median(t) * 1e3,
            "paired": statistics.median(a / b for a, b in zip(t, lora, strict=True)),
        }
        for v, t in times.items()
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--tokens", type=int, default=16, help="image tokens (SDXL's lowest level at 16x16 latents)"
    )
    parser.add_argument("--text-dim", type=int, default=2048)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--checkpointing", action="store_true", help="checkpoint each block (SDXL's layout runs so)"
    )
    parser.add_argument("--variants", nargs="+", default=list(C.VARIANTS), choices=C.VARIANTS)
    args = parser.parse_args(argv)
    if "peft-lora" not in args.variants:
        parser.error("peft-lora is the reference; keep it in --variants")
    if args.dim % args.head_dim:
        parser.error(f"--dim {args.dim} is not a multiple of --head-dim {args.head_dim}")
    torch.set_num_threads(1)
    result = measure(args)
    print("| variant | CPU ms per step (median) | × PEFT LoRA (paired) |\n| --- | ---: | ---: |")
    for variant, row in result.items():
        print(f"| {variant} | {row['ms']:.1f} | {row['paired']:.3f} |")
    return result


if __name__ == "__main__":
    main()
