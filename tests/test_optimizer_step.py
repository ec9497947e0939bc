"""benchmarks/optimizer_step.py times the three AdamW implementations on the embedded default's adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import optimizer_step  # noqa: E402


def test_optimizer_step_reports_every_implementation(capsys):
    ms = optimizer_step.main(["--rounds", "2"])
    assert set(ms) == {"loop", "foreach", "fused"} and all(v > 0 for v in ms.values())
    out = capsys.readouterr().out
    assert "| fused |" in out and "210 tensors" in out  # the bundled default: A, B and lambda of 70 layers


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        optimizer_step.main(["--rounds", "0"])
