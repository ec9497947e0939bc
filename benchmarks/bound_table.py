"""What a relative bound rho and an absolute lambda mean on real layer widths (SD1.5, SDXL, Flux shapes).

For each layer shape: the |lambda| limit that rho gives (lambda_max = rho |w| / max_j w_j, halved for the
paper init), and the other way round, the bound relative to |W| that PEFT's lambda 15 gives. Weights are
freshly initialised (nn.Linear's default, which diffusers uses before loading); trained weights have
heavier-tailed column norms (larger max/rms), which lowers lambda_max for the same rho. The bundled model's
own layers are listed too, measured on its trained weights.

    python benchmarks/bound_table.py [--rho 0.05] [--lam 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delora_diffusion import functional

SHAPES = {
    "SD1.5 attention (320)": (320, 320),
    "SD1.5 attention (1280)": (1280, 1280),
    "SD1.5 cross-attn to_k (768 -> 320)": (768, 320),
    "SDXL cross-attn to_k (2048 -> 1280)": (2048, 1280),
    "SDXL feed-forward out (5120 -> 1280)": (5120, 1280),
    "Flux attention (3072)": (3072, 3072),
    "Flux feed-forward out (12288 -> 3072)": (12288, 3072),
}


def row(name: str, weight: torch.Tensor, rho: float, lam: float) -> str:
    w = functional.column_norms(weight)
    ratio = (w.max() / w.pow(2).mean().sqrt()).item()
    paper, zero = (functional.lambda_limit(w, rho, p) for p in (True, False))
    lam_bound = functional.norm_bound(lam, w, paper_init=True).item() / w.norm().item()
    return f"| {name} | {w.numel()} | {ratio:.2f} | {paper:.2f} | {zero:.2f} | {lam_bound:.2f} |"


def bundled_rows(rho: float, lam: float) -> list[str]:
    from diffusers import UNet2DConditionModel

    from delora_diffusion.embedded import default_model_path

    unet = UNet2DConditionModel.from_pretrained(Path(default_model_path()) / "unet")
    widths: dict[int, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if name.endswith("to_q") and isinstance(module, nn.Linear):
            widths.setdefault(module.in_features, module.weight.detach())
    return [row(f"bundled model to_q ({n})", weight, rho, lam) for n, weight in sorted(widths.items())]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--lam", type=float, default=15.0)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lines = [
        f"| layer | in | max w / rms w | λ_max at ρ {args.rho:g} (paper) | (zero) | bound/‖W‖ at λ {args.lam:g} (paper) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += bundled_rows(args.rho, args.lam)
    for name, (n_in, n_out) in SHAPES.items():
        lines.append(row(name, nn.Linear(n_in, n_out).weight.detach(), args.rho, args.lam))
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
