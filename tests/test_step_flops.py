"""benchmarks/step_flops.py counts what each variant's step must compute (tiny UNet, in-process)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_flops  # noqa: E402


def test_step_flops_orders_the_variants_by_the_arithmetic_they_add(capsys):
    flops = step_flops.main(["--quick"])
    assert flops["peft-delora"] == flops["peft-lora"] > 0  # PEFT's DeLoRA adds elementwise work only
    assert flops["ours-zero"] > flops["peft-lora"]  # the hidden recomputed in backward
    assert flops["ours-paper"] > flops["ours-zero"]  # and the frozen pair's matmuls
    table = capsys.readouterr().out
    assert "| ours-paper |" in table and "× PEFT LoRA" in table
