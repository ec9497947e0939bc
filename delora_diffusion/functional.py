"""Pure DeLoRA weight math. No nn.Module here, so every formula can be tested alone.

For a frozen weight W (out x in; a conv weight is viewed as out x (in*kh*kw)):

    dW = (lam / r) * B @ diag(1 / (|b_i| |a_i|)) @ A @ diag(w),    w_j = |W[:, j]|

With the `paper` init a frozen pair (A0, B0) is subtracted, so dW = 0 at step 0:

    dW = (lam / r) * (B Xi A - B0 Xi0 A0) @ diag(w)

The forward never forms dW: it folds the scaling into the factors, ``A' = A diag(w)`` and
``B' = B diag(s)``, ``s = lam / (r |a| |b|)``, so ``x -> x A'^T B'^T`` costs exactly LoRA's two skinny
matmuls. Training keeps only s (:func:`rank_scales`) across a step and makes (A', B') per layer when needed
(:func:`scaled_factors`); merging and export use :func:`fold_factors`, the same math in one call.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-4
"""Lower clamp for the rank-1 norms; PEFT's value, which makes B = 0 (the `zero` init) well defined."""


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """w_j = |W[:, j]| of a weight viewed as out x in (conv kernels flattened), in fp32."""
    return weight.detach().float().reshape(weight.shape[0], -1).norm(dim=0)


