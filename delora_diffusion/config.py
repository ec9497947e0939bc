"""DeLoRAConfig: what to adapt and how. Validated on creation, so a bad value fails before any model changes."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

INITS = ("paper", "zero")
DEFAULT_LAMBDA = 15.0
"""PEFT's lambda, used when neither lambda_init nor relative_bound is given (old files, PEFT compatibility)."""
MAX_RELATIVE_BOUND = 10.0
"""rho above this bounds nothing a user would want (dW ten times the weight); refused as a likely typo."""
DTYPES = ("float32", "float16", "bfloat16")


def name_matches(name: str, key: str) -> bool:
    """PEFT's pattern rule: `key` matches the whole name or its dotted tail, as a regex."""
    return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None


@dataclass
class DeLoRAConfig:
    """Settings of one DeLoRA adapter.

    target_modules: a list of module-name suffixes (``["to_q", "to_v"]``), a regex string matched against the
    full module name, a preset name (``"unet"``, ``"sd3"``, ``"flux"``, ``"clip"``, ``"t5"``, ... see
    :data:`delora_diffusion.targets.PRESETS`), or ``None`` to pick the preset from the model class.
    rank_pattern / lambda_pattern map name patterns (suffix or regex) to per-layer rank / initial lambda.
    module_dropout drops a whole layer's update with that probability at each training forward.

    relative_bound (rho) is the bound a user can read: every adapted layer keeps |dW|_F <= rho * |W|_F at every
    step of training, whatever the learning rate (lambda is projected onto |lambda| <= lambda_max, see
    :func:`delora_diffusion.functional.lambda_limit`, and starts at lambda_max). It replaces the absolute
    lambda_init, whose bound means something different on every layer width; the two are mutually
    exclusive. relative_bound_pattern sets rho per layer like lambda_pattern sets lambda.
    """

    rank: int = 8
    lambda_init: float | None = None
    relative_bound: float | None = None
    relative_bound_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "paper"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)
    module_dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_rank(self.rank, "rank")
        self._check_bound_settings()
        if self.init not in INITS:
            raise ValueError(f"DeLoRAConfig.init must be one of {INITS}, got {self.init!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"DeLoRAConfig.dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if not (isinstance(self.module_dropout, (int, float)) and 0.0 <= self.module_dropout < 1.0):
            raise ValueError(f"DeLoRAConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}.")
        for key, value in self.rank_pattern.items():
            _check_rank(value, f"rank_pattern[{key!r}]")
        for key, value in self.lambda_pattern.items():
            _check_lambda(value, f"lambda_pattern[{key!r}]")
        for patterns in (self.target_modules, self.exclude_modules):
            for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"Module patterns must be non-empty strings, got {pattern!r}.")
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"Module pattern {pattern!r} is not a valid regex: {err}.") from None
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    def _check_bound_settings(self) -> None:
        relative = self.relative_bound is not None or bool(self.relative_bound_pattern)
        if relative and (self.lambda_init is not None or self.lambda_pattern):
            raise ValueError(
                "DeLoRAConfig: relative_bound (rho) and lambda_init / lambda_pattern are mutually exclusive: "
                "with rho each layer's lambda starts at its own bound. Set one of them."
            )
        if self.relative_bound_pattern and self.relative_bound is None:
            raise ValueError("DeLoRAConfig.relative_bound_pattern needs a default relative_bound as well.")
        if relative:
            _check_rho(self.relative_bound, "relative_bound")
            for key, value in self.relative_bound_pattern.items():
                _check_rho(value, f"relative_bound_pattern[{key!r}]")
            return
        if self.lambda_init is None:
            self.lambda_init = DEFAULT_LAMBDA
        _check_lambda(self.lambda_init, "lambda_init")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.rank)

    def lambda_for(self, module_name: str) -> float | None:
        """The initial lambda of a layer; None under a relative bound (lambda starts at the layer's limit)."""
        if self.relative_bound is not None:
            return None
        return float(_pattern_value(self.lambda_pattern, module_name, self.lambda_init))

    def relative_bound_for(self, module_name: str) -> float | None:
        if self.relative_bound is None:
            return None
        return float(_pattern_value(self.relative_bound_pattern, module_name, self.relative_bound))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown DeLoRAConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if name_matches(module_name, key):
            return value
    return default


def _check_rank(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DeLoRAConfig.{what} must be a positive integer, got {value!r}.")


def _check_rho(value: Any, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= MAX_RELATIVE_BOUND
    ):
        raise ValueError(
            f"DeLoRAConfig.{what} must be a number in (0, {MAX_RELATIVE_BOUND}] (e.g. 0.05 for |dW| <= 5% of "
            f"|W|), got {value!r}."
        )


def _check_lambda(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"DeLoRAConfig.{what} must be a finite number, got {value!r}.")
