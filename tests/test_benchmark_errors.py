"""The benchmark scripts meet bad input with an error that names it, before any model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import default_run  # noqa: E402
import quality  # noqa: E402
import vae_ceiling  # noqa: E402


def exits_with(capsys, fn, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        fn(argv)
    assert info.value.code not in (0, None)
    captured = capsys.readouterr()
    return captured.err + str(info.value.code)


def test_default_run_names_a_missing_run_and_an_unknown_subject(capsys, tmp_path):
    assert "does not exist" in exits_with(capsys, default_run.main, [str(tmp_path / "missing")])
    err = exits_with(capsys, default_run.main, [str(tmp_path), "--subject", "no_such_subject"])
    assert "no_such_subject" in err and "striped_star" in err


def test_quality_from_results_names_a_bad_file(capsys, tmp_path):
    import torch

    threads = torch.get_num_threads()
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    err = exits_with(capsys, quality.main, ["--from_results", str(bad), "--out", str(tmp_path / "out")])
    assert str(bad) in err and "not a results.json" in err
    assert torch.get_num_threads() == threads  # a merge does no torch work and leaves the setting alone


def test_vae_ceiling_rejects_bad_designs_and_sizes(capsys):
    assert "is not a pattern" in exits_with(capsys, vae_ceiling.main, ["star:red:stripy:blue"])
    assert "0 < low <= high < 1" in exits_with(
        capsys, vae_ceiling.main, ["star:red:striped:blue", "--size", "0.8", "0.5"]
    )
