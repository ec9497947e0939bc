"""Train the bundled tiny text-to-image model, its probe, and write the DreamBooth subjects.

Everything is reproducible from ``--seed`` and runs on a CPU. Stages (default: all, in this order):

    data      render a fixed set of world scenes (cached in --work-dir)
    vae       train the AutoencoderKL (64×64 RGB → 16×16×4 latents) and set its scaling factor
    probe     train the attribute probe (shipped in delora_diffusion/embedded/probe/)
    latents   encode the scene set once, so the UNet never runs the VAE
    unet      train the CLIP text encoder and the UNet jointly (epsilon prediction, min-SNR weighting, EMA)
    assemble  save the StableDiffusionPipeline (EMA weights) to --out
    vae-accent  fine-tune the VAE on two-colour patterns, holding its latent space; keeps the UNet valid
    subjects  render the bundled subjects
    eval      per-attribute prompt-following accuracy with the probe

The shipped model was made in three phases on the shared 2-core CPU (about 70 minutes in all):

    python train_scripts/train_embedded_base.py --seed 0 --vae-steps 1000 --probe-steps 1000 --unet-steps 5000
    cp -r outputs/embedded_base/ckpt outputs/embedded_base/ckpt_phase1
    python train_scripts/train_embedded_base.py --seed 0 --stages unet,assemble,eval \
        --unet-init outputs/embedded_base/ckpt_phase1 --unet-steps 2000 --unet-lr 3e-4
    python train_scripts/train_embedded_base.py --seed 0 --stages vae-accent,eval \
        --vae-accent-steps 1500 --vae-accent-lr 1e-3 --threads 2     # phase 3: the VAE learns two-colour patterns
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from delora_diffusion.embedded import world
from delora_diffusion.embedded.probe import HEADS, PROBE_DIR, Probe, save_probe
from delora_diffusion.embedded.subjects import SUBJECTS_DIR, write_subjects
from delora_diffusion.embedded.tokenizer import make_tokenizer

MODEL_DIR = ROOT / "delora_diffusion" / "embedded" / "model"
MAX_TOKENS = 20
TEXT_DIM = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- components


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    # Attention only at 8×8 and 4×4: text decides global things (shape, colours, pattern), and attention at
    # 16×16 doubled the step time on a CPU without helping.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=16,
    )


def train_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


# ---------------------------------------------------------------- stages


def stage_data(args) -> None:
    out = args.work_dir / "data.safetensors"
    if out.exists():
        log(f"data: {out} exists")
        return
    log(f"data: rendering {args.n_scenes} scenes")
    images, scenes = world.render_dataset(args.n_scenes, seed=args.seed)
    save_file({"images": torch.from_numpy(images)}, str(out))
    (args.work_dir / "scenes.json").write_text(json.dumps([s.__dict__ for s in scenes]))
    log("data: done")


def load_data(args) -> tuple[torch.Tensor, list[world.Scene]]:
    images = load_file(str(args.work_dir / "data.safetensors"))["images"]
    scenes = [world.Scene(**d) for d in json.loads((args.work_dir / "scenes.json").read_text())]
    return images, scenes


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def stage_vae(args) -> None:
    images, _ = load_data(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, 100))
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, {args.vae_steps} steps")
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=g)
        x = to_unit(images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse = F.mse_loss(rec, x)
        # A tiny KL keeps the latent scale tame; L1 sharpens edges that MSE alone blurs.
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + 0.5 * F.l1_loss(rec, x) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae {step} mse {mse.item():.5f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(to_unit(images[i : i + 256])).latent_dist.mean for i in range(0, 2048, 256)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    log(
        f"vae: latent std {lat.std():.3f} mean {lat.mean():.3f} -> scaling_factor {vae.config.scaling_factor:.4f}"
    )
    vae.save_pretrained(args.work_dir / "vae")


def augment_for_probe(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, brightness and noise of the kind a VAE decoder and a young diffusion model produce."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, 0.5 * x + 0.5 * blurred, x)
    x = x * (1 + 0.08 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1))
    x = x + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * 0.3
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.12
    return x.clamp(-1, 1)


def probe_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh renders for the probe, held-out triples and accent colours included."""
    scenes = []
    for _ in range(n):
        s = world.sample_scene(rng, include_held_out=True, size_range=(0.38, 0.74))
        if s.pattern != "plain" and rng.random() < 0.3:
            s = world.Scene(
                **{**s.__dict__, "accent": str(rng.choice([c for c in world.COLORS if c != s.color]))}
            )
        scenes.append(s)
    x = world.to_tensor([world.render(s) for s in scenes])
    labels = {}
    for k, values in HEADS.items():
        if k == "accent":
            labels[k] = torch.tensor(
                [values.index(s.accent or "none") if s.pattern != "plain" else 0 for s in scenes]
            )
        else:
            labels[k] = torch.tensor([values.index(getattr(s, k)) for s in scenes])
    return x, labels


