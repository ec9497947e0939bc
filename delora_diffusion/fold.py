"""The batched fold: a group's per-rank scales s in one autograd node, and their closed-form gradient.

Pure autograd over :mod:`delora_diffusion.functional`'s math; which layers form a group, and when their scales
are folded again, is :mod:`delora_diffusion.fastpath`'s business.
"""

from __future__ import annotations

import torch

from . import functional


class FoldGroup(torch.autograd.Function):
    """A whole group's per-rank scales s (:func:`functional.rank_scales`) in one node, (L, r) or (L, 2r).

    Keeps for backward only the parameters (which exist anyway) and (L, r) vectors; backward re-stacks A and
    B once and applies the closed-form gradient of ``s = lam * scale * u``, ``u = 1 / (r |a| |b|)`` (norms
    clamped at :data:`functional.NORM_EPS`), plus lambda's share of the frozen ranks' ``lam * scale * u0``.
    The layers' updates (``update._DeLoRALinear``) give A and B their direct gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rank: int,
        n: int,
        stacked: bool,
        scale: float | torch.Tensor,
        frozen_unit: torch.Tensor | None,
        lambda_max: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        As, Bs, lam = params[:n], params[n : 2 * n], torch.stack(params[2 * n :])
        ctx.stacked = stacked
        if ctx.stacked:  # one norm kernel per group, on a copy
            a_raw, b_raw = torch.stack(As).norm(dim=-1), torch.stack(Bs).norm(dim=-2)  # (L, r)
        else:  # one per member, no copy
            a_raw = torch.stack([a.norm(dim=-1) for a in As])
            b_raw = torch.stack([b.norm(dim=-2) for b in Bs])
        inside = None
        if lambda_max is not None:  # clamp's gradient: through where -max <= lam <= max
            inside = lam.abs() <= lambda_max
            lam = torch.minimum(torch.maximum(lam, -lambda_max), lambda_max)
        scale_t = torch.as_tensor(scale, dtype=lam.dtype, device=lam.device)
        ctx.rank, ctx.n = rank, n
        # Kept as attributes, not saved tensors: backward may run through this node more than once. Reentrant
        # checkpointing backpropagates a recomputed block on its own, which reaches this node (shared by the
        # group's layers) before the step's backward does; saved tensors would be freed by the first pass.
        # Everything here is a parameter or a small vector made without grad, so no reference cycle forms.
        # (A compiled graph saves them as usual: dynamo traces neither tensor attributes nor versions.)
        kept = (a_raw, b_raw, lam, scale_t, inside, frozen_unit, *params)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(*kept)
            ctx.kept = None
        else:
            ctx.kept, ctx.versions = kept, [p._version for p in params]
        return _scales(rank, a_raw, b_raw, lam, scale_t, frozen_unit)

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        r, n = ctx.rank, ctx.n
        if ctx.kept is None:
            a_raw, b_raw, lam, scale, inside, frozen_unit, *params = ctx.saved_tensors
        else:
            a_raw, b_raw, lam, scale, inside, frozen_unit, *params = ctx.kept
        if ctx.kept is not None and [p._version for p in params] != ctx.versions:
            raise RuntimeError(
                "A DeLoRA parameter was modified in place (an optimizer step?) between the forward and its "
                "backward; call backward before the optimizer step."
            )
        grad_lam, g_a, g_b = _scale_grads(r, grad_s, a_raw, b_raw, lam, scale, inside, frozen_unit)
        As, Bs = params[:n], params[n : 2 * n]
        if ctx.stacked:
            grad_A = (g_a.unsqueeze(-1) * torch.stack(As)).unbind(0)
            grad_B = (g_b.unsqueeze(-2) * torch.stack(Bs)).unbind(0)
        else:
            grad_A = [g.unsqueeze(-1) * a for g, a in zip(g_a.unbind(0), As, strict=True)]
            grad_B = [g.unsqueeze(-2) * b for g, b in zip(g_b.unbind(0), Bs, strict=True)]
        grads = (*grad_A, *grad_B, *grad_lam.unbind(0))
        return (None,) * 6 + grads


class FoldFactors(torch.autograd.Function):
    """A whole group's scales and folded factors in one node: ``(s, A', B')`` with ``A' = [A; A0] diag(w)``
    (L, R, in) and ``B' = [B, B0] diag(s)`` (L, out, R), the factors in the compute dtype.

    For launch-bound accelerators: each Linear layer's update is then two plain matmuls, with none of the
    per-layer scaling, casting and gradient reductions of :class:`~delora_diffusion.update._DeLoRALinear`;
    those run once per group here, forward and backward, and each parameter gets its whole gradient from
    this node. The price is what the layers' plain matmuls keep for backward: the factors (an adapter-sized
    copy in the compute dtype; half the adapter under bf16) and the T x R hidden, as LoRA's matmuls keep
    theirs (R = 2r for the paper init). Kept like :class:`FoldGroup`'s:
    parameters and (L, r) vectors as attributes, A and B stacked again in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rank: int,
        n: int,
        dtype: torch.dtype,
        scale: float | torch.Tensor,
        frozen_unit: torch.Tensor | None,
        lambda_max: torch.Tensor | None,
        w: torch.Tensor,
        frozen: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A, B = torch.stack(params[:n]), torch.stack(params[n : 2 * n])  # (L, r, in), (L, out, r)
        lam = torch.stack(params[2 * n :])
        inside = None
        if lambda_max is not None:
            inside = lam.abs() <= lambda_max
            lam = torch.minimum(torch.maximum(lam, -lambda_max), lambda_max)
        scale_t = torch.as_tensor(scale, dtype=lam.dtype, device=lam.device)
        a_raw, b_raw = A.norm(dim=-1), B.norm(dim=-2)
        scales = _scales(rank, a_raw, b_raw, lam, scale_t, frozen_unit)
        if frozen is not None:
            A, B = torch.cat((A, torch.stack(frozen[0])), 1), torch.cat((B, torch.stack(frozen[1])), 2)
        A_f, B_f = (A * w.unsqueeze(1)).to(dtype), (B * scales.unsqueeze(1)).to(dtype)
        ctx.rank, ctx.n, ctx.frozen = rank, n, frozen
        # scales detached: the output itself would tie this node to its own output, a cycle through C++
        # that nothing frees (every step's node, and the parameters it holds, would stay alive).
        ctx.kept = (a_raw, b_raw, lam, scale_t, inside, frozen_unit, scales.detach(), w, *params)
        ctx.versions = [p._version for p in params]
        ctx.set_materialize_grads(False)
        return scales, A_f, B_f

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_s: torch.Tensor | None, grad_A_f: torch.Tensor | None, grad_B_f: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        r, n = ctx.rank, ctx.n
        a_raw, b_raw, lam, scale, inside, frozen_unit, scales, w, *params = ctx.kept
        if [p._version for p in params] != ctx.versions:
            raise RuntimeError(
                "A DeLoRA parameter was modified in place (an optimizer step?) between the forward and its "
                "backward; call backward before the optimizer step."
            )
        A, B = torch.stack(params[:n]), torch.stack(params[n : 2 * n])
        grad_B_direct = None
        if grad_B_f is not None:  # B' = [B, B0] diag(s): to s through both halves, to B through its own
            g = grad_B_f.to(B.dtype)
            ups = B if ctx.frozen is None else torch.cat((B, torch.stack(ctx.frozen[1])), 2)
            from_factors = (g * ups).sum(dim=-2)
            grad_s = from_factors if grad_s is None else grad_s + from_factors
            grad_B_direct = g[..., :r] * scales[:, None, :r]
        if grad_s is None:
            grad_s = torch.zeros_like(scales)
        grad_lam, g_a, g_b = _scale_grads(r, grad_s, a_raw, b_raw, lam, scale, inside, frozen_unit)
        grad_A = g_a.unsqueeze(-1) * A
        if grad_A_f is not None:
            grad_A = grad_A + grad_A_f[:, :r].to(A.dtype) * w.unsqueeze(1)
        grad_B = g_b.unsqueeze(-2) * B
        if grad_B_direct is not None:
            grad_B = grad_B + grad_B_direct
        return (None,) * 8 + (*grad_A.unbind(0), *grad_B.unbind(0), *grad_lam.unbind(0))


