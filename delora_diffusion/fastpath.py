"""Where the forward gets its folded factors: the per-layer cache, the batched refresh, the forward hook.

All cache logic lives here. Each :class:`~delora_diffusion.layers.DeLoRALayer` may hold one cached pair
(A', B') plus the *stamp* it was computed under. A pair goes stale when any input of the fold changes:

- an optimizer step or any in-place write to A, B or lambda (their ``_version`` counters move), or a new
  tensor put in their place (``data_ptr`` moves);
- a write to the frozen w / A0 / B0 (e.g. ``load_state_dict``; the sum of their versions moves);
- a change of the run-time scale (``set_delora_scale``, adapter weights) or of the compute dtype (autocast).

While gradients flow, cached pairs are never reused across forwards: the previous backward freed their graph.
So before each forward of a model with adapters, a pre-hook on the model (:func:`refresh_pre_hook`) gathers
every stale adapter, groups them by (shape, rank, init, dtype, device), and folds each group with one stacked
call of :func:`delora_diffusion.functional.fold_factors` (:class:`_FoldGroup`). The layers then use those
pairs for the whole step, so checkpointed recomputes see the very same tensors.

Under ``torch.compile`` the pre-hook still runs eagerly (dynamo runs a compiled module's hooks as frames of
their own; this one is excluded), so the refresh, its cache and its batching are the same as eagerly. It hands
every layer its fresh pair as ``_compiled_factors``, which the traced hook reads as plain tensor inputs: the
graph has no Python-side checks to break on, and a new scale only brings new tensors, never a recompile. A
layer without a handed pair (the refresh was switched off, or its parameters are sharded) folds its own in
the graph, reading the scale from its ``scale_tensor``. The pair is handed over on each forward of the
model the adapters were injected into; a compiled submodule called on its own reuses the last one.

:func:`fastpath_options` switches the batched refresh and the hidden recompute off (benchmarks, debugging).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional
from .layers import DeLoRAContainer, DeLoRALayer, apply_update, compute_dtype


@dataclass
class FastPathOptions:
    batched: bool = True
    """Fold all layers' factors in a few batched ops before the forward (False: each layer folds its own)."""
    recompute_hidden: bool = True
    """Linear layers recompute the T x r hidden in backward instead of keeping it."""


_options = FastPathOptions()


@contextlib.contextmanager
def fastpath_options(batched: bool | None = None, recompute_hidden: bool | None = None) -> Iterator[None]:
    """``with fastpath_options(batched=False): ...`` runs the block with the switches changed, then restores them."""
    previous = (_options.batched, _options.recompute_hidden)
    if batched is not None:
        _options.batched = batched
    if recompute_hidden is not None:
        _options.recompute_hidden = recompute_hidden
    try:
        yield
    finally:
        _options.batched, _options.recompute_hidden = previous


_structure_version = 0


def structure_changed() -> None:
    """Call after adding or removing adapters anywhere, so cached plans are rebuilt."""
    global _structure_version
    _structure_version += 1


# --- the per-layer cache ----------------------------------------------------------------------------------------
def _stamp(layer: DeLoRALayer, dtype: torch.dtype) -> tuple:
    """Everything the folded factors depend on (see the module docstring for when they go stale).

    Reads go through ``_parameters`` / ``_buffers`` directly: this runs for every layer on every forward.
    """
    params, buffers = layer._parameters, layer._buffers
    A, B, lam, w = params["delora_A"], params["delora_B"], params["delora_lambda"], buffers["delora_w_norm"]
    frozen = sum(t._version for k, t in buffers.items() if t is not None and k != "scale_tensor")
    return (
        A._version,
        B._version,
        lam._version,
        A.data_ptr(),
        B.data_ptr(),
        w.data_ptr(),
        frozen,
        layer.effective_scale,
        dtype,
    )


def _set_cache(layer: DeLoRALayer, A_f: torch.Tensor, B_f: torch.Tensor, stamp: tuple) -> None:
    # Plain attributes: written straight into __dict__, skipping nn.Module.__setattr__'s checks. Copies and
    # pickles of the layer leave them behind (DeLoRALayer.__getstate__).
    layer.__dict__["_cache"] = (A_f, B_f)
    layer.__dict__["_cache_stamp"] = stamp


