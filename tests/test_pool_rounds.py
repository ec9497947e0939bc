"""benchmarks/pool_rounds.py: per-round paired ratios pooled over runs, on speed.py-shaped JSON files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pool_rounds  # noqa: E402


def _run(path: Path, lora: list[float], factors: dict[str, float]) -> Path:
    rows = [{"config": "layout", "variant": "peft-lora", "step_ms_all": lora}]
    rows += [
        {"config": "layout", "variant": v, "step_ms_all": [f * t for t in lora]} for v, f in factors.items()
    ]
    rows.append(
        {"config": "layout, compiled", "variant": "ours-zero", "compiled": True, "step_ms_all": [1.0]}
    )
    path.write_text(json.dumps({"train": rows}))
    return path


def test_paired_ratios_cancel_drift_between_rounds_and_pool_over_runs(tmp_path, capsys):
    # LoRA's own step drifts by 2x across rounds; the paired ratios do not see it.
    first = _run(tmp_path / "a.json", [100.0, 200.0, 150.0], {"ours-zero": 1.02, "peft-delora": 1.10})
    second = _run(tmp_path / "b.json", [90.0, 300.0], {"ours-zero": 1.04, "peft-delora": 1.10})
    summary = pool_rounds.main([str(first), str(second)])
    zero = summary[("ours-zero", "peft-lora")]
    assert zero["median"] == pytest.approx(1.02)  # 3 rounds at 1.02, 2 at 1.04
    assert 1.02 - 1e-9 <= zero["low"] <= zero["high"] <= 1.04 + 1e-9
    assert summary[("ours-zero", "peft-delora")]["median"] == pytest.approx(1.02 / 1.10)
    assert summary[("peft-delora", "peft-lora")]["median"] == pytest.approx(1.10)
    assert ("peft-lora", "peft-delora") not in summary  # each reference only against the others
    assert "| ours-zero | peft-lora | 5 | 1.020 |" in capsys.readouterr().out


def test_a_missing_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pool_rounds.main([str(tmp_path / "nowhere.json")])
    assert exit_info.value.code == 2
    assert "nowhere.json" in capsys.readouterr().err


def test_files_that_are_not_uncompiled_speed_runs_are_refused(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        pool_rounds.main([str(other)])
    assert "not a speed.py --json output" in capsys.readouterr().err
    compiled_only = tmp_path / "compiled.json"
    row = {"config": "c", "variant": "peft-lora", "compiled": True, "step_ms_all": [1.0]}
    compiled_only.write_text(json.dumps({"train": [row]}))
    with pytest.raises(SystemExit):
        pool_rounds.main([str(compiled_only)])
    assert "no uncompiled peft-lora rows" in capsys.readouterr().err
