"""Subject fidelity and drift across learning rates and training lengths, on the embedded world and model.

Methods: our DeLoRA (``paper`` and ``zero`` init) with an absolute lambda (``delora-paper``, ``--delora_lambda``)
or with a relative bound rho (``delora-paper@0.05``: every layer keeps |dW| <= 5% of |W|), PEFT LoRA, PEFT
DeLoRA, PEFT DoRA. Each (method, subject, learning rate, seed) is one DreamBooth run on the subject's images
(instance prompt only, no prior preservation, as in PEFT's image benchmark), evaluated at every length in
``--steps`` with the probe:

- subject similarity: probe-embedding cosine between "sks <class> on a <color> background" generations and
  the subject's held-out views; subject attributes: the probe finds its shape, colour, pattern and accent;
- prompt fidelity: the probe finds the background the prompt asked for;
- drift: ``(1 - cos(base, adapted)) / 2`` for prompts not about the subject, same seeds (PEFT's definition).

Outputs under --out: results.json, results.md (tables), fidelity_vs_lr.png, drift_vs_lr.png, and image grids.

    python benchmarks/quality.py                       # the full grid recorded in RESULTS.md
    python benchmarks/quality.py --quick               # a smoke run (one subject, two LRs, few steps)
    python benchmarks/quality.py --from_results a/results.json b/results.json --out merged
                                                       # tables and plots from runs split across processes

Tables give mean ± sd over the seeds of each cell (``--seeds 0 1 2``) and the number of seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delora_diffusion import DeLoRAConfig, delora_parameters, inject_delora
from delora_diffusion.embedded import default_model_path, load_probe, load_subject
from delora_diffusion.embedded.evaluate import drift, generate_for_drift, subject_prompts, subject_scores

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
TARGET_SETS = {"attention": ATTENTION, "attention-ff": ATTENTION + FEED_FORWARD}
METHODS = ("delora-paper", "delora-zero", "peft-lora", "peft-delora", "peft-dora")


def method_type(value: str) -> str:
    """A method name, or ``delora-<init>@<rho>`` for ours with a relative bound."""
    base, _, rho = value.partition("@")
    if base not in METHODS or (rho and not base.startswith("delora-")):
        raise argparse.ArgumentTypeError(
            f"unknown method {value!r}; use one of {METHODS} or delora-paper@0.05"
        )
    if rho:
        try:
            DeLoRAConfig(relative_bound=float(rho))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{value!r}: {err}") from None
    return value


def add_adapter(
    unet: torch.nn.Module, method: str, rank: int, lam: float, lr: float, lambda_lr: float, targets: list[str]
):
    """Put one method's adapter on the target layers; return optimizer parameter groups."""
    if method.startswith("delora-"):
        base, _, rho = method.partition("@")
        init = base.split("-")[1]
        bound = {"relative_bound": float(rho)} if rho else {"lambda_init": lam}
        inject_delora(unet, DeLoRAConfig(rank=rank, init=init, target_modules=targets, **bound))
        return delora_parameters(unet, lr=lr, lambda_lr=lambda_lr)
    from peft import DeloraConfig, LoraConfig, inject_adapter_in_model

    config = {
        "peft-lora": lambda: LoraConfig(r=rank, lora_alpha=rank, target_modules=targets),
        "peft-dora": lambda: LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, use_dora=True),
        "peft-delora": lambda: DeloraConfig(r=rank, delora_lambda=int(lam), target_modules=targets),
    }[method]()
    inject_adapter_in_model(config, unet)
    params = []
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name or "delora_" in name)
        if p.requires_grad:
            params.append(p)
    return [{"params": params, "lr": lr}]


