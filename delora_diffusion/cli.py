"""The ``delora-diffusion`` command: inspect, export-lora, export-peft, merge, app.

ADAPTER is anything ``pipe.load_delora_weights`` accepts: a file, a directory (ours or a PEFT adapter), or a
hub repo id. Bad paths, bad files, bad numbers and unwritable outputs print a one-line error that says what to
fix, and exit non-zero. Outputs are written atomically and never replace an existing file or folder without
``--overwrite`` (and never the adapter being read).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .util import finite_number

EXIT_ERROR = 1
"""Exit status for bad input (missing paths, bad files); argparse's usage errors keep their own (2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delora-diffusion", description="DeLoRA adapters for diffusers: inspect, convert, merge, view."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect", help="components, layers, rank, lambda, bound and |dW|/|W| per layer, metadata"
    )
    p.add_argument("adapter")
    p.add_argument(
        "--scale", type=float, default=1.0, help="lambda scale for the |dW|/|W| column (default 1)"
    )
    p.add_argument("--component", default=None, help="component of a PEFT adapter (e.g. unet)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")

    p = sub.add_parser("export-lora", help="write the adapter as an exact plain LoRA at a fixed lambda scale")
    p.add_argument("adapter")
    p.add_argument(
        "out", help="output .safetensors file, or a directory (gets pytorch_lora_weights.safetensors)"
    )
    p.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    p.add_argument("--scale", type=float, default=1.0, help="lambda scale baked into the LoRA (default 1)")
    p.add_argument("--component", default=None, help="component of a PEFT adapter (e.g. unet)")
    p.add_argument("--skip-unsupported", action="store_true", help="leave out T5 components (no LoRA loader)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser(
        "export-peft", help="write each component as a PEFT DeLoRA adapter (OUT_DIR/<component>)"
    )
    p.add_argument("adapter")
    p.add_argument("out_dir")
    p.add_argument("--component", default=None, help="component of a PEFT adapter (e.g. unet)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/<component> folders that exist")

    p = sub.add_parser("merge", help="write a full diffusers model directory with the update baked in")
    p.add_argument("--base", required=True, help="base pipeline: a directory or hub repo id")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="output directory (a complete diffusers pipeline)")
    p.add_argument("--scale", type=float, default=None, help="lambda scale to bake in (default: 1)")
    p.add_argument("--component", default=None, help="component of a PEFT adapter (e.g. unet)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a non-empty folder")

    sub.add_parser("app", help="start the Gradio app (arguments are passed on to it)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "app":
        from .app import main as app_main  # lazy: gradio is an optional extra

        result = app_main(argv[1:])
        return int(result or 0)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from .io import DeLoRAFileError

    try:
        if getattr(args, "scale", None) is not None:
            finite_number(args.scale, "--scale")
        return {
            "inspect": _inspect,
            "export-lora": _export_lora,
            "export-peft": _export_peft,
            "merge": _merge,
        }[args.command](args)
    except (DeLoRAFileError, ValueError, TypeError) as err:
        return _fail(args.command, str(err))
    except OSError as err:  # missing inputs, unwritable outputs, existing outputs, a full disk
        return _fail(args.command, _os_error_message(err))


def _fail(command: str, message: str) -> int:
    print(f"delora-diffusion {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _os_error_message(err: OSError) -> str:
    """Our own messages as they are; the system's (permission denied, ...) with the path it concerns."""
    if err.strerror and err.filename:
        return f"cannot use {str(err.filename)!r}: {err.strerror}"
    return str(err)


def _inspect(args: argparse.Namespace) -> int:
    from . import io

    data = io.load_adapter(args.adapter, component=args.component)
    rows = io.layer_report(data, scale=args.scale)
    meta = data.metadata
    if args.json:
        print(
            json.dumps(
                {"source": data.source, "kind": data.kind, "metadata": meta, "layers": rows}, default=str
            )
        )
        return 0
    print(
        f"adapter: {data.source} ({data.kind}"
        + (f", format v{meta['format_version']})" if meta.get("format_version") else ")")
    )
    print(
        f"base model: {meta.get('base_model') or 'unknown'}; pipeline: {meta.get('pipeline_class') or 'unknown'}"
    )
    print("components:")
    for component in data.tensors:
        mine = [r for r in rows if r["component"] == component]
        config = data.config(component)
        lambdas = [r["lambda"] for r in mine]
        ranks = sorted({r["rank"] for r in mine})
        cls = meta.get("component_classes", {}).get(component, "?")
        bound = (
            f"relative bound rho {config.relative_bound:g} (|dW| <= rho |W| per layer)"
            if config.relative_bound is not None
            else "absolute lambda (no relative bound)"
        )
        print(
            f"  {component or '(not routed)'} ({cls}): {len(mine)} layers, rank {ranks}, init {config.init}, "
            f"{bound}, lambda min {min(lambdas):.4g} mean {sum(lambdas) / len(lambdas):.4g} max {max(lambdas):.4g}"
        )
    print(f"layers (|dW| at lambda scale {args.scale:g}):")
    header = ("component", "layer", "rank", "rho", "lambda", "bound |dW|", "|dW|", "|dW|/|W|", "bound/|W|")
    table = [
        (
            r["component"],
            r["layer"],
            str(r["rank"]),
            "-" if r["rho"] is None else f"{r['rho']:g}",
            f"{r['lambda']:.4g}",
            f"{r['bound']:.4g}",
            f"{r['delta_norm']:.4g}",
            f"{r['relative_delta']:.4g}",
            f"{r['relative_bound']:.4g}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in [header, *table]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    shown = {k: v for k, v in meta.items() if k not in ("checksum",)}
    print("metadata:")
    print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    from . import export

    out = export.export_lora(
        args.adapter,
        args.out,
        format=args.format,
        scale=args.scale,
        skip_unsupported=args.skip_unsupported,
        component=args.component,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.format} LoRA (lambda scale {args.scale:g}, alpha = rank) to {out}")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    from . import export

    out = Path(args.out_dir)
    if _non_empty(out) and not args.overwrite:
        raise FileExistsError(
            f"{str(out)!r} is not empty; pass --overwrite to replace its component folders."
        )
    written = export.export_peft(args.adapter, out, component=args.component, overwrite=args.overwrite)
    for component, path in written.items():
        print(f"wrote PEFT DeLoRA adapter for {component} to {path}")
    return 0


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _merge(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from . import export, io, pipeline

    out = Path(args.out)
    if _non_empty(out) and not args.overwrite:
        raise FileExistsError(
            f"{str(out)!r} is not empty; pass --overwrite to replace it with the merged model."
        )
    data = io.load_adapter(args.adapter, component=args.component)  # validate before the (slow) base load
    base = Path(args.base)
    if not base.exists() and io.looks_like_local_path(args.base):  # a typo is not sent to the hub
        raise FileNotFoundError(
            f"Base model {args.base!r} does not exist; pass a pipeline directory or hub id."
        )
    try:
        pipe: Any = DiffusionPipeline.from_pretrained(args.base, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Could not load the base pipeline {args.base!r} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "pass a diffusers pipeline directory or hub repo id."
        ) from None
    pipeline.load_delora_weights(pipe, data, component=args.component)
    pipeline.bake_delora(pipe, scale=args.scale)
    export.replace_directory(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), whole=True)
    print(
        f"wrote {type(pipe).__name__} with the adapter baked in (lambda scale {args.scale or 1:g}) to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