def stage_probe(args) -> None:
    torch.manual_seed(args.seed + 2)
    rng = np.random.default_rng(args.seed + 2)
    g = torch.Generator().manual_seed(args.seed + 2)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.probe_steps, 100, floor=0.02))
    log(f"probe: {sum(p.numel() for p in probe.parameters()) / 1e6:.2f}M params, {args.probe_steps} steps")
    t0 = time.time()
    for step in range(args.probe_steps):
        x, y = probe_batch(rng, args.probe_batch)
        logits = probe(augment_for_probe(x, g))
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.probe_steps - 1:
            log(f"probe {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    probe.eval()
    x, y = probe_batch(np.random.default_rng(args.seed + 1000), 1000)
    with torch.no_grad():
        logits = probe(x)
    acc = {k: (logits[k].argmax(-1) == y[k]).float().mean().item() for k in HEADS}
    log(f"probe: accuracy on fresh renders {acc}")
    probe.config["trained"] = {"seed": args.seed, "steps": args.probe_steps, "fresh_render_accuracy": acc}
    save_probe(probe, args.probe_out)


def stage_latents(args) -> None:
    from diffusers import AutoencoderKL

    images, _ = load_data(args)
    vae = AutoencoderKL.from_pretrained(args.work_dir / "vae").eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            out.append(vae.encode(to_unit(images[i : i + 500])).latent_dist.mean * vae.config.scaling_factor)
    lat = torch.cat(out)
    log(f"latents: {tuple(lat.shape)} std {lat.std():.3f}")
    save_file({"latents": lat.contiguous()}, str(args.work_dir / "latents.safetensors"))


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.step = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


def stage_unet(args) -> None:
    from diffusers import DDPMScheduler

    _, scenes = load_data(args)
    latents = load_file(str(args.work_dir / "latents.safetensors"))["latents"]
    tokenizer = make_tokenizer(args.work_dir / "tokenizer_files", MAX_TOKENS)
    torch.manual_seed(args.seed + 3)
    rng = np.random.default_rng(args.seed + 3)
    g = torch.Generator().manual_seed(args.seed + 3)
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    if args.unet_init is not None:  # a second, lower-LR phase from an earlier run's (EMA) weights
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(args.unet_init / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(args.unet_init / "unet")
        log(f"unet: starting from {args.unet_init}")
    noise_sched = DDPMScheduler(
        **{k: v for k, v in train_scheduler_config().items() if k != "set_alpha_to_one"}
    )
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.unet_steps, 300))
    ema_unet, ema_text = EMA(unet, args.ema), EMA(text_encoder, args.ema)
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    n_text = sum(p.numel() for p in text_encoder.parameters()) / 1e6
    log(
        f"unet: {n_unet:.2f}M params, text encoder {n_text:.2f}M, {args.unet_steps} steps, batch {args.unet_batch}"
    )
    t0 = time.time()
    run_loss = 0.0
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents), (args.unet_batch,), generator=g)
        caps = [
            "" if rng.random() < args.p_uncond else world.training_caption(scenes[i], rng)
            for i in idx.tolist()
        ]
        ids = tokenizer(
            caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        )
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids.input_ids)[0]
        pred = unet(zt, t, cond).sample
        # min-SNR-5 weighting (Hang et al. 2023): low-noise steps stop dominating, training converges faster.
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        run_loss += loss.item()
        if (step + 1) % 100 == 0:
            rate = (step + 1) / (time.time() - t0) * 3600
            log(f"unet {step + 1} loss {run_loss / 100:.4f} ({time.time() - t0:.0f}s, {rate:.0f} steps/h)")
            run_loss = 0.0
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.unet_steps:
            save_unet_checkpoint(args, ema_unet.module, ema_text.module, tokenizer)
    log("unet: done")


def save_unet_checkpoint(args, unet, text_encoder, tokenizer) -> None:
    ckpt = args.work_dir / "ckpt"
    unet.save_pretrained(ckpt / "unet")
    text_encoder.save_pretrained(ckpt / "text_encoder")
    tokenizer.save_pretrained(ckpt / "tokenizer")