def rank_one_scales(
    A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, rank: int, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """lam * scale / (r |a_i| |b_i|) for each rank-1 term; batched over any leading dims.

    A is (..., r, in) and B is (..., out, r); lam broadcasts against (..., r) (shape (..., 1)). `scale` is
    the run-time multiplier of lambda (the slider times the adapter weight). Written as ``(lam * scale) *
    (1 / (r |a| |b|))``, the form the paper init's frozen scales take (:func:`frozen_unit_scales`): at its start
    (A = A0, B = B0) the two are then exact negatives and the update exactly 0.
    """
    a_norm = A.norm(dim=-1).clamp_min(NORM_EPS)
    b_norm = B.norm(dim=-2).clamp_min(NORM_EPS)
    return lam * scale * (1.0 / (rank * a_norm * b_norm))


def frozen_pair_factors(
    A0: torch.Tensor, B0: torch.Tensor, w: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper init's frozen term folded once, up to lam: ``(A0 diag(w), -B0 diag(1 / (r |a0| |b0|)))``.

    A0, B0 and w never change, so only ``lam * scale`` is left to apply per step (see :func:`fold_factors`).
    """
    unit = rank_one_scales(A0, B0, torch.ones((), dtype=A0.dtype, device=A0.device), rank)
    return A0 * w.unsqueeze(-2), -B0 * unit.unsqueeze(-2)


def frozen_unit_scales(A0: torch.Tensor, B0: torch.Tensor, rank: int) -> torch.Tensor:
    """-1 / (r |a0_i| |b0_i|): the paper init's frozen rank-1 scales up to lam * scale; constant, so kept once."""
    return -rank_one_scales(A0, B0, torch.ones((), dtype=A0.dtype, device=A0.device), rank)


def rank_scales(
    A: torch.Tensor,
    B: torch.Tensor,
    lam: torch.Tensor,
    rank: int,
    scale: float | torch.Tensor = 1.0,
    frozen_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-rank scales s the forward applies, (..., r), or (..., 2r) with the paper init's frozen ranks after.

    With them ``dW = [B, B0] diag(s) [A; A0] diag(w)``: the same dW as :func:`fold_factors`, but only s (a few
    numbers per layer) depends on lambda and the norms, so no folded copy of A or B needs to outlive a layer's
    forward (:func:`scaled_factors` makes one there, transiently).
    """
    scales = rank_one_scales(A, B, lam, rank, scale)
    if frozen_unit is None:
        return scales
    return torch.cat([scales, lam * scale * frozen_unit], dim=-1)


def scaled_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    A0: torch.Tensor | None = None,
    B0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = ([A; A0] diag(w), [B, B0] diag(s)) for one layer, from the scales of :func:`rank_scales`."""
    if A0 is not None:
        A, B = torch.cat([A, A0]), torch.cat([B, B0], dim=-1)
    return A * w, B * s


def fold_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    lam: torch.Tensor,
    w: torch.Tensor,
    rank: int,
    scale: float | torch.Tensor = 1.0,
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A', B') with dW = B' @ A'; batched over leading dims. The one fold every path uses.

    `frozen` is the paper init's pair pre-folded by :func:`frozen_pair_factors`; its ranks are stacked after
    the trainable ones, so A' is (..., 2r, in) and B' is (..., out, 2r), and lam scales the frozen term too.
    """
    scales = rank_one_scales(A, B, lam, rank, scale)
    A_folded = A * w.unsqueeze(-2)
    B_folded = B * scales.unsqueeze(-2)
    if frozen is None:
        return A_folded, B_folded
    A0_folded, B0_unit = frozen
    frozen_scale = (lam * scale).unsqueeze(-1)  # (..., 1, 1)
    return torch.cat([A_folded, A0_folded], dim=-2), torch.cat([B_folded, B0_unit * frozen_scale], dim=-1)


def _frozen(A0: torch.Tensor | None, B0: torch.Tensor | None, w: torch.Tensor, rank: int):
    return None if A0 is None else frozen_pair_factors(A0, B0, w, rank)


def delta_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    lam: torch.Tensor,
    w: torch.Tensor,
    rank: int,
    scale: float | torch.Tensor = 1.0,
    A0: torch.Tensor | None = None,
    B0: torch.Tensor | None = None,
) -> torch.Tensor:
    """dW as a dense out x in matrix (for merging, export and the bound checks)."""
    A_folded, B_folded = fold_factors(A, B, lam, w, rank, scale, _frozen(A0, B0, w, rank))
    return B_folded @ A_folded


def norm_bound(lam: torch.Tensor | float, w: torch.Tensor, paper_init: bool) -> torch.Tensor:
    """The guaranteed bound on |dW|_F: |lam| * max_j w_j, doubled when a frozen pair is subtracted."""
    lam = torch.as_tensor(lam, dtype=torch.float32).abs().reshape(())
    bound = lam * w.float().max()
    return 2 * bound if paper_init else bound


def lambda_limit(w: torch.Tensor, relative_bound: float, paper_init: bool) -> float:
    """The largest |lambda| that keeps |dW|_F <= relative_bound * |W|_F on a layer with column norms w.

    From |dW|_F <= |lambda| max_j w_j (twice that for the paper init's difference of two normalized terms)
    and |W|_F = |w|: lambda_max = rho |w| / max_j w_j, halved for the paper init. Unlike a raw lambda, rho
    means the same on a 64-wide and a 3072-wide layer.
    """
    w = w.detach().float()
    limit = relative_bound * w.norm().item() / max(w.max().item(), 1e-12)
    return limit / 2 if paper_init else limit


def lora_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    lam: torch.Tensor,
    w: torch.Tensor,
    rank: int,
    scale: float | torch.Tensor = 1.0,
    A0: torch.Tensor | None = None,
    B0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact plain-LoRA factors (lora_down, lora_up) with up @ down == dW, for LoRA consumers.

    Use them with alpha == rank of the returned factors (LoRA scale 1).
    """
    A, B, lam, w = A.float(), B.float(), lam.float(), w.float()
    frozen = None if A0 is None else frozen_pair_factors(A0.float(), B0.float(), w, rank)
    A_folded, B_folded = fold_factors(A, B, lam, w, rank, scale, frozen)
    return A_folded.contiguous(), B_folded.contiguous()


def norm_stats(delta: torch.Tensor, lam: torch.Tensor | float, w: torch.Tensor, paper_init: bool) -> dict:
    """The one norm report of a layer: |dW|_F, the guaranteed bound, and both relative to |W|_F.

    |W|_F is the norm of the column norms w, so no base weight is needed (a file or a sharded layer will do).
    `lam` is the effective lambda (trained lambda times the run-time scale).
    """
    weight_norm = max(w.float().norm().item(), 1e-12)
    delta_norm = delta.float().norm().item()
    bound = norm_bound(lam, w, paper_init).item()
    return {
        "delta_norm": delta_norm,
        "bound": bound,
        "relative_delta": delta_norm / weight_norm,
        "relative_bound": bound / weight_norm,
    }