class Bench:
    """The frozen pieces every run shares: base pipeline, probe, subject latents, base drift images."""

    def __init__(self, args: argparse.Namespace):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        self.args = args
        self.pipe = StableDiffusionPipeline.from_pretrained(str(args.model))
        self.pipe.set_progress_bar_config(disable=True)
        self.base_unet = self.pipe.unet.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.probe = load_probe(args.probe) if args.probe else load_probe()
        self.subjects = {name: load_subject(name) for name in args.subjects}
        self.latents, self.prompt_embeds, self.base_drift = {}, {}, {}
        for name, subject in self.subjects.items():
            images = torch.stack([torch.from_numpy(np.asarray(im)) for im in subject.images()])
            pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                dist = self.pipe.vae.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist
                self.latents[name] = dist.mean * self.pipe.vae.config.scaling_factor
                ids = self.pipe.tokenizer(
                    subject.instance_prompt, padding="max_length", truncation=True, return_tensors="pt"
                ).input_ids
                self.prompt_embeds[name] = self.pipe.text_encoder(ids)[0]
            self.base_drift[name] = generate_for_drift(self.pipe, subject, **self.gen_kwargs())

    def gen_kwargs(self) -> dict:
        """Evaluation images use fixed seeds for every run: the training seed varies, the probe's view not."""
        return {"steps": self.args.inference_steps, "guidance": 5.0, "seed": self.args.eval_seed}

    def adapted_pipe(self, unet):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**{**self.pipe.components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, method: str, subject_name: str, lr: float, seed: int) -> list[dict]:
        """Train one adapter up to max(--steps), evaluating at each length in --steps."""
        args = self.args
        torch.manual_seed(seed)
        unet = copy.deepcopy(self.base_unet)
        targets = TARGET_SETS[args.targets]
        groups = add_adapter(
            unet, method, args.rank, args.delora_lambda, lr, lr * args.lambda_lr_mult, targets
        )
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        latents, embeds = self.latents[subject_name], self.prompt_embeds[subject_name]
        g = torch.Generator().manual_seed(seed)
        rows, t0 = [], time.time()
        unet.train()
        for step in range(1, max(args.steps) + 1):
            z0 = latents[torch.randint(0, len(latents), (args.batch,), generator=g)]
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g)
            pred = unet(
                self.noise_scheduler.add_noise(z0, noise, t), t, embeds.expand(args.batch, -1, -1)
            ).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in args.steps:
                unet.eval()
                pipe = self.adapted_pipe(unet)
                subject = self.subjects[subject_name]
                scores = subject_scores(
                    pipe, subject, self.probe, per_prompt=args.per_prompt, **self.gen_kwargs()
                )
                adapted = generate_for_drift(pipe, subject, **self.gen_kwargs())
                row = {
                    "method": method_label(method, args),
                    "subject": subject_name,
                    "lr": lr,
                    "seed": seed,
                    "steps": step,
                    **update_norms(unet, method),
                    **scores,
                    "drift": drift(self.base_drift[subject_name], adapted, self.probe),
                    "loss": float(loss),
                    "seconds": time.time() - t0,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if step == max(args.steps) and seed == args.seeds[0]:
                    save_grid(
                        pipe,
                        subject,
                        args,
                        args.out / "grids" / f"{subject_name}_{method_label(method, args)}_lr{lr:g}.png",
                    )
                unet.train()
        return rows


def method_label(method: str, args: argparse.Namespace) -> str:
    """The method's name in the tables, with the settings that differ from the study's (rank 4, attention
    targets, lambda's lr = lr) appended, e.g. ``delora-paper@0.3:r8``, ``delora-paper@0.3:attention-ff``,
    ``delora-paper@0.3:lamlr10``: such runs form cells of their own."""
    label = method if args.rank == 4 else f"{method}:r{args.rank}"
    if args.targets != "attention":
        label += f":{args.targets}"
    if method.startswith("delora-") and args.lambda_lr_mult != 1.0:
        label += f":lamlr{args.lambda_lr_mult:g}"
    return label


@torch.no_grad()
def update_norms(unet: torch.nn.Module, method: str) -> dict:
    """Ours: the mean and largest |dW|/|W| over the adapted layers (what the relative bound caps)."""
    if not method.startswith("delora-"):
        return {}
    from delora_diffusion import delora_norm_report

    values = [row["relative_delta"] for row in delora_norm_report(unet)]
    return {"relative_delta_mean": float(np.mean(values)), "relative_delta_max": float(np.max(values))}


@torch.no_grad()
def save_grid(pipe, subject, args, path: Path) -> None:
    """One row: the subject in each background of the validation prompts, fixed seeds."""
    from PIL import Image

    prompts = [p for p, _ in subject_prompts(subject)]
    gens = [torch.Generator().manual_seed(args.eval_seed + i) for i in range(len(prompts))]
    images = pipe(
        prompts, num_inference_steps=args.inference_steps, guidance_scale=5.0, generator=gens
    ).images
    grid = Image.new("RGB", (64 * len(images), 64))
    for i, im in enumerate(images):
        grid.paste(im, (64 * i, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def cell(rows: list[dict], method: str, subject: str, lr: float, steps: int) -> list[dict]:
    return [
        r for r in rows if (r["method"], r["subject"], r["lr"], r["steps"]) == (method, subject, lr, steps)
    ]


def mean_sd(rows: list[dict], key: str) -> tuple[float, float]:
    values = np.array([r[key] for r in rows], dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown tables: per subject and length, one row per method, one column per LR; mean ± sd over seeds."""
    lines = []
    for subject in args.subjects:
        for steps in args.steps:
            lines += [
                f"\n**{subject}, {steps} steps** — subject similarity / background / drift, mean ± sd (seeds)\n"
            ]
            lines.append("| method | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
            lines.append("| --- |" + " --- |" * len(args.lrs))
            for method in args.methods:
                cells = []
                for lr in args.lrs:
                    match = cell(rows, method, subject, lr, steps)
                    if not match:
                        cells.append("—")
                        continue
                    parts = [
                        mean_sd(match, k) for k in ("subject_similarity", "background_accuracy", "drift")
                    ]
                    cells.append(
                        f"{parts[0][0]:.3f}±{parts[0][1]:.3f} / {parts[1][0]:.2f}±{parts[1][1]:.2f} / "
                        f"{parts[2][0]:.3f}±{parts[2][1]:.3f} ({len(match)})"
                    )
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    """Fidelity and drift against the learning rate at the longest length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = max(args.steps)
    for metric, fname in (("subject_similarity", "fidelity_vs_lr.png"), ("drift", "drift_vs_lr.png")):
        fig, axes = plt.subplots(1, len(args.subjects), figsize=(5 * len(args.subjects), 4), squeeze=False)
        for ax, subject in zip(axes[0], args.subjects):
            for method in args.methods:
                pts = [
                    (lr, *mean_sd(match, metric))
                    for lr in args.lrs
                    if (match := cell(rows, method, subject, lr, steps))
                ]
                if pts:
                    lrs, means, sds = zip(*pts)
                    ax.errorbar(lrs, means, yerr=sds, marker="o", capsize=3, label=method)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{subject}, {steps} steps")
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(args.out / fname, dpi=100)
        plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--probe", type=Path, default=None, help="default: the bundled probe")
    p.add_argument("--subjects", nargs="+", default=["striped_star", "dotted_square"])
    p.add_argument("--methods", nargs="+", default=list(METHODS[:4]), type=method_type)
    p.add_argument("--targets", default="attention", choices=sorted(TARGET_SETS))
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--steps", nargs="+", type=int, default=[100, 300, 1000])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--delora_lambda", type=float, default=15.0)
    p.add_argument("--lambda_lr_mult", type=float, default=1.0, help="our DeLoRA: lambda lr = lr × this")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--per_prompt", type=int, default=2)
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed and cell")
    p.add_argument("--eval_seed", type=int, default=0, help="the seed of every evaluation image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/quality"))
    p.add_argument("--quick", action="store_true", help="one subject, two LRs, 20/40 steps: a smoke run")
    p.add_argument(
        "--from_results",
        nargs="+",
        type=Path,
        default=None,
        help="no training: rebuild results.json/md and the plots under --out from these results.json files",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.lrs, args.steps, args.per_prompt, args.inference_steps = (
            args.subjects[:1],
            [1e-3, 1e-2],
            [20, 40],
            1,
            10,
        )
    args.steps = sorted(set(args.steps))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results:  # no torch work here, so the thread setting below stays untouched
        rows = [r for f in args.from_results for r in read_rows(f)]
        args.subjects = list(dict.fromkeys(r["subject"] for r in rows))
        args.methods = list(dict.fromkeys(r["method"] for r in rows))
        args.lrs = sorted({r["lr"] for r in rows})
        args.steps = sorted({r["steps"] for r in rows})
        (args.out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, default=str))
        return report(rows, args)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    rows: list[dict] = []
    for seed in args.seeds:
        for subject in args.subjects:
            for lr in args.lrs:
                for method in args.methods:  # interleaved, so machine load hits every method alike
                    rows += bench.run(method, subject, lr, seed)
                    (args.out / "results.json").write_text(  # after every run: a killed study keeps its rows
                        json.dumps({"args": vars(args), "rows": rows}, default=str)
                    )
    return report(rows, args)


def read_rows(path: Path) -> list[dict]:
    """The rows of a results.json this script wrote; a clear error for anything else."""
    try:
        rows = json.loads(path.read_text())["rows"]
        for row in rows:
            row.setdefault("seed", 0)  # results from before --seeds: seed 0
        return rows
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(
            f"--from_results {str(path)!r}: not a results.json of this script ({err})."
        ) from None


def report(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """results.md and the plots under --out, from the rows."""
    table = summarize(rows, args)
    (args.out / "results.md").write_text(table)
    plot(rows, args)
    print(table)
    return rows


if __name__ == "__main__":
    main()