def _scales(
    rank: int,
    a_raw: torch.Tensor,
    b_raw: torch.Tensor,
    lam: torch.Tensor,
    scale: torch.Tensor,
    frozen_unit: torch.Tensor | None,
) -> torch.Tensor:
    """(L, r) or (L, 2r) scales from the rank-1 norms, written (lam * scale) * (1 / (r |a| |b|)) as
    functional.rank_one_scales: the frozen ranks' lam * scale * u0 are then the exact negatives of these at
    the paper init's start."""
    norms = a_raw.clamp_min(functional.NORM_EPS) * b_raw.clamp_min(functional.NORM_EPS)
    scales = lam * scale * (1.0 / (rank * norms))
    if frozen_unit is None:
        return scales
    return torch.cat([scales, lam * scale * frozen_unit], dim=-1)


def _scale_grads(
    r: int,
    grad_s: torch.Tensor,
    a_raw: torch.Tensor,
    b_raw: torch.Tensor,
    lam: torch.Tensor,
    scale: torch.Tensor,
    inside: torch.Tensor | None,
    frozen_unit: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closed-form gradient of :func:`_scales`: (lambda's (L, 1), and the coefficients (L, r) that turn A
    and B into their share through the norms: ``g_a[..., None] * A``, ``g_b[:, None] * B``)."""
    a_norm, b_norm = a_raw.clamp_min(functional.NORM_EPS), b_raw.clamp_min(functional.NORM_EPS)
    inverse = 1.0 / (r * a_norm * b_norm)  # d s / d lam, up to scale: the frozen ranks' is frozen_unit
    rank_scales = lam * scale * inverse
    g = grad_s[..., :r]
    # scale applied after each sum: at the paper init's start (frozen_unit = -inverse, the frozen ranks'
    # gradient equal to the trainable ones') the two terms cancel exactly, whatever the scale.
    grad_lam = (g * inverse).sum(dim=-1, keepdim=True) * scale
    if frozen_unit is not None:
        grad_lam = grad_lam + (grad_s[..., r:] * frozen_unit).sum(dim=-1, keepdim=True) * scale
    if inside is not None:
        grad_lam = grad_lam * inside
    # s = lam * scale / (r |a| |b|): d/d|a| = -s / |a|, through the clamp (mask |a| >= eps) and the norm
    # (d|a|/da = a / |a|).
    g_norm = g * rank_scales
    g_a = torch.where(a_raw >= functional.NORM_EPS, -g_norm / (a_norm * a_raw.clamp_min(1e-30)), 0.0)
    g_b = torch.where(b_raw >= functional.NORM_EPS, -g_norm / (b_norm * b_raw.clamp_min(1e-30)), 0.0)
    return grad_lam, g_a, g_b
