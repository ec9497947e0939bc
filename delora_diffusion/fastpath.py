"""Where the forward gets its per-rank scales: the per-layer cache and the batched refresh (the forward hook
that uses them is :mod:`delora_diffusion.hooks`).

The update of a layer is ``x (A diag(w))^T (B diag(s))^T`` (plus the paper init's frozen pair A0, B0, whose
scales follow A, B's in s), with per-rank scales ``s = lam * scale / (r |a_i| |b_i|)``
(:func:`delora_diffusion.functional.rank_scales`).
Only s depends on lambda and the norms, so s (r or 2r numbers per layer) is all that is folded ahead and kept:
the layer builds ``A diag(w)`` and ``B diag(s)`` transiently in its own forward and again in its backward
(:class:`~delora_diffusion.update._DeLoRALinear`), so no adapter-sized copy lives across a training step.

All cache logic lives here. Each :class:`~delora_diffusion.layers.DeLoRALayer` may hold its cached scales
plus the *stamp* they were computed under. They go stale when any of their inputs changes:

- an optimizer step or any in-place write to A, B or lambda (their ``_version`` counters move), or a new
  tensor put in their place (``data_ptr`` moves). Optimizers that write without moving the counters (torch's
  fused kernels; bitsandbytes and prodigyopt, which write ``p.data``) get them moved after every step by a
  hook common to all optimizers (:mod:`delora_diffusion.optim_versions`);
- a write to the frozen w / A0 / B0 (e.g. ``load_state_dict``; the sum of their versions moves);
- a change of the run-time scale (``set_delora_scale``, adapter weights).

While gradients flow, cached scales are never reused across forwards: the previous backward freed their
graph. So before each forward of a model with adapters, a pre-hook on the model (:func:`refresh_pre_hook`)
gathers every stale adapter, groups them by (shape, rank, init, dtype, device), and computes each group's
scales in one node (:class:`FoldGroup`: a few stacked ops, not a few per layer). The layers then use those
scales for the whole step, so checkpointed recomputes see the very same tensors.

Under ``torch.compile`` the pre-hook still runs eagerly (dynamo runs a compiled module's hooks as frames of
their own; this one is excluded), so the refresh, its cache and its batching are the same as eagerly. It hands
every layer its fresh scales as ``_compiled_scales``, which the traced hook reads as plain tensor inputs: the
graph has no Python-side checks to break on, and a new scale only brings new tensors, never a recompile. A
layer without handed scales (the refresh was switched off, or its parameters are sharded) computes its own
in the graph, reading the scale from its ``scale_tensor``. They are handed over on each forward of the
model the adapters were injected into; a compiled submodule called on its own reuses the last ones.

On accelerators (``fastpath_options(fold_factors=...)``; off on a CPU) the refresh of a training step also
folds each group's factors ``A diag(w)``, ``B diag(s)`` in the compute dtype (:class:`FoldFactors`), and a
Linear layer's update is two plain matmuls on them: a launch-bound GPU step then dispatches fewer kernels
than PEFT LoRA's (``benchmarks/step_ops.py``), for an adapter-sized copy of the factors kept for backward.

:func:`fastpath_options` switches the batched refresh and the hidden recompute off (benchmarks, debugging).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional, optim_versions  # noqa: F401 - registers the optimizer hook
from .fold import FoldFactors, FoldGroup
from .layers import DeLoRAContainer, DeLoRALayer
from .update import compute_dtype


@dataclass
class FastPathOptions:
    batched: bool = True
    """Compute all layers' scales in a few batched ops before the forward (False: each layer its own)."""
    recompute_hidden: bool = True
    """Linear layers recompute the T x r hidden in backward instead of keeping it (the paper init's frozen
    pair, where it runs on its own at few tokens, keeps its hidden either way: see ``update._DeLoRALinear``).
    The factor fold's plain matmuls keep their hidden whatever this says, as LoRA's do (T x 2r for the paper
    init)."""
    stack_fold: bool | None = None
    """The batched fold stacks each group's A and B for their norms (None: on accelerators, not on a CPU)."""
    fold_factors: bool | None = None
    """While training, the batched fold also makes each group's folded factors (:class:`FoldFactors`), and
    Linear layers run their update as two plain matmuls on them (None: on accelerators, not on a CPU)."""


