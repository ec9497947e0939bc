"""Batched factor refresh: a few ops per group of same-shaped layers instead of ~10 per layer.

Before each forward of a model that has adapters, a pre-hook gathers every adapter whose cached factors are
stale (always all of them while training: the last backward freed their graph), groups them by
(shape, rank, init, dtype, device), and folds each group with one stacked call of
:func:`delora_diffusion.functional.fold_factors`. The results are unbound into per-layer caches, which the
layers use for the whole step, so checkpointed recomputes see the very same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional
from .layers import DeLoRAAdapter, DeLoRAAdapters, compute_dtype

ENABLED = True
"""Module switch for benchmarks and debugging: False makes every layer fold its own factors."""

_structure_version = 0


def structure_changed() -> None:
    """Call after adding or removing adapters anywhere, so cached plans are rebuilt."""
    global _structure_version
    _structure_version += 1


@dataclass
class _Group:
    adapters: list[DeLoRAAdapter]
    rank: int
    w: torch.Tensor  # (L, in), stacked once: the norms are frozen
    A0: torch.Tensor | None = None  # (L, r, in) for the paper init
    B0: torch.Tensor | None = None


@dataclass
class _Plan:
    version: int
    layers: list[tuple[nn.Module, DeLoRAAdapter]]
    groups: dict[tuple, _Group] = field(default_factory=dict)


def _layers_under(root: nn.Module) -> list[tuple[nn.Module, DeLoRAAdapter]]:
    """(frozen layer, adapter) pairs under `root`."""
    return [
        (m, a)
        for m in root.modules()
        if isinstance(m._modules.get("delora"), DeLoRAAdapters)
        for a in m.delora.values()
    ]


def _group_key(adapter: DeLoRAAdapter) -> tuple:
    A, B = adapter.delora_A, adapter.delora_B
    return (A.shape[1], B.shape[0], adapter.rank, adapter.init, A.dtype, A.device)


def _plan_for(root: nn.Module) -> _Plan:
    plan = root.__dict__.get("_delora_plan")
    if plan is None or plan.version != _structure_version:
        plan = _Plan(_structure_version, _layers_under(root))
        root.__dict__["_delora_plan"] = plan
    return plan


def _group(plan: _Plan, key: tuple, members: list[DeLoRAAdapter]) -> _Group:
    """Stacked frozen tensors for this exact member list (rebuilt when membership or storage changes)."""
    group = plan.groups.get(key)
    if group is None or group.adapters != members or group.w.device != members[0].delora_A.device:
        w = torch.stack([a.delora_w_norm for a in members])
        A0 = B0 = None
        if members[0].init == "paper":
            A0 = torch.stack([a.delora_A0 for a in members])
            B0 = torch.stack([a.delora_B0 for a in members])
        group = _Group(members, members[0].rank, w, A0, B0)
        plan.groups[key] = group
    return group


def _is_materialized(adapter: DeLoRAAdapter) -> bool:
    """Sharded parameters (FSDP) are skipped here; those layers fold their own factors when unsharded."""
    return (
        adapter.delora_A.numel() == adapter.rank * adapter.delora_w_norm.numel()
        and adapter.delora_A.numel() > 0
    )


def refresh_factors(root: nn.Module) -> None:
    """Fold the factors of every stale adapter under `root`, batched per group."""
    plan = _plan_for(root)
    training = torch.is_grad_enabled()
    stale: dict[tuple, list[DeLoRAAdapter]] = {}
    for base, adapter in plan.layers:
        if base.delora.disabled or not adapter.contributes() or not _is_materialized(adapter):
            continue
        dtype = compute_dtype(base)
        if training and adapter.delora_A.requires_grad or not adapter.cache_is_fresh(dtype):
            stale.setdefault(_group_key(adapter) + (dtype,), []).append(adapter)
    for key, members in stale.items():
        group = _group(plan, key, members)
        A = torch.stack([a.delora_A for a in members])
        B = torch.stack([a.delora_B for a in members])
        lam = torch.stack([a.delora_lambda for a in members])
        mults = [a.multiplier for a in members]
        if len(set(mults)) == 1:
            mult: float | torch.Tensor = mults[0]
        else:
            mult = torch.tensor(mults, dtype=lam.dtype, device=lam.device).unsqueeze(-1)
        A_f, B_f = functional.fold_factors(A, B, lam, group.w, group.rank, mult, group.A0, group.B0)
        dtype = key[-1]
        A_f, B_f = A_f.to(dtype), B_f.to(dtype)
        for adapter, a_f, b_f in zip(members, A_f.unbind(0), B_f.unbind(0), strict=True):
            adapter.set_cache(a_f, b_f, adapter.stamp(dtype))


def refresh_pre_hook(root: nn.Module, args: tuple) -> None:
    if ENABLED:
        refresh_factors(root)
