"""Score a finished DreamBooth output dir on the embedded world: is the subject there, and what else moved?

Loads the bundled model (or ``--model``), then the adapter in ``output_dir`` with ``pipe.load_delora_weights``,
exactly as a user would, and reads with the bundled probe:

- the subject in new contexts ("a photo of sks star on a <colour> background", every background, ``--per_prompt``
  seeds each): similarity to the subject's held-out views, and how often its shape, colour, pattern and accent
  are found, and the background follows the prompt;
- drift on prompts not about the subject, against the base model with the same seeds.

    accelerate launch train_scripts/dreambooth_delora.py          # the default run
    python benchmarks/default_run.py outputs/dreambooth-delora     # its scores, as recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import delora_diffusion  # noqa: F401  (adds load_delora_weights to diffusers pipelines)
from delora_diffusion.embedded import default_model_path, load_probe, load_subject
from delora_diffusion.embedded.evaluate import drift, generate_for_drift, subject_scores


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", type=Path, help="a DreamBooth output dir (holds the adapter)")
    p.add_argument(
        "--subject",
        default="striped_star",
        help="the subject the run trained on: a bundled name or a subject folder (with subject.json)",
    )
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--per_prompt", type=int, default=2)
    p.add_argument("--inference_steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.output_dir.exists():
        p.error(f"{str(args.output_dir)!r} does not exist; pass the --output_dir of a finished training run.")
    if min(args.per_prompt, args.inference_steps, args.threads) < 1:
        p.error("--per_prompt, --inference_steps and --threads must be at least 1.")
    folder = Path(args.subject)
    try:
        subject = load_subject(folder.name, folder.parent) if folder.is_dir() else load_subject(args.subject)
    except FileNotFoundError as err:
        p.error(f"--subject: {err}")
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(args.model))
    pipe.set_progress_bar_config(disable=True)
    probe = load_probe()
    settings = {"steps": args.inference_steps, "guidance": args.guidance, "seed": args.seed}
    base = generate_for_drift(pipe, subject, **settings)
    pipe.load_delora_weights(str(args.output_dir))
    scores = subject_scores(pipe, subject, probe=probe, per_prompt=args.per_prompt, **settings)
    scores["drift"] = drift(base, generate_for_drift(pipe, subject, **settings), probe=probe)
    print(json.dumps({k: round(v, 3) for k, v in scores.items()}, indent=2))
    return scores


if __name__ == "__main__":
    main()