_options = FastPathOptions()


@contextlib.contextmanager
def fastpath_options(
    batched: bool | None = None,
    recompute_hidden: bool | None = None,
    stack_fold: bool | None = None,
    fold_factors: bool | None = None,
) -> Iterator[None]:
    """``with fastpath_options(batched=False): ...`` runs the block with the switches changed, then restores them."""
    previous = (_options.batched, _options.recompute_hidden, _options.stack_fold, _options.fold_factors)
    if batched is not None:
        _options.batched = batched
    if recompute_hidden is not None:
        _options.recompute_hidden = recompute_hidden
    if stack_fold is not None:
        _options.stack_fold = stack_fold
    if fold_factors is not None:
        _options.fold_factors = fold_factors
    try:
        yield
    finally:
        _options.batched, _options.recompute_hidden, _options.stack_fold, _options.fold_factors = previous


_structure_version = 0


def structure_changed() -> None:
    """Call after adding or removing adapters anywhere, so cached plans are rebuilt."""
    global _structure_version
    _structure_version += 1


# --- the per-layer cache ----------------------------------------------------------------------------------------
def _stamp(layer: DeLoRALayer) -> tuple:
    """Everything the cached scales depend on (see the module docstring for when they go stale).

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
    )


def _set_cache(layer: DeLoRALayer, scales: torch.Tensor, stamp: tuple, factors: tuple | None = None) -> None:
    # Plain attributes: written straight into __dict__, skipping nn.Module.__setattr__'s checks. Copies and
    # pickles of the layer leave them behind (DeLoRALayer.__getstate__). `factors`, (scales, A', B') from
    # FoldFactors, are used only while `scales` is the layer's cache (the same tensor).
    layer.__dict__["_cache"] = scales
    layer.__dict__["_cache_stamp"] = stamp
    layer.__dict__["_factors"] = factors


def _cache_is_fresh(layer: DeLoRALayer) -> bool:
    return layer.__dict__.get("_cache") is not None and layer.__dict__["_cache_stamp"] == _stamp(layer)


def _unfit_for_grad(layer: DeLoRALayer) -> bool:
    """Cached scales that a forward recording autograd must not reuse, though their stamp still matches:
    scales made in ``torch.inference_mode`` (autograd refuses to save them), or made without grad for a
    layer whose parameters require it (lambda and the norms would get no gradient)."""
    cache = layer.__dict__["_cache"]
    return cache.is_inference() or (layer._parameters["delora_A"].requires_grad and not cache.requires_grad)


def clear_cache(layer: DeLoRALayer) -> None:
    layer.__dict__["_cache"] = layer.__dict__["_cache_stamp"] = layer.__dict__["_factors"] = None


def layer_scales(layer: DeLoRALayer) -> torch.Tensor:
    """The layer's per-rank scales s (:func:`functional.rank_scales`): the cached ones when still fresh, else
    computed here.

    When training, scales computed here are not cached: the next forward may follow a backward that freed
    their graph. The batched refresh owns caching while gradients flow.
    """
    if _cache_is_fresh(layer) and not (torch.is_grad_enabled() and _unfit_for_grad(layer)):
        return layer.__dict__["_cache"]
    if torch.is_grad_enabled():
        project_lambdas([layer])
    scales = layer.compute_scales()
    if not (torch.is_grad_enabled() and layer.delora_A.requires_grad):
        _set_cache(layer, scales, _stamp(layer))
    return scales


# --- the batched refresh ----------------------------------------------------------------------------------------
@dataclass
class _Group:
    members: list[DeLoRALayer]
    rank: int
    frozen_versions: tuple  # versions / storages of the members' frozen tensors when computed
    frozen_unit: torch.Tensor | None = None  # paper init: (L, r), -1 / (r |a0| |b0|) (constant, so kept)
    lambda_max: torch.Tensor | None = None  # (L, 1): the relative bound's |lambda| limits (inf: none)
    w: torch.Tensor | None = None  # (L, in): the members' column norms, stacked once FoldFactors needs them


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
    """The members' constant vectors, stacked for this exact member list (rebuilt when any of them changes)."""
    group = plan.groups.get(key)
    versions = _frozen_versions(members)
    if group is None or group.members != members or group.frozen_versions != versions:
        first = members[0]
        # Never inference tensors (a first forward under torch.inference_mode): a later training forward saves
        # these for backward.
        with torch.inference_mode(False), torch.no_grad():
            frozen_unit = None
            if first.init == "paper":
                A0 = torch.stack([a.delora_A0 for a in members])
                B0 = torch.stack([a.delora_B0 for a in members])
                frozen_unit = functional.frozen_unit_scales(A0, B0, first.rank)
            limits = [a.lambda_max for a in members]
            lambda_max = None
            if any(limit is not None for limit in limits):
                values = [float("inf") if limit is None else limit for limit in limits]
                A = first.delora_A
                lambda_max = torch.tensor(values, dtype=A.dtype, device=A.device).unsqueeze(-1)
        group = _Group(members, first.rank, versions, frozen_unit, lambda_max)
        plan.groups[key] = group
    return group


