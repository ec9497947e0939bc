"""The README.md model card written next to the trained adapter, ready for the Hub.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData``, so the YAML header is produced by a YAML
dumper (prompts with quotes stay valid), ``base_model`` is the model as the user named it (a hub id; a local
path is described in the text, never put in the metadata), and the ``lora`` / ``template:sd-lora`` tags and
the widget make the Hub render it like a diffusers LoRA.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..util import atomic_write_text

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

FAMILY_TAGS = {
    "sd": ["stable-diffusion", "stable-diffusion-diffusers"],
    "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
    "sd3": ["sd3", "sd3-diffusers"],
    "flux": ["flux", "flux-diffusers"],
}
"""Tags the Hub's filters use for each family, as diffusers' DreamBooth scripts write them."""

DEFAULT_LICENSES = {
    "sd": {"license": "creativeml-openrail-m"},
    "sdxl": {"license": "openrail++"},
    "sd3": {"license": "other", "license_name": "stabilityai-ai-community"},
    "flux": {"license": "other", "license_name": "flux-1-dev-non-commercial-license"},
    "embedded": {"license": "apache-2.0"},
}
"""The adapter inherits its base model's license; these are the usual ones (``--license`` overrides)."""


def base_model_name(args: argparse.Namespace) -> tuple[str, str | None]:
    """(how to name the base model in text, the hub id for ``base_model`` or None for local models)."""
    if getattr(args, "embedded", False):
        return "the bundled tiny model of delora-diffusion", None
    name = str(args.pretrained_model_name_or_path)
    local = Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
    if local or not HUB_ID.match(name):  # a local model: its folder name only (cards are shared)
        return f"{Path(name).expanduser().resolve().name} (a local model)", None
    return name, name


def license_fields(args: argparse.Namespace, family: str | None) -> dict[str, str]:
    if getattr(args, "license", None):
        return {"license": args.license}
    key = "embedded" if getattr(args, "embedded", False) else family
    return dict(DEFAULT_LICENSES.get(key or "", {"license": "other"}))


def _family_of(pipeline_class: str) -> str | None:
    from .families import detect_family
    from .util import TrainingConfigError

    try:
        return detect_family({"_class_name": pipeline_class})
    except TrainingConfigError:
        return None


def _usage(pipeline: str, base: str, adapter: str, prompt: str, size: str) -> str:
    return f"""```python
import delora_diffusion  # adds load_delora_weights & co. to diffusers pipelines
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained({base!r})
pipe.load_delora_weights({adapter!r})
image = pipe({prompt!r}{size}).images[0]
pipe.set_delora_scale(0.5)  # DeLoRA's strength knob: 0 is the base model, 1 the trained adapter
```

Without delora-diffusion, the same adapter as a plain LoRA (`pytorch_lora_weights.safetensors`, exact at
lambda scale 1; a LoRA scale s, e.g. `fuse_lora(lora_scale=s)`, equals `set_delora_scale(s)`):

```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained({base!r})
pipe.load_lora_weights({adapter!r})
image = pipe({prompt!r}{size}).images[0]
```"""


def card_data(args: argparse.Namespace, family: str | None, widget_images: list[str]) -> Any:
    """The YAML header: base model, license, tags, the widget (validation prompt -> its images)."""
    from huggingface_hub import ModelCardData

    _, hub_id = base_model_name(args)
    tags = [
        "text-to-image",
        "diffusers",
        "diffusers-training",
        "lora",
        "delora",
        "template:sd-lora",
        "dreambooth",
    ]
    tags += FAMILY_TAGS.get(family or "", [])
    prompt = args.validation_prompt or args.instance_prompt
    widget = [{"text": prompt, "output": {"url": url}} for url in widget_images]
    return ModelCardData(
        base_model=hub_id,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        widget=widget or None,
        instance_prompt=args.instance_prompt,
        **license_fields(args, family),
    )


def _validation_section(args: argparse.Namespace, grids: dict[str, Path], prompt: str) -> list[str]:
    lines = ["## Validation", ""]
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
        lines += [f"One row per prompt: {listed}.", "", f"![prompts](validation/{grids['prompts'].name})", ""]
    return lines


