"""The README.md model card written next to the trained adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from .util import atomic_write_text

_LOAD = """```python
import delora_diffusion  # adds load_delora_weights & co. to diffusers pipelines
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained({base!r})
pipe.load_delora_weights({adapter!r})
image = pipe({prompt!r}{size}).images[0]
pipe.set_delora_scale(0.5)  # DeLoRA's strength knob: 0 is the base model, 1 the trained adapter
```"""


def write_model_card(
    args: argparse.Namespace,
    pipeline_class: str,
    base_model: str,
    adapter_dir: Path,
    grids: dict[str, Path],
    steps: int,
) -> Path:
    """README.md: base model, prompts, DeLoRA and training settings, how to load the adapter, the grids."""
    prompt = args.validation_prompt or args.instance_prompt
    size = f", height={args.resolution}, width={args.resolution}"
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags: [delora, dreambooth, diffusers, text-to-image]",
        f"instance_prompt: {args.instance_prompt!r}",
        "---",
        "",
        f"# DeLoRA DreamBooth adapter: {args.instance_prompt}",
        "",
        "A [DeLoRA](https://arxiv.org/abs/2503.18225) adapter trained with "
        "`train_scripts/dreambooth_delora.py` from delora-diffusion. DeLoRA normalizes each rank-1 term "
        "of the low-rank update and scales it by a learnable lambda per layer, so ||dW|| <= |lambda| * "
        "max column norm of W: the update's strength is bounded and can be dialed at inference.",
        "",
        "## Prompts",
        "",
        f"- Instance prompt: `{args.instance_prompt}`",
    ]
    if args.with_prior_preservation:
        lines.append(f"- Class prompt (prior preservation): `{args.class_prompt}`")
    if args.validation_prompt:
        lines.append(f"- Validation prompt: `{args.validation_prompt}`")
    lines += [
        "",
        "## Settings",
        "",
        f"- Base model: `{base_model}` ({pipeline_class})",
        f"- DeLoRA: rank {args.rank}, initial lambda {args.delora_lambda}, init `{args.delora_init}`, "
        f"targets `{args.delora_targets or 'model preset'}`, module dropout {args.delora_module_dropout}",
        f"- Text encoder trained: {'yes' if args.train_text_encoder else 'no'}",
        f"- {steps} steps, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"resolution {args.resolution}, learning rate {args.learning_rate} (lambda {args.delora_lambda_lr}), "
        f"optimizer {args.optimizer}, scheduler {args.lr_scheduler}, seed {args.seed}",
        "",
        "## Use",
        "",
        _LOAD.format(
            pipeline=pipeline_class, base=base_model, adapter=str(adapter_dir), prompt=prompt, size=size
        ),
        "",
    ]
    if grids:
        lines += ["## Validation", ""]
        if "final" in grids:
            lines += [f"`{prompt}`:", "", f"![validation](validation/{grids['final'].name})", ""]
        if "lambda_sweep" in grids:
            lines += [
                "Lambda sweep: one row per scale (0 = base model, 0.5, 1 = trained, 1.5), same seeds:",
                "",
                f"![lambda sweep](validation/{grids['lambda_sweep'].name})",
                "",
            ]
        if "prompts" in grids:
            listed = "; ".join(f"`{p}`" for p in args.extra_validation_prompts)
            lines += [
                f"One row per prompt: {listed}.",
                "",
                f"![prompts](validation/{grids['prompts'].name})",
                "",
            ]
    return atomic_write_text(adapter_dir / "README.md", "\n".join(lines))
