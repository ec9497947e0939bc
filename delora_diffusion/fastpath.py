"""Batched factor refresh: a few ops per group of same-shaped layers instead of ~10 per layer.

Before each forward of a model that has adapters, a pre-hook gathers every adapter whose cached factors are
stale (always all of them while training: the last backward freed their graph), groups them by
(shape, rank, init, dtype, device), and folds each group with one stacked call of
:func:`delora_diffusion.functional.fold_factors`. The results are unbound into per-layer caches, which the
layers use for the whole step, so checkpointed recomputes see the very same tensors.
"""

from __future__ import annotations

import sys
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
    frozen_versions: tuple  # versions / storages of the members' frozen tensors when stacked
    w: torch.Tensor  # (L, in), stacked once: the norms are frozen
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # paper init: (A0 diag(w), -B0 / (r|a0||b0|))


@dataclass
class _Entry:
    """Per-layer facts the refresh needs every step, looked up once per plan (Module.__getattr__ is slow)."""

    base: nn.Module
    container: DeLoRAAdapters
    adapter: DeLoRAAdapter
    key: tuple


@dataclass
class _Plan:
    version: int
    entries: list[_Entry]
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
    """The static part of a layer's group: shapes, rank and init (dtype and device are read every step)."""
    A, B = adapter.delora_A, adapter.delora_B
    return (A.shape[1], B.shape[0], adapter.rank, adapter.init)


def _plan_for(root: nn.Module) -> _Plan:
    plan = root.__dict__.get("_delora_plan")
    if plan is None or plan.version != _structure_version:
        entries = [_Entry(m, m._modules["delora"], a, _group_key(a)) for m, a in _layers_under(root)]
        plan = _Plan(_structure_version, entries)
        root.__dict__["_delora_plan"] = plan
    return plan


def _frozen_versions(members: list[DeLoRAAdapter]) -> tuple:
    """Changes when a frozen tensor is replaced or written in place (e.g. by ``load_state_dict``)."""
    return tuple(
        (t._version, t.data_ptr())
        for a in members
        for t in (a._buffers.get("delora_w_norm"), a._buffers.get("delora_A0"), a._buffers.get("delora_B0"))
        if t is not None
    )


def _group(plan: _Plan, key: tuple, members: list[DeLoRAAdapter]) -> _Group:
    """Stacked, pre-folded frozen tensors for this exact member list (rebuilt when any of them changes)."""
    group = plan.groups.get(key)
    versions = _frozen_versions(members)
    if group is None or group.adapters != members or group.frozen_versions != versions:
        with torch.no_grad():
            w = torch.stack([a.delora_w_norm for a in members])
            frozen = None
            if members[0].init == "paper":
                A0 = torch.stack([a.delora_A0 for a in members])
                B0 = torch.stack([a.delora_B0 for a in members])
                frozen = functional.frozen_pair_factors(A0, B0, w, members[0].rank)
        group = _Group(members, members[0].rank, versions, w, frozen)
        plan.groups[key] = group
    return group


