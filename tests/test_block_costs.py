"""benchmarks/block_costs.py on tiny transformer blocks: every variant trains and is compared to LoRA."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import block_costs  # noqa: E402


def test_block_costs_reports_paired_ratios_for_every_variant(capsys):
    args = ["--blocks", "1", "--dim", "32", "--head-dim", "8", "--tokens", "4", "--text-dim", "16"]
    result = block_costs.main(
        args + ["--text-tokens", "5", "--rank", "4", "--rounds", "2", "--checkpointing"]
    )
    assert set(result) == {"ours-paper", "ours-zero", "peft-lora", "peft-delora"}
    assert result["peft-lora"]["paired"] == 1.0
    assert all(math.isfinite(row["ms"]) and row["ms"] > 0 and row["paired"] > 0 for row in result.values())
    assert "| ours-paper |" in capsys.readouterr().out


def test_bad_shapes_are_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        block_costs.main(["--dim", "30", "--head-dim", "8"])
    assert "not a multiple of --head-dim" in capsys.readouterr().err
