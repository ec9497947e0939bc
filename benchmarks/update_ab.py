"""The layer update of this tree against the one of a git revision, per shape, in one process.

    python benchmarks/update_ab.py --against HEAD~1                 # paper init, SD-size shapes (~1 min)
    python benchmarks/update_ab.py --against 2203fcf --init zero --rounds 200

A change to ``delora_diffusion/update.py`` moves one layer's forward + backward by a few percent, which a
whole-UNet run (±5% between runs on a shared CPU) cannot see. Here the revision's ``update.py`` (read with
``git show``, run as a module next to the installed one, sharing the rest of the package) and this tree's
take turns on the same tensors: each round times a few forward + backward passes of both, in alternating
order, per shape; the table gives CPU-time medians and new / old. fp32, one thread. Shapes are (in, out,
tokens, x needs a gradient): SDXL's lowest level (1280, 16 tokens), its cross-attention k/v (text
2048 → 1280, 77 tokens, no input gradient), SD's middle levels, 1024 tokens at 320 (many tokens: factors
scaled on the weights), and a tiny layer where only Python overhead counts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch

from delora_diffusion import update as current

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [
    (1280, 1280, 16, True),
    (2048, 1280, 77, False),
    (640, 640, 64, True),
    (2048, 640, 77, False),
    (320, 320, 256, True),
    (320, 320, 1024, True),
    (640, 640, 256, True),
    (8, 8, 1, True),
]


def load_revision(revision: str) -> types.ModuleType:
    """``delora_diffusion/update.py`` as it was at `revision`, as a module importing the installed package."""
    try:
        proc = subprocess.run(
            ["git", "show", f"{revision}:delora_diffusion/update.py"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    except FileNotFoundError:
        raise SystemExit(
            "update_ab.py needs git and a git checkout of this project (a clone, not a wheel)."
        ) from None
    if proc.returncode != 0:
        raise SystemExit(f"update_ab.py: cannot read update.py at {revision!r}: {proc.stderr.strip()}")
    source = proc.stdout.replace("from . import", "from delora_diffusion import").replace(
        "from .layers import", "from delora_diffusion.layers import"
    )
    module = types.ModuleType(f"update_at_{revision}")
    try:
        exec(compile(source, f"{revision}:delora_diffusion/update.py", "exec"), module.__dict__)
    except ImportError as error:  # it needs a name the installed package no longer has
        raise SystemExit(
            f"update_ab.py: update.py at {revision!r} does not run with this tree: {error}"
        ) from None
    return module


def layer_inputs(n_in: int, n_out: int, tokens: int, x_grad: bool, rank: int, init: str) -> tuple:
    """_DeLoRALinear.apply's arguments for one layer (random, fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, n_in, generator=gen).requires_grad_(x_grad)
    A = torch.randn(rank, n_in, generator=gen).requires_grad_()
    B = torch.randn(n_out, rank, generator=gen).requires_grad_()
    w = torch.rand(n_in, generator=gen) + 0.5
    paper = init == "paper"
    A0, B0 = (
        (torch.randn(rank, n_in, generator=gen), torch.randn(n_out, rank, generator=gen))
        if paper
        else (None, None)
    )
    s = torch.randn(2 * rank if paper else rank, generator=gen).requires_grad_()
    return x, s, A, B, w, A0, B0, torch.float32, False


def run(old: types.ModuleType, rounds: int, init: str, rank: int, shapes: list[tuple]) -> list[dict]:
    """Per shape: CPU-time medians (µs per forward + backward) of the old and new update, and new / old."""
    cases = []
    for n_in, n_out, tokens, x_grad in shapes:
        r = min(rank, n_in, n_out)
        cases.append(((n_in, n_out, tokens, x_grad), layer_inputs(n_in, n_out, tokens, x_grad, r, init)))
    versions = {"old": old._DeLoRALinear, "new": current._DeLoRALinear}
    times: dict[tuple, list[float]] = {}
    for index in range(rounds):
        order = ("old", "new") if index % 2 else ("new", "old")
        for shape, args in cases:
            passes = 50 if shape[0] * shape[1] < 10_000 else 5
            for name in order:
                start = time.process_time()
                for _ in range(passes):
                    out = versions[name].apply(*args)
                    out.backward(torch.ones_like(out))
                times.setdefault((shape, name), []).append((time.process_time() - start) / passes * 1e6)
    rows = []
    for shape, _ in cases:
        old_us, new_us = (statistics.median(times[(shape, name)]) for name in ("old", "new"))
        rows.append({"shape": shape, "old_us": old_us, "new_us": new_us, "ratio": new_us / old_us})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision whose update.py is the baseline")
    parser.add_argument("--init", choices=["paper", "zero"], default="paper")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="two tiny shapes (a smoke test)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.rank < 1:
        parser.error("--rounds and --rank must be at least 1")
    torch.set_num_threads(1)
    shapes = [(8, 8, 1, True), (16, 12, 40, False)] if args.quick else SHAPES
    rows = run(load_revision(args.against), args.rounds, args.init, args.rank, shapes)
    print(f"| in → out, tokens (x grad) | {args.against} µs | this tree µs | new / old |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        n_in, n_out, tokens, x_grad = row["shape"]
        label = f"{n_in} → {n_out}, {tokens}{'' if x_grad else ' (no x grad)'}"
        print(f"| {label} | {row['old_us']:.0f} | {row['new_us']:.0f} | {row['ratio']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