def _is_materialized(adapter: DeLoRAAdapter) -> bool:
    """Sharded parameters are skipped here; those layers fold their own factors in their forward, unsharded.

    FSDP2 shards into DTensors (whose shape is the full one), FSDP1 into flat 1-D views, ZeRO-3 into empty
    tensors; only a plain tensor of the full (rank, in) shape can be stacked.
    """
    A = adapter._parameters["delora_A"]
    full = (adapter.rank, adapter._buffers["delora_w_norm"].numel())
    return A.shape == full and A.numel() > 0 and not _is_dtensor(A)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Without importing torch.distributed.tensor (half a second): no DTensor exists before it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class _FoldGroup(torch.autograd.Function):
    """Fold a whole group's factors in one node, keeping only the parameters themselves for backward.

    Autograd over the stacked ops would keep the stacked copies of A and B and every intermediate (norms,
    scales); here backward re-stacks the parameters (which exist anyway) and applies the closed-form
    gradients of ``A' = A diag(w)`` and ``B' = B diag(lam * mult * u)``, ``u = 1 / (r |a| |b|)`` (norms
    clamped at :data:`functional.NORM_EPS`), plus lambda's share of the frozen columns. Same math as
    :func:`functional.fold_factors`; just fewer, larger ops and no saved intermediates.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        group: _Group,
        mult: float | torch.Tensor,
        n: int,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        A, B, lam = (torch.stack(params[i * n : (i + 1) * n]) for i in range(3))
        ctx.group, ctx.mult, ctx.n = group, mult, n
        ctx.save_for_backward(*params)
        return functional.fold_factors_frozen(A, B, lam, group.w, group.rank, mult, group.frozen)

    @staticmethod
    def backward(ctx, grad_A_f: torch.Tensor, grad_B_f: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        group, mult, n = ctx.group, ctx.mult, ctx.n
        params = ctx.saved_tensors
        A, B, lam = (torch.stack(params[i * n : (i + 1) * n]) for i in range(3))
        r = group.rank
        a_raw, b_raw = A.norm(dim=-1), B.norm(dim=-2)  # (L, r)
        a_norm, b_norm = a_raw.clamp_min(functional.NORM_EPS), b_raw.clamp_min(functional.NORM_EPS)
        unit = mult / (r * a_norm * b_norm)  # d scale / d lam
        scales = lam * unit
        g_B_f = grad_B_f[..., :r]
        grad_A = grad_A_f[..., :r, :] * group.w.unsqueeze(-2)
        grad_B = g_B_f * scales.unsqueeze(-2)
        grad_scales = (g_B_f * B).sum(dim=-2)  # (L, r)
        grad_lam = (grad_scales * unit).sum(dim=-1, keepdim=True)
        if group.frozen is not None:
            grad_lam = grad_lam + (grad_B_f[..., r:] * group.frozen[1]).sum(dim=(-2, -1)).unsqueeze(-1) * mult
        # scales = lam * mult / (r |a| |b|): d/d|a| = -scales / |a|, through the clamp (mask |a| >= eps)
        # and the norm (d|a|/da = a / |a|).
        g_norm = grad_scales * scales
        g_a = torch.where(a_raw >= functional.NORM_EPS, -g_norm / (a_norm * a_raw.clamp_min(1e-30)), 0.0)
        g_b = torch.where(b_raw >= functional.NORM_EPS, -g_norm / (b_norm * b_raw.clamp_min(1e-30)), 0.0)
        grad_A = grad_A + g_a.unsqueeze(-1) * A
        grad_B = grad_B + g_b.unsqueeze(-2) * B
        grads = (*grad_A.unbind(0), *grad_B.unbind(0), *grad_lam.unbind(0))
        return (None, None, None, *grads)


def refresh_factors(root: nn.Module) -> None:
    """Fold the factors of every stale adapter under `root`, batched per group."""
    plan = _plan_for(root)
    training = torch.is_grad_enabled()
    stale: dict[tuple, list[DeLoRAAdapter]] = {}
    for entry in plan.entries:
        adapter = entry.adapter
        if entry.container.disabled or not adapter.contributes() or not _is_materialized(adapter):
            continue
        dtype = compute_dtype(entry.base)
        A = adapter._parameters["delora_A"]
        if training and A.requires_grad or not adapter.cache_is_fresh(dtype):
            stale.setdefault(entry.key + (A.dtype, A.device, dtype), []).append(adapter)
    for key, members in stale.items():
        group = _group(plan, key, members)
        params = [a._parameters[k] for k in ("delora_A", "delora_B", "delora_lambda") for a in members]
        mults = [a.multiplier for a in members]
        if len(set(mults)) == 1:
            mult: float | torch.Tensor = mults[0]
        else:
            mult = torch.tensor(mults, dtype=params[0].dtype, device=params[0].device).unsqueeze(-1)
        A_f, B_f = _FoldGroup.apply(group, mult, len(members), *params)
        dtype = key[-1]
        A_f, B_f = A_f.to(dtype), B_f.to(dtype)
        for adapter, a_f, b_f in zip(members, A_f.unbind(0), B_f.unbind(0), strict=True):
            adapter.set_cache(a_f, b_f, adapter.stamp(dtype))


def refresh_pre_hook(root: nn.Module, args: tuple) -> None:
    if ENABLED:
        refresh_factors(root)
