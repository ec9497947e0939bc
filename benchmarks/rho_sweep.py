"""A rho sweep grid: the subject on every background, one row per relative bound, the base model on top.

Reads the image rows `benchmarks/quality.py` saves for each run (``grids/<subject>_<method>_lr<lr>.png``,
seed 0, the longest length) and stacks them under a row of the base model drawn with the same prompts and
seeds, with the row labels on the left.

    python benchmarks/rho_sweep.py --subject striped_star --lr 0.001 \
        --runs outputs/benchmarks/rho_pilot_striped_star outputs/benchmarks/rho_pilot_0.3 ... \
        --out docs/rho_sweep_striped_star.png
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROW = re.compile(
    r"^(?P<subject>[a-z_]+)_delora-(?P<init>paper|zero)@(?P<rho>[0-9.e-]+)_lr(?P<lr>[0-9.e-]+)\.png$"
)


def find_rows(runs: list[Path], subject: str, lr: float, init: str) -> dict[float, Path]:
    """rho -> the saved image row of that run, for this subject, learning rate and init."""
    rows: dict[float, Path] = {}
    for run in runs:
        for path in sorted((run / "grids").glob("*.png")):
            match = ROW.match(path.name)
            if match and match["subject"] == subject and match["init"] == init and float(match["lr"]) == lr:
                rows[float(match["rho"])] = path
    if not rows:
        raise SystemExit(f"no rows for {subject} at lr {lr:g} ({init} init) under {[str(r) for r in runs]}")
    return dict(sorted(rows.items()))


def base_row(subject_name: str, steps: int, seed: int):
    """The base model's images for the rows' prompts and seeds (quality.save_grid's recipe, no adapter)."""
    import quality
    from diffusers import StableDiffusionPipeline

    from delora_diffusion.embedded import default_model_path, load_subject

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    args = argparse.Namespace(inference_steps=steps, eval_seed=seed)
    out = Path("/tmp") / f"rho_sweep_base_{subject_name}.png"
    quality.save_grid(pipe, load_subject(subject_name), args, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    from PIL import Image, ImageDraw

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", default="paper", choices=["paper", "zero"])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="quality.py --out dirs")
    p.add_argument("--inference_steps", type=int, default=15, help="as the runs were evaluated")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = find_rows(args.runs, args.subject, args.lr, args.init)
    labelled = [("base", base_row(args.subject, args.inference_steps, 0))]
    labelled += [(f"rho {rho:g}", path) for rho, path in rows.items()]
    images = [(label, Image.open(path).convert("RGB")) for label, path in labelled]
    width, height = images[0][1].size
    label_width = 48
    sheet = Image.new("RGB", (label_width + width, height * len(images)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(images):
        sheet.paste(image, (label_width, i * height))
        draw.text((4, i * height + height // 2 - 5), label, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(images)} rows: {', '.join(label for label, _ in labelled)})")
    return args.out


if __name__ == "__main__":
    main()
