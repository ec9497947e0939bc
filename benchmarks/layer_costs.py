"""Where a training step's CPU time goes, per adapted Linear, for each variant at one layer shape.

    python benchmarks/layer_costs.py --features 1280 1280 --tokens 16   # SDXL's lowest level at 16x16 latents

N copies of one frozen ``nn.Linear`` (to_q) with an adapter each (rank 32, fp32, as the layout benchmarks of
speed.py), one intra-op thread. Every round runs forward, backward and an AdamW step of each variant in turn;
the table gives medians of process CPU time per layer and per part, and for ours the parts of the fast path
(timed by wrapping them): the batched refresh and its fold node (forward, backward), and the layer update's
autograd Function (forward, backward). CPU only: the wrapped parts are timed on the host, which on an
accelerator would only see the launches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from delora_diffusion import fastpath, fold, update  # noqa: E402

PARTS = {  # (owner, attribute): label
    (fastpath, "refresh_factors"): "refresh",
    (fold.FoldGroup, "forward"): "fold fwd",
    (fold.FoldGroup, "backward"): "fold bwd",
    (update._DeLoRALinear, "forward"): "update fwd",
    (update._DeLoRALinear, "backward"): "update bwd",
}


class Stack(nn.Module):
    """`count` frozen Linears (named like attention projections, so the variants' targets find them)."""

    def __init__(self, n_in: int, n_out: int, count: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"to_q": nn.Linear(n_in, n_out)}) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block["to_q"](x).square().mean() for block in self.blocks)


def _timed_parts(spent: dict[str, float]) -> Callable[[], None]:
    """Wrap the fast path's parts so their CPU time adds up in `spent`; returns the undo."""
    originals = {key: getattr(*key) for key in PARTS}

    def wrapper(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - start

        return timed

    for (owner, name), label in PARTS.items():
        wrapped = wrapper(originals[(owner, name)], label)
        setattr(owner, name, staticmethod(wrapped) if isinstance(owner, type) else wrapped)

    def undo() -> None:
        for (owner, name), fn in originals.items():
            setattr(owner, name, staticmethod(fn) if isinstance(owner, type) else fn)

    return undo


def measure(n_in: int, n_out: int, tokens: int, count: int, rounds: int, variants: list[str]) -> list[dict]:
    torch.manual_seed(0)
    base = Stack(n_in, n_out, count).requires_grad_(False)
    x = torch.randn(1, tokens, n_in, requires_grad=True)
    models = {v: C.inject_variant(C.shared_copy(base), v, 32) for v in variants}
    optimizers = {v: torch.optim.AdamW(C.trainable_parameters(m), lr=1e-4) for v, m in models.items()}
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    spent: dict[str, float] = {}
    undo = _timed_parts(spent)
    try:
        for r in range(rounds + 2):  # two warm-up rounds
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                spent.clear()
                t0 = time.process_time()
                loss = models[v](x)
                t1 = time.process_time()
                loss.backward()
                t2 = time.process_time()
                optimizers[v].step()
                optimizers[v].zero_grad(set_to_none=True)
                t3 = time.process_time()
                if r >= 2:
                    parts = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, **spent}
                    for label, seconds in parts.items():
                        samples[v].setdefault(label, []).append(seconds)
    finally:
        undo()
    return [
        {"variant": v, **{k: statistics.median(s) * 1e6 / count for k, s in samples[v].items()}}
        for v in variants
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, nargs=2, default=(1280, 1280), metavar=("IN", "OUT"))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=24, help="adapted copies of the layer")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(C.VARIANTS), choices=list(C.VARIANTS))
    args = parser.parse_args(argv)
    if min(*args.features, args.tokens, args.layers, args.rounds) < 1:
        parser.error("--features, --tokens, --layers and --rounds must be positive")
    torch.set_num_threads(1)
    rows = measure(*args.features, args.tokens, args.layers, args.rounds, args.variants)
    labels = ["forward", "backward", "optimizer", *PARTS.values()]
    print(
        f"Linear({args.features[0]}, {args.features[1]}), {args.tokens} tokens, rank 32, fp32: CPU us per layer"
    )
    print("| variant | " + " | ".join(labels) + " | total |")
    print("| --- |" + " ---: |" * (len(labels) + 1))
    for row in rows:
        total = row["forward"] + row["backward"] + row["optimizer"]
        cells = [f"{row[k]:.0f}" if k in row else "" for k in labels]
        print(f"| {row['variant']} | " + " | ".join(cells) + f" | {total:.0f} |")
    return rows


if __name__ == "__main__":
    main()