def stage_assemble(args) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    ckpt = args.work_dir / "ckpt"
    tokenizer = CLIPTokenizer.from_pretrained(ckpt / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(args.work_dir / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(ckpt / "text_encoder"),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(ckpt / "unet"),
        scheduler=DDIMScheduler(**train_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out)
    # The CLIP source files too, so the tokenizer can be rebuilt by any CLIP BPE implementation.
    from delora_diffusion.embedded.tokenizer import write_tokenizer_files

    write_tokenizer_files(Path(args.out) / "tokenizer")
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    log(f"assemble: saved to {args.out} ({size / 1e6:.1f} MB)")


def accent_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Base-world renders where half the striped/dotted objects get a second colour (never a held-out
    triple, so no bundled subject is ever shown): what the VAE must be able to draw for DreamBooth subjects."""
    scenes = []
    for _ in range(n):
        s = world.sample_scene(rng)
        if s.pattern != "plain" and rng.random() < 0.5:
            s = world.Scene(
                **{**s.__dict__, "accent": str(rng.choice([c for c in world.COLORS if c != s.color]))}
            )
        scenes.append(s)
    return world.to_tensor([world.render(s) for s in scenes])


def stage_vae_accent(args) -> None:
    """Teach the VAE two-colour patterns while keeping its latent space, so the trained UNet stays valid.

    The base world never shows a second stripe colour, so the first VAE drew the subjects orange. This stage
    fine-tunes it on accent renders with a penalty that holds the encoder's latents of base-world images
    where they were (the UNet was trained on them).
    """
    from diffusers import AutoencoderKL

    images, _ = load_data(args)
    source = args.out / "vae" if (args.out / "vae").exists() else args.work_dir / "vae"
    vae = AutoencoderKL.from_pretrained(source)
    frozen = AutoencoderKL.from_pretrained(source).eval().requires_grad_(False)
    rng, g = np.random.default_rng(args.seed + 4), torch.Generator().manual_seed(args.seed + 4)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_accent_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_accent_steps, 50))
    log(f"vae-accent: from {source}, {args.vae_accent_steps} steps")
    t0 = time.time()
    for step in range(args.vae_accent_steps):
        x_accent = accent_batch(rng, args.vae_batch // 2)
        x_base = to_unit(images[torch.randint(0, len(images), (args.vae_batch // 2,), generator=g)])
        x = torch.cat([x_accent, x_base])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        with torch.no_grad():
            target = frozen.encode(x_base).latent_dist.mean
        keep = F.mse_loss(post.mean[len(x_accent) :], target) / target.var()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + args.vae_accent_keep * keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.vae_accent_steps - 1:
            log(f"vae-accent {step} loss {loss.item():.4f} keep {keep.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    vae.save_pretrained(args.out / "vae")
    log(f"vae-accent: saved to {args.out / 'vae'}")


def stage_subjects(args) -> None:
    for path in write_subjects(SUBJECTS_DIR, seed=args.seed):
        log(f"subjects: wrote {path}")


def stage_eval(args) -> None:
    from delora_diffusion.embedded.evaluate import evaluate_base_model
    from delora_diffusion.embedded.probe import load_probe

    evaluate_base_model(
        args.out,
        probe=load_probe(args.probe_out),
        n=args.eval_n,
        num_inference_steps=args.eval_steps,
        guidance_scale=args.eval_guidance,
        seed=args.seed,
    )


STAGES = {
    "data": stage_data,
    "vae": stage_vae,
    "probe": stage_probe,
    "latents": stage_latents,
    "unet": stage_unet,
    "assemble": stage_assemble,
    "vae-accent": stage_vae_accent,
    "subjects": stage_subjects,
    "eval": stage_eval,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from: " + ", ".join(STAGES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "embedded_base")
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--probe-out", type=Path, default=PROBE_DIR)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shared 2-core machine: 1)")
    p.add_argument("--n-scenes", type=int, default=30000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-3)
    p.add_argument("--vae-accent-steps", type=int, default=400)
    p.add_argument("--vae-accent-lr", type=float, default=3e-4)
    p.add_argument("--vae-accent-keep", type=float, default=10.0)
    p.add_argument("--probe-steps", type=int, default=1500)
    p.add_argument("--probe-batch", type=int, default=64)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-init", type=Path, default=None, help="start the unet stage from a saved ckpt dir")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-guidance", type=float, default=7.5)  # diffusers' default
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.stages.split(","):
        t0 = time.time()
        STAGES[name](args)
        log(f"stage {name} took {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
