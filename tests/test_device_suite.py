"""benchmarks/device_suite.py --smoke: the GPU suite's code paths on a CPU with tiny shapes.

A reduced subset, to keep CI short: ``speed_compiled`` (torch.compile of the speed variants; compile itself is
covered by tests/test_compile.py) and ``train_sdxl`` (the SDXL family is covered by tests/test_training.py) are
skipped here. The full ``--smoke`` runs every section in about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_suite_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--smoke", "--out", str(tmp_path)]
    cmd += ["--skip", "speed_compiled", "train_sdxl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "device suite ok"
    results = json.loads((tmp_path / "device_suite.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"speed_eager", "inference", "train_sd15"} and not results["failed"]
    rows = sections["speed_eager"]["result"]
    assert {r["variant"] for r in rows} == {"ours-paper", "ours-zero", "peft-lora", "peft-delora"}
    assert sections["inference"]["result"]["fused_max_abs_diff"] < 1e-3
    assert sections["train_sd15"]["result"]["adapter_mib"] > 0
    assert "device suite ok" in (tmp_path / "device_suite.log").read_text()
