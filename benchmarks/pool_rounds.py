"""Pool several speed.py runs: per-round paired step ratios, their median and a bootstrap 95% interval.

    python benchmarks/pool_rounds.py benchmarks/speed_sdxl_layout_cpu_s8a.json benchmarks/speed_sdxl_layout_cpu_s8b.json

Each round of ``speed.py`` runs every variant once, so a variant's step over PEFT LoRA's (or PEFT DeLoRA's)
in the same round cancels the machine's drift between rounds; on a shared CPU that drift moves a single run's
ratio of medians by ±5%. Pooling the paired ratios of several runs and resampling them gives an interval to
hold a target against.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

REFERENCES = ("peft-lora", "peft-delora")


def paired_ratios(files: list[Path]) -> dict[tuple[str, str], list[float]]:
    """{(variant, reference): per-round step ratios} over every run in `files` (compiled rows skipped)."""
    pooled: dict[tuple[str, str], list[float]] = {}
    for file in files:
        for config in _by_config(json.loads(file.read_text())["train"]).values():
            for reference in REFERENCES:
                if reference not in config:
                    continue
                for variant, row in config.items():
                    if variant in REFERENCES[: REFERENCES.index(reference) + 1]:
                        continue
                    pairs = zip(row["step_ms_all"], config[reference]["step_ms_all"], strict=True)
                    pooled.setdefault((variant, reference), []).extend(a / b for a, b in pairs)
    return pooled


def _by_config(rows: list[dict]) -> dict[str, dict[str, dict]]:
    configs: dict[str, dict[str, dict]] = {}
    for row in rows:
        if not row.get("compiled", False):
            configs.setdefault(row["config"], {})[row["variant"]] = row
    return configs


def bootstrap_interval(ratios: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 2.5% and 97.5% points of the median over `draws` resamples of `ratios`."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main(argv: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="speed.py --json outputs")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        pooled = paired_ratios(args.files)
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not speed.py's rows
        parser.error(
            f"not a speed.py --json output ({type(error).__name__}: {error}); pass the files --json wrote"
        )
    if not pooled:
        parser.error(
            "these runs have no uncompiled peft-lora rows to pair with (compiled rows are skipped); "
            "pass speed.py runs made without --compile"
        )
    summary = {}
    print(
        "| variant | over | rounds | median paired ratio | 95% interval |\n| --- | --- | ---: | ---: | --- |"
    )
    for (variant, reference), ratios in pooled.items():
        low, high = bootstrap_interval(ratios)
        summary[(variant, reference)] = {"median": statistics.median(ratios), "low": low, "high": high}
        print(
            f"| {variant} | {reference} | {len(ratios)} | {statistics.median(ratios):.3f} | {low:.3f}–{high:.3f} |"
        )
    return summary


if __name__ == "__main__":
    main()
