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
        # (lam * scale) * (1 / (r |a| |b|)), as functional.rank_one_scales: the frozen ranks' lam * scale * u0
        # are then the exact negatives of these at the paper init's start.
        scales = (
            lam
            * scale_t
            * (1.0 / (rank * a_raw.clamp_min(functional.NORM_EPS) * b_raw.clamp_min(functional.NORM_EPS)))
        )
        if frozen_unit is None:
            return scales
        return torch.cat([scales, lam * scale_t * frozen_unit], dim=-1)

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
        As, Bs = params[:n], params[n : 2 * n]
        if ctx.stacked:
            grad_A = (g_a.unsqueeze(-1) * torch.stack(As)).unbind(0)
            grad_B = (g_b.unsqueeze(-2) * torch.stack(Bs)).unbind(0)
        else:
            grad_A = [g.unsqueeze(-1) * a for g, a in zip(g_a.unbind(0), As, strict=True)]
            grad_B = [g.unsqueeze(-2) * b for g, b in zip(g_b.unbind(0), Bs, strict=True)]
        grads = (*grad_A, *grad_B, *grad_lam.unbind(0))
        return (None,) * 6 + grads