def _is_materialized(layer: DeLoRALayer) -> bool:
    """Sharded parameters are skipped here; those layers compute their own scales in their forward, unsharded.

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


def _stack_fold(device: torch.device) -> bool:
    """Stack a group's A and B for their norms (one kernel per group: launch-bound accelerators) or take
    each member's norms in place (no copy of the adapter: a CPU, where the copy costs more than the calls)."""
    if _options.stack_fold is not None:
        return _options.stack_fold
    return device.type != "cpu"


def _factors_wanted(device: torch.device) -> bool:
    """Fold factors for a group (few kernels per layer: launch-bound accelerators), or scales only (no
    adapter-sized copy: a CPU, where the copy costs more than the calls)."""
    if _options.fold_factors is not None:
        return _options.fold_factors
    return device.type != "cpu"


def _fold_factors(entries: list[_Entry], training: bool) -> torch.dtype | None:
    """The compute dtype to fold the group's factors in (:class:`FoldFactors`), or None to fold scales only:
    factors only while training Linear layers whose parameters require grad, all in one compute dtype."""
    A = entries[0].layer._parameters["delora_A"]
    if not (training and A.requires_grad and _factors_wanted(A.device)):
        return None
    if not all(isinstance(e.base, nn.Linear) for e in entries):
        return None
    dtypes = {compute_dtype(e.base) for e in entries}
    return dtypes.pop() if len(dtypes) == 1 else None


def fold_group(
    rank: int,
    scale: float | torch.Tensor,
    frozen_unit: torch.Tensor | None,
    lambda_max: torch.Tensor | None,
    members: list[DeLoRALayer],
) -> torch.Tensor:
    """Stacked per-rank scales of `members` (same shapes, rank and init) through :class:`FoldGroup`."""
    params = [a._parameters[k] for k in ("delora_A", "delora_B", "delora_lambda") for a in members]
    stacked = _stack_fold(params[0].device)
    return FoldGroup.apply(rank, len(members), stacked, scale, frozen_unit, lambda_max, *params)


def project_lambdas(layers: list[DeLoRALayer]) -> None:
    """Put every trainable lambda back inside its relative bound, in two batched ops (see
    :meth:`DeLoRALayer.project_lambda`): the optimizer may have stepped out since the last forward.

    A lambda not written since its last projection (same version, storage and limit) is left alone: clamping
    it again would move its version under the graph of a forward whose backward has not run yet (two forwards,
    one backward), which autograd then refuses."""
    bounded = [
        a
        for a in layers
        if a.relative_bound is not None
        and a.delora_lambda.requires_grad
        and a.__dict__.get("_projected") != _projection_key(a)
    ]
    if bounded:
        lams = [a._parameters["delora_lambda"] for a in bounded]
        limits = [a.lambda_max for a in bounded]
        with torch.no_grad():
            torch._foreach_clamp_max_(lams, limits)
            torch._foreach_clamp_min_(lams, [-limit for limit in limits])
        for a in bounded:
            a.__dict__["_projected"] = _projection_key(a)


