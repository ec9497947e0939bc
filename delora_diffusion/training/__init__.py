"""DreamBooth training of DeLoRA adapters for SD1.x/2.x, SDXL, SD3 and Flux (``train_scripts/dreambooth_delora.py``).

Pieces: :mod:`.args` (flags and the embedded-default hyperparameters), :mod:`.data`, :mod:`.families` (one small
strategy per model family), :mod:`.loop` (the accelerate run), :mod:`.checkpointing`, :mod:`.validation`,
:mod:`.model_card`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .args import DEFAULT_OUTPUT_DIR, EMBEDDED_DEFAULTS, GENERIC_DEFAULTS, build_parser, parse_args
from .util import TrainingConfigError, TrainingDiverged


def train(args):  # noqa: ANN001, ANN201 - re-exported lazily: importing the loop pulls in diffusers
    """Run training; see :func:`delora_diffusion.training.loop.train`."""
    from .loop import train as _train

    return _train(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Script entry point: user errors become one clear line on stderr and exit status 2 (1 for divergence)."""
    try:
        train(parse_args(argv))
    except TrainingConfigError as err:
        print(f"dreambooth_delora.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"dreambooth_delora.py: error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "EMBEDDED_DEFAULTS",
    "GENERIC_DEFAULTS",
    "TrainingConfigError",
    "TrainingDiverged",
    "build_parser",
    "main",
    "parse_args",
    "train",
]
