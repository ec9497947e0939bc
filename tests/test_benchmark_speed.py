"""Smoke test of benchmarks/speed.py --quick: output format and finite numbers (no timing assertions)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_quick_runs_and_reports(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--rounds", "1", "--warmup", "1"]
    cmd += ["--batch", "1", "--latent", "8", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1]), lines[-1]
    assert "| variant |" in proc.stdout and "lambda change fused" in proc.stdout

    results = json.loads(out.read_text())
    variants = {row["variant"] for row in results["train"]}
    assert variants == {"ours-paper", "ours-zero", "peft-lora", "peft-delora"}
    for row in results["train"]:
        for key in ("step_ms", "cpu_ms", "vs_peft_lora", "saved_mib", "state_mib", "peak_mib", "final_loss"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["variant"], key, row[key])
        assert row["trainable_params"] > 0
    (inference,) = results["inference"]
    assert all(math.isfinite(v) and v >= 0 for v in inference["ms"].values())
    assert inference["fused_max_abs_diff"] < 1e-3  # merged and unmerged forwards agree
    assert float(lines[-1].split()[1]) == round(results["ratio"], 2)


def test_speed_compiled_against_uncompiled_in_the_same_rounds(tmp_path):
    """--compile BACKEND --with-uncompiled: every variant compiled and uncompiled, interleaved, compared."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--rounds", "1", "--warmup", "1"]
    cmd += ["--batch", "1", "--latent", "8", "--no-inference", "--variants", "ours-paper", "peft-lora"]
    cmd += ["--compile", "eager", "--with-uncompiled", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["train"]}
    assert set(rows) == {"ours-paper", "peft-lora", "ours-paper uncompiled", "peft-lora uncompiled"}
    for name in ("ours-paper", "peft-lora"):
        compiled, eager = rows[name], rows[f"{name} uncompiled"]
        assert compiled["compiled"] and not eager["compiled"]
        assert compiled["vs_uncompiled"] == compiled["step_ms"] / eager["step_ms"]
        assert math.isfinite(compiled["final_loss"]) and math.isfinite(eager["final_loss"])
    assert rows["peft-lora uncompiled"]["vs_peft_lora"] == 1.0  # uncompiled rows against uncompiled LoRA
    assert "ours-paper: compiled / uncompiled step" in proc.stdout
    assert re.fullmatch(r"ratio: \d+\.\d\d", proc.stdout.strip().splitlines()[-1])

    bad = subprocess.run(cmd[:2] + ["--quick", "--with-uncompiled"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--with-uncompiled compares against --compile" in bad.stderr