def _projection_key(layer: DeLoRALayer) -> tuple:
    lam = layer._parameters["delora_lambda"]
    storage = id(lam) if _is_dtensor(lam) else lam.data_ptr()  # a sharded lambda has no data_ptr
    return (lam._version, storage, layer.lambda_max)


def _grad_left(layer: DeLoRALayer, training: bool) -> bool:
    """Scales computed while training, met without grad: recompute them, so they let their graph go and a
    compiled graph always sees the same kind of input (scales that require grad or not) in the same mode."""
    return not training and layer.__dict__["_cache"].requires_grad


def refresh_factors(root: nn.Module) -> None:
    """Compute the scales of every stale adapter under `root`, batched per group."""
    plan = _plan_for(root)
    training = torch.is_grad_enabled()
    if training:
        project_lambdas(plan.bounded)
    stale: dict[tuple, list[_Entry]] = {}
    handed: list[DeLoRALayer] = []
    for entry in plan.entries:
        layer = entry.layer
        layer.__dict__["_compiled_scales"] = layer.__dict__["_compiled_factors"] = None
        # A zero scale is folded too (the eager hook skips it): a compiled graph then never misses its scales.
        if entry.container.disabled or not layer.active or layer.merged or not _is_materialized(layer):
            continue
        handed.append(layer)
        A = layer._parameters["delora_A"]
        if (
            (training and A.requires_grad)
            or not _cache_is_fresh(layer)
            or _grad_left(layer, training)
            or (training and _unfit_for_grad(layer))
        ):
            stale.setdefault(entry.key + (A.dtype, A.device), []).append(entry)
    for key, entries in stale.items():
        members = [e.layer for e in entries]
        group = _group(plan, key, members)
        A = members[0]._parameters["delora_A"]
        scales = [a.effective_scale for a in members]
        if len(set(scales)) == 1:
            scale: float | torch.Tensor = scales[0]
        else:
            scale = torch.tensor(scales, dtype=A.dtype, device=A.device).unsqueeze(-1)
        factor_dtype = _fold_factors(entries, training)
        if factor_dtype is None:
            scales_all = fold_group(group.rank, scale, group.frozen_unit, group.lambda_max, members)
            for layer, scales_row in zip(members, scales_all.unbind(0), strict=True):
                _set_cache(layer, scales_row, _stamp(layer))
        else:
            scales_all = _fold_with_factors(group, scale, members, factor_dtype)
        if scales_all.grad_fn is not None:
            _forget_when_spent(scales_all.grad_fn, members)
    for layer in handed:  # fresh now: what a compiled forward uses (see refresh_pre_hook)
        layer.__dict__["_compiled_scales"] = layer.__dict__["_cache"]
        factors = layer.__dict__.get("_factors")
        if factors is not None and factors[0] is layer.__dict__["_cache"]:
            layer.__dict__["_compiled_factors"] = factors[1:]


def _fold_with_factors(
    group: _Group, scale: float | torch.Tensor, members: list[DeLoRALayer], dtype: torch.dtype
) -> torch.Tensor:
    """Fold the group's scales and factors (:class:`FoldFactors`) and cache both per layer; returns the scales."""
    params = [a._parameters[k] for k in ("delora_A", "delora_B", "delora_lambda") for a in members]
    if group.w is None:
        with torch.inference_mode(False), torch.no_grad():
            group.w = torch.stack([a._buffers["delora_w_norm"] for a in members])
    frozen = None
    if group.frozen_unit is not None:
        frozen = ([a._buffers["delora_A0"] for a in members], [a._buffers["delora_B0"] for a in members])
    scales_all, A_f, B_f = FoldFactors.apply(
        group.rank, len(members), dtype, scale, group.frozen_unit, group.lambda_max, group.w, frozen, *params
    )
    rows = zip(members, scales_all.unbind(0), A_f.unbind(0), B_f.unbind(0), strict=True)
    for layer, scales_row, A_row, B_row in rows:
        _set_cache(layer, scales_row, _stamp(layer), (scales_row, A_row, B_row))
    return scales_all


