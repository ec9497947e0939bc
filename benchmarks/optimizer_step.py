"""AdamW's step over an adapter's parameters: torch's default loop, foreach, and the fused kernel the training
script uses (``training.loop.fused_adamw``), interleaved in one process.

    python benchmarks/optimizer_step.py               # the bundled model with the embedded default's adapter

An adapter is ~3 small tensors per adapted layer (A, B, lambda), so the step is overhead-bound and the
implementation matters more than the arithmetic. CPU, one thread, medians of process CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import delora_diffusion as dd
from delora_diffusion.embedded import default_model_path
from delora_diffusion.training.args import EMBEDDED_DEFAULTS

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def adapter_parameters() -> list[torch.nn.Parameter]:
    """The embedded default's trainable adapter parameters on the bundled UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(default_model_path() / "unet").requires_grad_(False)
    config = dd.DeLoRAConfig(
        rank=EMBEDDED_DEFAULTS["rank"], target_modules=EMBEDDED_DEFAULTS["delora_targets"]
    )
    dd.inject_delora(unet, config)
    return [p for p in unet.parameters() if p.requires_grad]


def measure(params: list[torch.nn.Parameter], rounds: int) -> dict[str, float]:
    """Median ms per step of each kind, on copies of `params` with fixed random gradients."""
    optimizers = {}
    for kind, flags in KINDS.items():
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        for c in copies:
            c.grad = torch.randn_like(c)
        optimizers[kind] = torch.optim.AdamW(copies, lr=1e-3, **flags)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds + 3):  # three untimed rounds first
        for kind, opt in optimizers.items():
            start = time.process_time()
            opt.step()
            if r >= 3:
                times[kind].append(time.process_time() - start)
    return {kind: statistics.median(t) * 1e3 for kind, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    torch.set_num_threads(1)
    params = adapter_parameters()
    ms = measure(params, args.rounds)
    print(f"{len(params)} tensors, {sum(p.numel() for p in params)} numbers; AdamW step, CPU ms (median)")
    print("| implementation | ms | × loop |\n| --- | ---: | ---: |")
    for kind, value in ms.items():
        print(f"| {kind} | {value:.2f} | {value / ms['loop']:.2f} |")
    return ms


if __name__ == "__main__":
    main()
