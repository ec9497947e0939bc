"""The batched fold (fastpath._FoldGroup) against autograd over the reference math, and its cache upkeep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import delora_diffusion as dd
from delora_diffusion import fastpath, functional, layers


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("per_layer_mult", [False, True])
@pytest.mark.parametrize("zero_B", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_fold_group_gradients_match_autograd_reference(init, per_layer_mult, zero_B, bounded):
    """Closed-form backward == autograd through functional.fold_factors (float64), incl. clamped norms and
    lambda clamped to a relative bound (one layer inside it, one beyond it, one unbounded)."""
    gen = torch.Generator().manual_seed(0)
    L, r, n_in, n_out = 3, 4, 5, 6

    def leaf(*shape: int, zero: bool = False) -> torch.Tensor:
        t = torch.zeros(shape, dtype=torch.float64) if zero else torch.randn(shape, generator=gen).double()
        return t.requires_grad_()

    A = [leaf(r, n_in) for _ in range(L)]
    B = [leaf(n_out, r, zero=zero_B) for _ in range(L)]
    lam = [leaf(1) for _ in range(L)]
    w = torch.rand(L, n_in, generator=gen).double() + 0.5
    A0, B0 = torch.randn(L, r, n_in, generator=gen).double(), torch.randn(L, n_out, r, generator=gen).double()
    mult = torch.rand(L, 1, generator=gen).double() if per_layer_mult else 0.7
    paper = init == "paper"
    frozen = functional.frozen_pair_factors(A0, B0, w, r) if paper else None

    lambda_max = None
    ref_lam = torch.stack(lam)
    if bounded:
        lambda_max = torch.tensor(
            [[lam[0].abs().item() * 2], [lam[1].abs().item() / 2], [float("inf")]]
        ).double()
        ref_lam = torch.minimum(torch.maximum(ref_lam, -lambda_max), lambda_max)
    args = (r, L, mult, w, *(frozen or (None, None)), lambda_max)
    A_f, B_f = fastpath._FoldGroup.apply(*args, *A, *B, *lam)
    ref_A, ref_B = functional.fold_factors(
        torch.stack(A),
        torch.stack(B),
        ref_lam,
        w,
        r,
        mult,
        frozen,
    )
    torch.testing.assert_close(A_f, ref_A)
    torch.testing.assert_close(B_f, ref_B)
    up_A, up_B = (
        torch.randn(A_f.shape, generator=gen).double(),
        torch.randn(B_f.shape, generator=gen).double(),
    )
    ours = torch.autograd.grad((A_f * up_A).sum() + (B_f * up_B).sum(), A + B + lam)
    ref = torch.autograd.grad((ref_A * up_A).sum() + (ref_B * up_B).sum(), A + B + lam)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * max(1.0, want.abs().max().item()))


def test_low_rank_linear_matches_two_linears():
    """The hidden-recomputing update gives autograd's values and gradients."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 5, generator=gen).double().requires_grad_()
    A_f = torch.randn(3, 5, generator=gen).double().requires_grad_()
    B_f = torch.randn(4, 3, generator=gen).double().requires_grad_()
    up = torch.randn(2, 7, 4, generator=gen).double()
    y = layers._LowRankLinear.apply(x, A_f, B_f)
    ref = torch.nn.functional.linear(torch.nn.functional.linear(x, A_f), B_f)
    torch.testing.assert_close(y, ref)
    ours = torch.autograd.grad((y * up).sum(), (x, A_f, B_f))
    want = torch.autograd.grad((ref * up).sum(), (x, A_f, B_f))
    for got, exp in zip(ours, want, strict=True):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_loading_frozen_tensors_in_place_refreshes_the_stacked_copies(init):
    """load_state_dict writes w / A0 / B0 in place; the group's stacked copies must follow."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 6))  # noqa: E731
    config = dd.DeLoRAConfig(rank=2, lambda_init=3.0, init=init, target_modules=["0", "2"])
    x = torch.randn(4, 6)
    source, target = make(), make()
    target.load_state_dict(source.state_dict())
    dd.inject_delora(source, config)
    torch.manual_seed(1)  # different random A, B (and A0, B0)
    dd.inject_delora(target, config)
    with torch.no_grad():
        for _, _, _, a in dd.iter_delora_layers(source):
            a.delora_B.add_(torch.randn(a.delora_B.shape))
    target(x).sum().backward()  # builds the target's groups from its own frozen tensors
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    torch.testing.assert_close(target(x), source(x))  # the training path (batched fold) as well