def _forget_when_spent(node: torch.autograd.graph.Node, members: list[DeLoRALayer]) -> None:
    """Once backward has run through the fold's node, its graph is freed: drop the members' cached scales, so
    a forward before the next optimizer step (gradient accumulation calling a submodule on its own, which no
    refresh precedes) folds anew instead of reusing scales whose graph is gone. Checkpointed recomputes run
    before this node in backward, so they still reuse the very same scales; scales a later fold cached are
    left alone."""
    refs = [weakref.ref(layer) for layer in members]

    def forget(*_: object) -> None:
        for ref in refs:
            layer = ref()
            cache = None if layer is None else layer.__dict__.get("_cache")
            if cache is not None and cache.grad_fn is not None and cache.grad_fn.next_functions[0][0] is node:
                clear_cache(layer)
                layer.__dict__["_compiled_scales"] = layer.__dict__["_compiled_factors"] = None

    node.register_hook(forget)


def traced_scales(members: list[DeLoRALayer]) -> torch.Tensor:
    """Stacked per-rank scales of one group for a compiled graph: every input read as a tensor, nothing cached.

    The frozen tensors are read here (buffers, so a ``load_state_dict`` is seen at once); the scale comes
    from each layer's ``scale_tensor`` and the relative bound's limits are computed from w, so neither a scale
    change nor a load recompiles. (The eager pre-hook projects trainable lambdas onto their bound.)
    """
    first = members[0]
    rank, paper = first.rank, first.init == "paper"
    dtype = first.delora_A.dtype
    with torch.no_grad():
        frozen_unit = None
        if paper:
            A0 = torch.stack([a._buffers["delora_A0"] for a in members])
            B0 = torch.stack([a._buffers["delora_B0"] for a in members])
            frozen_unit = functional.frozen_unit_scales(A0, B0, rank)
        scale = torch.stack([a._buffers["scale_tensor"] for a in members]).unsqueeze(-1).to(dtype)
        lambda_max = None
        if any(a.relative_bound is not None for a in members):
            rho = [float("inf") if a.relative_bound is None else a.relative_bound for a in members]
            wf = torch.stack([a._buffers["delora_w_norm"] for a in members]).float()
            limit = wf.norm(dim=-1, keepdim=True) / wf.amax(dim=-1, keepdim=True).clamp_min(1e-12)
            limit = limit * torch.tensor(rho, device=wf.device).unsqueeze(-1) / (2 if paper else 1)
            lambda_max = limit.to(dtype)
    return fold_group(rank, scale, frozen_unit, lambda_max, members)


@torch.compiler.disable
def refresh_pre_hook(root: nn.Module, args: tuple) -> None:
    """Before the model's forward: the batched refresh, always run eagerly, also for a compiled model.

    ``torch.compile(model)`` (and ``model.compile()``, accelerate's ``--dynamo_backend``) runs a module's
    hooks as frames of their own, apart from the forward's graph; excluded from dynamo, this one does the
    cached, batched refresh just as eagerly (no tracing cost, no extra graph) and hands each layer its
    fresh scales in ``_compiled_scales`` (None: the layer's compiled hook computes its own). Compiling a
    function that *calls* the model inlines this hook instead, which splits that function's graph here once.
    """
    if _options.batched:
        refresh_factors(root)
        return
    entries = _plan_for(root).entries
    for entry in entries:
        entry.layer.__dict__["_compiled_scales"] = entry.layer.__dict__["_compiled_factors"] = None
    if torch.is_grad_enabled():
        project_lambdas([entry.layer for entry in entries])
