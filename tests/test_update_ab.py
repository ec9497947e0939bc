"""benchmarks/update_ab.py: a git revision's layer update timed against this tree's, on tiny shapes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import update_ab  # noqa: E402


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_a_revision_runs_next_to_this_tree(init, capsys):
    rows = update_ab.main(["--against", "HEAD", "--init", init, "--rounds", "2", "--rank", "4", "--quick"])
    assert [row["shape"] for row in rows] == [(8, 8, 1, True), (16, 12, 40, False)]
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in rows)
    assert "| 16 → 12, 40 (no x grad) |" in capsys.readouterr().out


@pytest.mark.parametrize("revision", ["no-such-rev", "fc05e68^"])  # unknown; older than update.py
def test_a_revision_without_an_update_is_refused_with_its_name(revision):
    with pytest.raises(SystemExit, match="cannot read update.py at .*" + revision.replace("^", r"\^")):
        update_ab.main(["--against", revision, "--quick"])