def _cache_is_fresh(layer: DeLoRALayer, dtype: torch.dtype) -> bool:
    return layer.__dict__.get("_cache") is not None and layer.__dict__["_cache_stamp"] == _stamp(layer, dtype)


def clear_cache(layer: DeLoRALayer) -> None:
    layer.__dict__["_cache"] = layer.__dict__["_cache_stamp"] = None


def layer_factors(layer: DeLoRALayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (A', B') in `dtype`: the cached pair when still fresh, else folded here.

    When training, a pair folded here is not cached: the next forward may follow a backward that freed its
    graph. The batched refresh owns caching while gradients flow.
    """
    if _cache_is_fresh(layer, dtype):
        return layer.__dict__["_cache"]
    if torch.is_grad_enabled():
        project_lambdas([layer])
    factors = layer.compute_factors(dtype)
    if not (torch.is_grad_enabled() and layer.delora_A.requires_grad):
        _set_cache(layer, *factors, _stamp(layer, dtype))
    return factors


# --- the forward hook -------------------------------------------------------------------------------------------
def delora_forward_hook(base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """y = base(x) + the update of every contributing adapter."""
    container: DeLoRAContainer = base._modules["delora"]
    if container.disabled:
        return output
    if torch.compiler.is_compiling():
        return _compiled_update(base, container, args[0], output)
    x = args[0]
    dtype = None
    for layer in container._modules.values():
        if not layer.contributes():
            continue
        if layer.training and layer.module_dropout > 0 and random.random() < layer.module_dropout:
            continue
        dtype = dtype or compute_dtype(base)
        A_f, B_f = layer_factors(layer, dtype)
        output = output + apply_update(base, x, A_f, B_f, _options.recompute_hidden).to(output.dtype)
    return output


def _compiled_update(
    base: nn.Module, container: DeLoRAContainer, x: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """The hook as dynamo traces it: the pair the eager refresh handed over, else one folded here from
    tensors only (:func:`traced_fold`); dropout as a tensor op. No Python-side checks, so no graph breaks."""
    dtype = compute_dtype(base)
    for layer in container._modules.values():
        if not layer.active or layer.merged:
            continue
        factors = getattr(layer, "_compiled_factors", None)
        if factors is None:
            A_f, B_f = traced_fold([layer], dtype)
            factors = (A_f[0], B_f[0])
        update = apply_update(base, x, *factors, _options.recompute_hidden)
        if layer.training and layer.module_dropout > 0:
            update = update * (torch.rand((), device=x.device) >= layer.module_dropout)
        output = output + update.to(output.dtype)
    return output


def attach(base: nn.Module) -> DeLoRAContainer:
    """Give `base` its adapter container and the forward hook (once)."""
    container = base._modules.get("delora")
    if container is None:
        container = DeLoRAContainer()
        base.add_module("delora", container)
        base._delora_hook = base.register_forward_hook(delora_forward_hook)
    return container


def detach(base: nn.Module) -> None:
    """Remove the container and hook from `base` (after its last adapter is gone)."""
    base._delora_hook.remove()
    del base._delora_hook
    del base._modules["delora"]


# --- the batched refresh ----------------------------------------------------------------------------------------
@dataclass
class _Group:
    members: list[DeLoRALayer]
    rank: int
    frozen_versions: tuple  # versions / storages of the members' frozen tensors when stacked
    w: torch.Tensor  # (L, in), stacked once: the norms are frozen
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # paper init: (A0 diag(w), -B0 / (r|a0||b0|))
    lambda_max: torch.Tensor | None = None  # (L, 1): the relative bound's |lambda| limits (inf: none)


@dataclass
class _Entry:
    """Per-layer facts the refresh needs every step, looked up once per plan (Module.__getattr__ is slow)."""

    base: nn.Module
    container: DeLoRAContainer
    layer: DeLoRALayer
    key: tuple


@dataclass
class _RefreshPlan:
    version: int
    entries: list[_Entry]
    groups: dict[tuple, _Group] = field(default_factory=dict)
    bounded: list[DeLoRALayer] = field(default_factory=list)  # layers with a relative bound, listed once


def _layers_under(root: nn.Module) -> list[tuple[nn.Module, DeLoRALayer]]:
    """(frozen layer, DeLoRA layer) pairs under `root`."""
    return [
        (m, a)
        for m in root.modules()
        if isinstance(m._modules.get("delora"), DeLoRAContainer)
        for a in m.delora.values()
    ]


def _group_key(layer: DeLoRALayer) -> tuple:
    """The static part of a layer's group: shapes, rank and init (dtype and device are read every step)."""
    A, B = layer.delora_A, layer.delora_B
    return (A.shape[1], B.shape[0], layer.rank, layer.init)


def _plan_for(root: nn.Module) -> _RefreshPlan:
    plan = root.__dict__.get("_delora_plan")
    if plan is None or plan.version != _structure_version:
        entries = [_Entry(m, m._modules["delora"], a, _group_key(a)) for m, a in _layers_under(root)]
        bounded = [e.layer for e in entries if e.layer.relative_bound is not None]
        plan = _RefreshPlan(_structure_version, entries, bounded=bounded)
        root.__dict__["_delora_plan"] = plan
    return plan


def _frozen_versions(members: list[DeLoRALayer]) -> tuple:
    """Changes when a frozen tensor is replaced or written in place (e.g. by ``load_state_dict``)."""
    return tuple(
        (t._version, t.data_ptr())
        for a in members
        for t in (a._buffers.get("delora_w_norm"), a._buffers.get("delora_A0"), a._buffers.get("delora_B0"))
        if t is not None
    )


def _group(plan: _RefreshPlan, key: tuple, members: list[DeLoRALayer]) -> _Group:
    """Stacked, pre-folded frozen tensors for this exact member list (rebuilt when any of them changes)."""
    group = plan.groups.get(key)
    versions = _frozen_versions(members)
    if group is None or group.members != members or group.frozen_versions != versions:
        with torch.no_grad():
            w = torch.stack([a.delora_w_norm for a in members])
            frozen = None
            if members[0].init == "paper":
                A0 = torch.stack([a.delora_A0 for a in members])
                B0 = torch.stack([a.delora_B0 for a in members])
                frozen = functional.frozen_pair_factors(A0, B0, w, members[0].rank)
            limits = [a.lambda_max for a in members]
            lambda_max = None
            if any(limit is not None for limit in limits):
                values = [float("inf") if limit is None else limit for limit in limits]
                lambda_max = torch.tensor(values, dtype=w.dtype, device=w.device).unsqueeze(-1)
        group = _Group(members, members[0].rank, versions, w, frozen, lambda_max)
        plan.groups[key] = group
    return group


def _is_materialized(layer: DeLoRALayer) -> bool:
    """Sharded parameters are skipped here; those layers fold their own factors in their forward, unsharded.

    FSDP2 shards into DTensors (whose shape is the full one), FSDP1 into flat 1-D views, ZeRO-3 into empty
    tensors; only a plain tensor of the full (rank, in) shape can be stacked.
    """
    A = layer._parameters["delora_A"]
    full = (layer.rank, layer._buffers["delora_w_norm"].numel())
    return A.shape == full and A.numel() > 0 and not _is_dtensor(A)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Without importing torch.distributed.tensor (half a second): no DTensor exists before it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class _FoldGroup(torch.autograd.Function):
    """Fold a whole group's factors in one node, keeping only the parameters themselves for backward.

    Autograd over the stacked ops would keep the stacked copies of A and B and every intermediate (norms,
    scales); here backward re-stacks the parameters (which exist anyway) and applies the closed-form
    gradients of ``A' = A diag(w)`` and ``B' = B diag(lam * scale * u)``, ``u = 1 / (r |a| |b|)`` (norms
    clamped at :data:`functional.NORM_EPS`), plus lambda's share of the frozen columns. Same math as
    :func:`functional.fold_factors`; just fewer, larger ops and no saved intermediates.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rank: int,
        n: int,
        scale: float | torch.Tensor,
        w: torch.Tensor,
        frozen_A: torch.Tensor | None,
        frozen_B: torch.Tensor | None,
        lambda_max: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        A, B, lam = (torch.stack(params[i * n : (i + 1) * n]) for i in range(3))
        ctx.rank, ctx.n = rank, n
        ctx.flags = (isinstance(scale, torch.Tensor), frozen_B is not None, lambda_max is not None)
        if not ctx.flags[0]:
            ctx.scale = scale
        optional = (scale, frozen_B, lambda_max)
        ctx.save_for_backward(w, *(t for t, on in zip(optional, ctx.flags) if on), *params)
        if lambda_max is not None:
            lam = torch.minimum(torch.maximum(lam, -lambda_max), lambda_max)
        frozen = None if frozen_A is None else (frozen_A, frozen_B)
        return functional.fold_factors(A, B, lam, w, rank, scale, frozen)

    @staticmethod
    def backward(ctx, grad_A_f: torch.Tensor, grad_B_f: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        r, n = ctx.rank, ctx.n
        saved = list(ctx.saved_tensors)
        w = saved.pop(0)
        scale, frozen_B, lambda_max = (saved.pop(0) if on else None for on in ctx.flags)
        if scale is None:
            scale = ctx.scale
        A, B, lam = (torch.stack(saved[i * n : (i + 1) * n]) for i in range(3))
        inside = None
        if lambda_max is not None:  # clamp's gradient: through where -max <= lam <= max
            inside = lam.abs() <= lambda_max
            lam = torch.minimum(torch.maximum(lam, -lambda_max), lambda_max)
        a_raw, b_raw = A.norm(dim=-1), B.norm(dim=-2)  # (L, r)
        a_norm, b_norm = a_raw.clamp_min(functional.NORM_EPS), b_raw.clamp_min(functional.NORM_EPS)
        unit = scale / (r * a_norm * b_norm)  # d scale / d lam
        rank_scales = lam * unit
        g_B_f = grad_B_f[..., :r]
        grad_A = grad_A_f[..., :r, :] * w.unsqueeze(-2)
        grad_B = g_B_f * rank_scales.unsqueeze(-2)
        grad_scales = (g_B_f * B).sum(dim=-2)  # (L, r)
        grad_lam = (grad_scales * unit).sum(dim=-1, keepdim=True)
        if frozen_B is not None:
            grad_lam = grad_lam + (grad_B_f[..., r:] * frozen_B).sum(dim=(-2, -1)).unsqueeze(-1) * scale
        # rank_scales = lam * scale / (r |a| |b|): d/d|a| = -rank_scales / |a|, through the clamp (mask |a| >= eps)
        # and the norm (d|a|/da = a / |a|).
        g_norm = grad_scales * rank_scales
        g_a = torch.where(a_raw >= functional.NORM_EPS, -g_norm / (a_norm * a_raw.clamp_min(1e-30)), 0.0)
        g_b = torch.where(b_raw >= functional.NORM_EPS, -g_norm / (b_norm * b_raw.clamp_min(1e-30)), 0.0)
        grad_A = grad_A + g_a.unsqueeze(-1) * A
        grad_B = grad_B + g_b.unsqueeze(-2) * B
        if inside is not None:
            grad_lam = grad_lam * inside
        grads = (*grad_A.unbind(0), *grad_B.unbind(0), *grad_lam.unbind(0))
        return (None,) * 7 + grads


def fold_group(
    rank: int,
    scale: float | torch.Tensor,
    w: torch.Tensor,
    frozen: tuple[torch.Tensor, torch.Tensor] | None,
    lambda_max: torch.Tensor | None,
    members: list[DeLoRALayer],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked (A', B') of `members` (same shapes, rank and init) through :class:`_FoldGroup`."""
    params = [a._parameters[k] for k in ("delora_A", "delora_B", "delora_lambda") for a in members]
    frozen_A, frozen_B = (None, None) if frozen is None else frozen
    return _FoldGroup.apply(rank, len(members), scale, w, frozen_A, frozen_B, lambda_max, *params)


def project_lambdas(layers: list[DeLoRALayer]) -> None:
    """Put every trainable lambda back inside its relative bound, in two batched ops (see
    :meth:`DeLoRALayer.project_lambda`): the optimizer may have stepped out since the last forward."""
    bounded = [a for a in layers if a.relative_bound is not None and a.delora_lambda.requires_grad]
    if bounded:
        lams = [a._parameters["delora_lambda"] for a in bounded]
        limits = [a.lambda_max for a in bounded]
        with torch.no_grad():
            torch._foreach_clamp_max_(lams, limits)
            torch._foreach_clamp_min_(lams, [-limit for limit in limits])


def _grad_left(layer: DeLoRALayer, training: bool) -> bool:
    """A pair folded while training, met without grad: refold it, so it lets its graph go and a compiled
    graph always sees the same kind of input (a pair that requires grad or not) in the same mode."""
    return not training and layer.__dict__["_cache"][0].requires_grad


def refresh_factors(root: nn.Module) -> None:
    """Fold the factors of every stale adapter under `root`, batched per group."""
    plan = _plan_for(root)
    training = torch.is_grad_enabled()
    if training:
        project_lambdas(plan.bounded)
    stale: dict[tuple, list[DeLoRALayer]] = {}
    handed: list[DeLoRALayer] = []
    for entry in plan.entries:
        layer = entry.layer
        layer.__dict__["_compiled_factors"] = None
        # A zero scale is folded too (the eager hook skips it): a compiled graph then never sees a missing pair.
        if entry.container.disabled or not layer.active or layer.merged or not _is_materialized(layer):
            continue
        handed.append(layer)
        dtype = compute_dtype(entry.base)
        A = layer._parameters["delora_A"]
        if training and A.requires_grad or not _cache_is_fresh(layer, dtype) or _grad_left(layer, training):
            stale.setdefault(entry.key + (A.dtype, A.device, dtype), []).append(layer)
    for key, members in stale.items():
        group = _group(plan, key, members)
        A = members[0]._parameters["delora_A"]
        scales = [a.effective_scale for a in members]
        if len(set(scales)) == 1:
            scale: float | torch.Tensor = scales[0]
        else:
            scale = torch.tensor(scales, dtype=A.dtype, device=A.device).unsqueeze(-1)
        A_f, B_f = fold_group(group.rank, scale, group.w, group.frozen, group.lambda_max, members)
        dtype = key[-1]
        A_f, B_f = A_f.to(dtype), B_f.to(dtype)
        for layer, a_f, b_f in zip(members, A_f.unbind(0), B_f.unbind(0), strict=True):
            _set_cache(layer, a_f, b_f, _stamp(layer, dtype))
    for layer in handed:  # fresh now: what a compiled forward uses (see refresh_pre_hook)
        layer.__dict__["_compiled_factors"] = layer.__dict__["_cache"]


def traced_fold(members: list[DeLoRALayer], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked (A', B') of one group for a compiled graph: every input read as a tensor, nothing cached.

    The frozen tensors are stacked here (buffers, so a ``load_state_dict`` is seen at once); the scale comes
    from each layer's ``scale_tensor`` and the relative bound's limits are computed from w, so neither a scale
    change nor a load recompiles. (The eager pre-hook projects trainable lambdas onto their bound.)
    """
    first = members[0]
    rank, paper = first.rank, first.init == "paper"
    with torch.no_grad():
        w = torch.stack([a._buffers["delora_w_norm"] for a in members])
        frozen = None
        if paper:
            A0 = torch.stack([a._buffers["delora_A0"] for a in members])
            B0 = torch.stack([a._buffers["delora_B0"] for a in members])
            frozen = functional.frozen_pair_factors(A0, B0, w, rank)
        scale = torch.stack([a._buffers["scale_tensor"] for a in members]).unsqueeze(-1).to(w.dtype)
        lambda_max = None
        if any(a.relative_bound is not None for a in members):
            rho = [float("inf") if a.relative_bound is None else a.relative_bound for a in members]
            wf = w.float()
            limit = wf.norm(dim=-1, keepdim=True) / wf.amax(dim=-1, keepdim=True).clamp_min(1e-12)
            limit = limit * torch.tensor(rho, device=w.device).unsqueeze(-1) / (2 if paper else 1)
            lambda_max = limit.to(w.dtype)
    A_f, B_f = fold_group(rank, scale, w, frozen, lambda_max, members)
    return A_f.to(dtype), B_f.to(dtype)


@torch.compiler.disable
def refresh_pre_hook(root: nn.Module, args: tuple) -> None:
    """Before the model's forward: the batched refresh, always run eagerly, also for a compiled model.

    ``torch.compile(model)`` (and ``model.compile()``, accelerate's ``--dynamo_backend``) runs a module's
    hooks as frames of their own, apart from the forward's graph; excluded from dynamo, this one does the
    cached, batched refresh just as eagerly (no tracing cost, no extra graph) and hands each layer its
    fresh pair in ``_compiled_factors`` (None: the layer's compiled hook folds its own). Compiling a
    function that *calls* the model inlines this hook instead, which splits that function's graph here once.
    """
    if _options.batched:
        refresh_factors(root)
        return
    entries = _plan_for(root).entries
    for entry in entries:
        entry.layer.__dict__["_compiled_factors"] = None
    if torch.is_grad_enabled():
        project_lambdas([entry.layer for entry in entries])
