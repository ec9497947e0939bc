"""benchmarks/step_ops.py counts each variant's kernel launches per step (tiny UNet, in-process)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_ops  # noqa: E402


def test_step_ops_counts_launches_in_the_gpu_setting(capsys):
    totals = step_ops.main(["--quick"])
    # The accelerator path: fewer launches than PEFT LoRA (casts and scaling once per group, not per layer),
    # far fewer than PEFT's DeLoRA and than ours on the CPU's per-layer path.
    assert totals["ours-zero"] < totals["peft-lora"] < totals["peft-delora"]
    assert totals["ours-paper"] < totals["ours-paper-per-layer"]
    assert totals["ours-zero"] < totals["ours-zero-per-layer"]
    table = capsys.readouterr().out
    assert "| ours-paper |" in table and "per adapted layer" in table


def test_step_ops_refuses_a_latent_the_unet_cannot_halve(capsys):
    import pytest

    with pytest.raises(SystemExit):
        step_ops.main(["--quick", "--latent", "12"])
    assert "--latent 12: use a multiple of 8" in capsys.readouterr().err
