"""benchmarks/layer_costs.py: times every part it names, leaves the fast path as it found it, refuses bad sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import layer_costs  # noqa: E402

from delora_diffusion import fastpath, fold, update  # noqa: E402


def test_parts_are_timed_for_ours_only_and_unwrapped_after(capsys):
    before = {key: getattr(*key) for key in layer_costs.PARTS}
    threads = torch.get_num_threads()
    rows = layer_costs.main(["--features", "12", "8", "--tokens", "3", "--layers", "2", "--rounds", "1",
                             "--variants", "ours-paper", "peft-lora"])  # fmt: skip
    torch.set_num_threads(threads)
    ours, lora = rows
    for label in ("forward", "backward", "optimizer", *layer_costs.PARTS.values()):
        assert ours[label] > 0, label
    assert set(lora) == {"variant", "forward", "backward", "optimizer"}  # none of our parts ran for LoRA
    assert {key: getattr(*key) for key in layer_costs.PARTS} == before
    assert fastpath.refresh_factors is before[(fastpath, "refresh_factors")]
    assert fold.FoldGroup.forward is before[(fold.FoldGroup, "forward")]
    assert update._DeLoRALinear.backward is before[(update._DeLoRALinear, "backward")]
    assert "| ours-paper |" in capsys.readouterr().out


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        layer_costs.main(["--tokens", "0"])
    assert "must be positive" in capsys.readouterr().err
