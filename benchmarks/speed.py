"""Training-step and inference speed of our DeLoRA against PEFT LoRA and PEFT DeLoRA, interleaved in one run.

    python benchmarks/speed.py --quick            # CPU, tiny UNet, < 2 min; last line "ratio: X.XX"
    python benchmarks/speed.py                    # CUDA: SD1.5-size and SDXL-size UNets; CPU: a medium UNet
    python benchmarks/speed.py --json out.json    # also write every number
    python benchmarks/speed.py --quick --variants ours-paper peft-lora ours-paper-keep   # opt-in variants
    python benchmarks/speed.py --layouts sd15 sdxl --latent 16 --batch 1 --rounds 4   # real layouts on a CPU
    python benchmarks/speed.py --compile eager    # every variant under torch.compile (backend eager)
    python benchmarks/speed.py --quick --compile eager --with-uncompiled   # and uncompiled, same rounds

Training: each variant gets its own copy of the same random-init UNet, the same batch and AdamW; one round
runs one forward + backward + optimizer step of every variant (order rotated per round), so machine noise hits
all of them alike. Medians are reported, and ``vs_peft_lora_paired``: the median over rounds of the step's
ratio to PEFT LoRA's in the same round, which drift between rounds does not move
(``benchmarks/pool_rounds.py`` pools it over runs); with --budget (45 s per section under --quick) rounds stop early on
a loaded machine. Memory is described in :func:`_common.memory_report`.

Inference (our adapter, paper init, perturbed so it is non-trivial): forward latency unfused (the hook's two
skinny matmuls with cached per-rank scales) against fused (``merge_delora``), and the latency of a lambda change
(``set_delora_scale``): unfused it invalidates the cached scales, which the next forward recomputes in one
batched refresh; fused it unmerges and re-merges every layer's dense update.

The last stdout line is ``ratio: X.XX``, our default-init step time over PEFT LoRA's (medians).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import delora_diffusion as dd  # noqa: E402
from delora_diffusion import fastpath  # noqa: E402

DEFAULT_VARIANT = "ours-" + dd.DeLoRAConfig().init


def train_benchmark(
    spec: C.UNetSpec,
    device: torch.device,
    variants: list[str],
    rounds: int,
    warmup: int,
    budget: float | None = None,
    compile_backend: str | None = None,
    with_uncompiled: bool = False,
) -> list[dict[str, Any]]:
    """Interleaved step times and per-variant memory for one UNet configuration.

    The variants share the frozen weights (:func:`_common.shared_copy`). With `compile_backend` every
    variant's UNet runs under ``torch.compile`` with that backend (memory is measured uncompiled); with
    `with_uncompiled` too, each variant also runs uncompiled in the same rounds (``"<variant> uncompiled"``),
    and its compiled rows say how the compiled step compares (``vs_uncompiled``).
    """
    base = C.build_unet(spec, device)
    batch = C.make_batch(spec, device)

    def trainer(variant: str) -> C.Trainer:
        torch.manual_seed(0)  # the same adapter init for a variant's compiled and uncompiled copies
        return C.make_trainer(base, spec, variant, batch)

    trainers = {v: trainer(v) for v in variants}
    memory = {v: C.memory_report(trainers[v], device) for v in variants}
    if compile_backend:
        for compiled in trainers.values():
            compiled.unet = torch.compile(compiled.unet, backend=compile_backend)
        if with_uncompiled:
            for v in variants:
                trainers[f"{v} uncompiled"] = trainer(v)
                memory[f"{v} uncompiled"] = memory[v]
    variants = list(trainers)
    losses = {v: [] for v in variants}

    def stepper(v: str):
        return lambda: losses[v].append(trainers[v].step())

    times = C.interleaved({v: stepper(v) for v in variants}, rounds, warmup, device, budget)
    rows = []
    for v in variants:
        compiled = bool(compile_backend) and not v.endswith(" uncompiled")
        reference = "peft-lora" if compiled or not compile_backend else "peft-lora uncompiled"
        lora_ms, lora_cpu = C.median(times.wall[reference]), C.median(times.cpu[reference])
        step_ms = C.median(times.wall[v])
        cpu_ms = C.median(times.cpu[v])
        rows.append(
            {
                "config": spec.name + (f", compiled ({compile_backend})" if compiled else ""),
                "variant": v,
                "compiled": compiled,
                "step_ms": step_ms,
                "step_ms_min": min(times.wall[v]),
                "vs_peft_lora": step_ms / lora_ms,
                "vs_peft_lora_paired": C.median(
                    [a / b for a, b in zip(times.wall[v], times.wall[reference], strict=True)]
                ),
                "cpu_ms": cpu_ms,
                "cpu_vs_peft_lora": cpu_ms / lora_cpu,
                "rounds": len(times.wall[v]),
                "step_ms_all": times.wall[v],
                "final_loss": losses[v][-1],
                "trainable_params": sum(p.numel() for p in C.trainable_parameters(trainers[v].unet)),
                **memory[v],
            }
        )
    uncompiled = {r["variant"].removesuffix(" uncompiled"): r["step_ms"] for r in rows if not r["compiled"]}
    for row in rows:
        if row["compiled"] and row["variant"] in uncompiled:
            row["vs_uncompiled"] = row["step_ms"] / uncompiled[row["variant"]]
    return rows


def inference_benchmark(
    spec: C.UNetSpec, device: torch.device, rounds: int, warmup: int, budget: float | None = None
) -> dict[str, Any]:
    """Unfused vs fused forward latency and lambda-change latency, interleaved."""
    base = C.build_unet(spec, device)
    batch = C.make_batch(spec, device)
    unfused = C.inject_variant(copy.deepcopy(base), "ours-paper", spec.rank).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, _, a in dd.iter_delora_layers(unfused):
            a.delora_B.add_(0.1 * torch.randn(a.delora_B.shape, generator=gen).to(a.delora_B))
    fused = dd.merge_delora(copy.deepcopy(unfused))
    lora = C.inject_variant(copy.deepcopy(base), "peft-lora", spec.rank).eval()
    base.eval()
    scales = {"unfused": 1.0, "fused": 1.0}

    def lambda_change(model: torch.nn.Module, key: str) -> None:
        scales[key] = 0.5 if scales[key] == 1.0 else 1.0
        dd.set_delora_scale(model, scales[key])
        if key == "unfused":
            fastpath.refresh_factors(model)  # what the next forward pays

    fns = {
        "forward base (no adapter)": lambda: C.unet_forward(base, batch),
        "forward ours unfused": lambda: C.unet_forward(unfused, batch),
        "forward ours fused": lambda: C.unet_forward(fused, batch),
        "forward peft-lora unfused": lambda: C.unet_forward(lora, batch),
        "lambda change unfused (refold)": lambda: lambda_change(unfused, "unfused"),
        "lambda change fused (re-merge)": lambda: lambda_change(fused, "fused"),
    }
    with torch.no_grad():
        times = C.interleaved(fns, rounds, warmup, device, budget).wall
    dd.set_delora_scale(unfused, 1.0)
    dd.set_delora_scale(fused, 1.0)
    with torch.no_grad():
        diff = (C.unet_forward(unfused, batch) - C.unet_forward(fused, batch)).abs().max().item()
    return {"config": spec.name, "ms": {k: C.median(v) for k, v in times.items()}, "fused_max_abs_diff": diff}


def markdown_train(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | variant | rounds | step ms (median) | step ms (min) | × PEFT LoRA | CPU ms (median) | × PEFT LoRA (CPU) "
        "| saved MiB | state MiB | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['rounds']} | {r['step_ms']:.1f} | {r['step_ms_min']:.1f} | "
            f"{r['vs_peft_lora']:.3f} | {r['cpu_ms']:.1f} | {r['cpu_vs_peft_lora']:.3f} | "
            f"{r['saved_mib']:.2f} | {r['state_mib']:.3f} | {r['peak_mib']:.2f} |"
        )
    lines += [
        f"\n{r['variant']}: compiled / uncompiled step (medians) {r['vs_uncompiled']:.3f}"
        for r in rows
        if "vs_uncompiled" in r
    ]
    return "\n".join(lines)


def markdown_inference(result: dict[str, Any]) -> str:
    lines = [f"| {result['config']} | ms (median) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ms"].items()]
    lines.append(f"| max abs diff unfused vs fused | {result['fused_max_abs_diff']:.2e} |")
    return "\n".join(lines)


def _configuration(args: argparse.Namespace, device: torch.device) -> tuple[list[C.UNetSpec], int, int, Any]:
    """(UNet specs, rounds, warm-up rounds, time budget) for the chosen mode."""
    if args.layouts:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        specs = [C.cpu_layout_spec(name, args.latent or 16, args.batch or 1, dtype) for name in args.layouts]
        rounds, warmup = args.rounds or 4, args.warmup or 1
        budget = args.budget
    elif args.quick:
        specs = [C.tiny_spec(batch=args.batch or 4, latent=args.latent or 16)]
        rounds, warmup = args.rounds or 30, args.warmup or 3
        budget = args.budget or 45.0
    elif device.type == "cuda":
        specs = [C.sd15_spec(), C.sdxl_spec()]
        rounds, warmup = args.rounds or 20, args.warmup or 3
        budget = args.budget
    else:
        specs = [C.medium_spec()]
        rounds, warmup = args.rounds or 10, args.warmup or 2
        budget = args.budget
    return specs, rounds, warmup, budget


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny UNet, under 2 minutes")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument(
        "--variants", nargs="+", default=list(C.VARIANTS), choices=C.VARIANTS + C.EXTRA_VARIANTS
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per timed section; rounds stop early past it (default with --quick: 45)",
    )
    parser.add_argument("--batch", type=int, default=None, help="override the batch size (quick mode)")
    parser.add_argument("--latent", type=int, default=None, help="override the latent size (quick mode)")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference measurements")
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=["sd15", "sdxl"],
        default=None,
        help="real UNet layouts at --latent (16) and --batch (1): the CPU mode at real shapes",
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="frozen model dtype (--layouts)"
    )
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="torch.compile every variant")
    parser.add_argument(
        "--with-uncompiled",
        action="store_true",
        help="with --compile: also run every variant uncompiled in the same rounds, to compare",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads on CPU (default with --quick: 1, steadiest on a shared machine)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)

    if args.threads or args.quick or args.layouts:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    specs, rounds, warmup, budget = _configuration(args, device)
    if "peft-lora" not in args.variants:
        parser.error("peft-lora is the reference; keep it in --variants")
    if args.with_uncompiled and not args.compile:
        parser.error(
            "--with-uncompiled compares against --compile BACKEND; give a backend (e.g. --compile eager)"
        )

    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rounds": rounds,
        "warmup": warmup,
        "train": [],
        "inference": [],
    }
    for spec in specs:
        rows = train_benchmark(
            spec, device, args.variants, rounds, warmup, budget, args.compile, args.with_uncompiled
        )
        results["train"] += rows
        print(markdown_train(rows), flush=True)
        if not args.no_inference:
            inf = inference_benchmark(spec, device, rounds, warmup, None if budget is None else budget / 3)
            results["inference"].append(inf)
            print("\n" + markdown_inference(inf), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = [
        r
        for r in results["train"]
        if r["config"].startswith(specs[0].name) and r["compiled"] == bool(args.compile)
    ]
    ours = next((r for r in first if r["variant"] == DEFAULT_VARIANT), None) or next(
        r for r in first if r["variant"].startswith("ours")
    )
    results["ratio_variant"] = ours["variant"]
    results["ratio"] = ours["vs_peft_lora"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    ratio = results["ratio"]
    print(f"\n{ours['variant']} / peft-lora, CPU-time medians: {ours['cpu_vs_peft_lora']:.3f}")
    print(f"ratio: {ratio:.2f}" if math.isfinite(ratio) else "ratio: nan")
    return results


if __name__ == "__main__":
    main()
