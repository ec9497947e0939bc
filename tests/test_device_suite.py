"""benchmarks/device_suite.py --smoke: the GPU suite's code paths on a CPU with tiny shapes.

A reduced subset, to keep CI short: ``speed_compiled`` (torch.compile of the speed variants; compile itself is
covered by tests/test_compile.py) and ``train_sdxl`` (the SDXL family is covered by tests/test_training.py) are
skipped here. The full ``--smoke`` runs every section in about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_suite  # noqa: E402


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
    variants = {r["variant"]: r for r in rows}
    assert set(variants) == {"ours-paper", "ours-zero", "peft-lora", "peft-delora", "ours-paper-per-layer"}
    # the smoke takes the GPU's fast path (factor fold), whose plain matmuls keep the factors for backward
    assert variants["ours-paper"]["saved_mib"] > variants["ours-paper-per-layer"]["saved_mib"]
    assert sections["inference"]["result"]["fused_max_abs_diff"] < 1e-3
    assert sections["train_sd15"]["result"]["adapter_mib"] > 0
    assert "device suite ok" in (tmp_path / "device_suite.log").read_text()


def test_a_section_past_the_budget_is_stopped_and_the_rest_skipped(tmp_path, monkeypatch):
    """The device's minutes are few: a section still running when the budget ends is stopped, later ones are
    skipped, the JSON says which, and the last line does not say ok."""
    monkeypatch.setattr(device_suite, "MIN_SECTION_S", 0.5)
    suite = device_suite.Suite(tmp_path, budget=1.5)
    suite.section("quick", lambda: {"value": 1})
    start = time.perf_counter()
    suite.section("slow", lambda: time.sleep(30))
    assert time.perf_counter() - start < 5
    suite.section("later", lambda: pytest.fail("a section with no time left ran"))
    sections = json.loads((tmp_path / "device_suite.json").read_text())["sections"]
    assert sections["quick"]["ok"] and sections["quick"]["result"] == {"value": 1}
    assert not sections["slow"]["ok"] and sections["slow"]["over_budget"]
    assert sections["later"] == {"ok": False, "skipped": True, "seconds": 0.0}
    assert suite.summary() == "device suite FAILED: failed or stopped: slow; skipped for time: later"


def test_a_stopped_training_run_takes_its_children_with_it(tmp_path):
    """accelerate launch runs the script as a child: stopping the launcher alone would leave the script
    holding the GPU while the next sections run."""
    pid_file = tmp_path / "child.pid"
    command = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    start = time.perf_counter()
    with pytest.raises(device_suite.OverBudget):
        device_suite._within(1.0, lambda: device_suite._run_killable(command, dict(os.environ)))
    assert time.perf_counter() - start < 10, "the stopped run waited for its child to finish"
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the training run's child {child} still runs")


def test_budget_must_be_positive():
    with pytest.raises(SystemExit):
        device_suite.main(["--smoke", "--budget", "0"])


def test_a_section_that_catches_exceptions_is_stopped_all_the_same(tmp_path, monkeypatch):
    """torch.compile and the libraries have ``except Exception`` fallbacks: the budget's stop gets past them."""
    monkeypatch.setattr(device_suite, "MIN_SECTION_S", 0.1)

    def swallowing() -> None:
        for _ in range(100):
            try:
                time.sleep(0.5)
            except Exception:  # noqa: BLE001, S110 - what a library fallback does
                pass

    suite = device_suite.Suite(tmp_path, budget=1.0)
    start = time.perf_counter()
    suite.section("swallowing", swallowing)
    assert time.perf_counter() - start < 5
    assert json.loads((tmp_path / "device_suite.json").read_text())["sections"]["swallowing"]["over_budget"]