def model_card_text(
    args: argparse.Namespace,
    pipeline_class: str,
    grids: dict[str, Path],
    steps: int,
    family: str | None = None,
    repo_id: str | None = None,
) -> str:
    """The whole README.md (YAML header and body) as a string."""
    from huggingface_hub import ModelCard

    base_text, hub_id = base_model_name(args)
    prompt = args.validation_prompt or args.instance_prompt
    typed = str(args.output_dir)
    adapter = repo_id or (typed if not Path(typed).is_absolute() else f"path/to/{Path(typed).name}")
    base_for_code = "path/to/base-model" if getattr(args, "embedded", False) else (hub_id or base_text)
    family = family or _family_of(pipeline_class)
    size = f", height={args.resolution}, width={args.resolution}"
    kohya = bool(getattr(args, "output_kohya_format", False))
    trigger = getattr(args, "trigger_word", None)
    if trigger is None:
        from .sources import derive_trigger

        trigger = derive_trigger(args.instance_prompt, args.class_prompt)
    widget = [p.name for key, p in grids.items() if key.startswith("final_")]
    lines = [
        f"# DeLoRA DreamBooth adapter: {args.instance_prompt}",
        "",
        "A [DeLoRA](https://arxiv.org/abs/2503.18225) adapter trained with "
        "`train_scripts/dreambooth_delora.py` from delora-diffusion. DeLoRA normalizes each rank-1 term "
        "of the low-rank update and scales it by a learnable lambda per layer, so ||dW|| <= |lambda| * "
        "max column norm of W: the update's strength is bounded and can be dialed at inference.",
        "",
        "## Trigger words",
        "",
        f"Use `{args.instance_prompt}` in the prompt (the instance prompt it was trained on)"
        + (f"; the trigger word is `{trigger}`." if trigger else "."),
    ]
    if args.with_prior_preservation:
        lines.append(f"Class prompt (prior preservation): `{args.class_prompt}`.")
    lines += [
        "",
        "## Settings",
        "",
        f"- Base model: `{base_text}` ({pipeline_class})",
        f"- DeLoRA: rank {args.rank}, {_bound_text(args)}, init `{args.delora_init}`, "
        f"targets `{args.delora_targets or 'model preset'}`, module dropout {args.delora_module_dropout}",
        f"- Text encoder trained: {'yes' if args.train_text_encoder else 'no'}",
        f"- {steps} steps, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"resolution {args.resolution}, learning rate {args.learning_rate} (lambda {args.delora_lambda_lr}), "
        f"optimizer {args.optimizer}, scheduler {args.lr_scheduler}, seed {args.seed}",
        "",
        "## Use",
        "",
        _usage(pipeline_class, base_for_code, adapter, prompt, size),
        "",
        "Files: `delora_weights.safetensors` (DeLoRA), `pytorch_lora_weights.safetensors` (diffusers LoRA)"
        + (", `pytorch_lora_weights_kohya.safetensors` (kohya: ComfyUI, A1111)" if kohya else "")
        + ".",
        "",
    ]
    if any(k in grids for k in ("final", "lambda_sweep", "prompts")):
        lines += _validation_section(args, grids, prompt)
    data = card_data(args, family, widget)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(
    args: argparse.Namespace,
    pipeline_class: str,
    base_model: str | None,
    adapter_dir: Path,
    grids: dict[str, Path],
    steps: int,
    family: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """README.md in `adapter_dir`. `base_model` (the resolved path) is unused: the card names the model as
    the user did (kept for callers)."""
    del base_model
    text = model_card_text(args, pipeline_class, grids, steps, family, repo_id)
    return atomic_write_text(Path(adapter_dir) / "README.md", text)


def _bound_text(args: Any) -> str:
    """How far each layer may move: the relative bound rho, or the absolute initial lambda."""
    rho = getattr(args, "delora_relative_bound", None)
    if rho is not None:
        return f"relative bound rho {rho:g} (every layer keeps |dW| <= {rho:g} |W|)"
    return f"initial lambda {args.delora_lambda} (absolute, no relative bound)"
