"""The batched fold (fold.FoldGroup) and the layer update against autograd over the reference math, the
memory they keep, and the cache upkeep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import delora_diffusion as dd
from delora_diffusion import fastpath, fold, functional, layers, update


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("per_layer_mult", [False, True])
@pytest.mark.parametrize("zero_B", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_fold_group_gradients_match_autograd_reference(init, per_layer_mult, zero_B, bounded, stacked):
    """Closed-form backward == autograd through functional.rank_scales (float64), incl. clamped norms and
    lambda clamped to a relative bound (one layer inside it, one beyond it, one unbounded); norms taken on
    the stacked group (accelerators) or per member (CPU)."""
    gen = torch.Generator().manual_seed(0)
    L, r, n_in, n_out = 3, 4, 5, 6

    def leaf(*shape: int, zero: bool = False) -> torch.Tensor:
        t = torch.zeros(shape, dtype=torch.float64) if zero else torch.randn(shape, generator=gen).double()
        return t.requires_grad_()

    A = [leaf(r, n_in) for _ in range(L)]
    B = [leaf(n_out, r, zero=zero_B) for _ in range(L)]
    lam = [leaf(1) for _ in range(L)]
    A0, B0 = torch.randn(L, r, n_in, generator=gen).double(), torch.randn(L, n_out, r, generator=gen).double()
    mult = torch.rand(L, 1, generator=gen).double() if per_layer_mult else 0.7
    frozen_unit = functional.frozen_unit_scales(A0, B0, r) if init == "paper" else None

    lambda_max = None
    ref_lam = torch.stack(lam)
    if bounded:
        lambda_max = torch.tensor(
            [[lam[0].abs().item() * 2], [lam[1].abs().item() / 2], [float("inf")]]
        ).double()
        ref_lam = torch.minimum(torch.maximum(ref_lam, -lambda_max), lambda_max)
    scales = fold.FoldGroup.apply(r, L, stacked, mult, frozen_unit, lambda_max, *A, *B, *lam)
    up = torch.randn(scales.shape, generator=gen).double()
    ours = torch.autograd.grad((scales * up).sum(), A + B + lam)
    ref = functional.rank_scales(torch.stack(A), torch.stack(B), ref_lam, r, mult, frozen_unit)
    torch.testing.assert_close(scales, ref)
    want = torch.autograd.grad((ref * up).sum(), A + B + lam)
    for got, exp in zip(ours, want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9 * max(1.0, exp.abs().max().item()))


# (parameters' dtype, compute dtype) with the tolerance each is held to, relative to the largest value
_LAYER_DTYPES = {
    (torch.float64, torch.float64): 1e-12,
    (torch.float64, torch.float32): 1e-5,  # a lower compute dtype: s folded into B
    (torch.float64, torch.bfloat16): 0.03,  # autocast-like: s on the hidden in bf16
    (torch.float32, torch.float32): 1e-5,  # w on x possible (parameters in the compute dtype)
    (torch.float16, torch.float16): 0.01,  # fp16: s always folded into B, w on x possible
}


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("keep_hidden", [False, True])
@pytest.mark.parametrize("tokens,n_out", [((2, 7), 4), ((1, 2), 4), ((1, 3), 4), ((1, 5), 4), ((1, 7), 8)])
@pytest.mark.parametrize("dtypes", list(_LAYER_DTYPES), ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_the_layer_update_matches_autograd_through_the_transient_factors(
    init, keep_hidden, tokens, n_out, dtypes
):
    """update._DeLoRALinear (factors made again in backward) gives autograd's values and gradients (float64
    reference), with w applied to A (at least as many tokens as ranks) or to x (fewer, parameters in the
    compute dtype), and s on the hidden (fewer tokens than outputs, where s is safe there: not fp16, compute
    in s's dtype or bf16) or folded into B; backward puts s where forward did.
    Rank 3 (6 with the frozen pair): 14 tokens take A and B, 2 take x and the hidden, 3 take A and the hidden
    (zero init), 5 take x and B (paper init), 7 of 8 outputs take A and the hidden (paper init)."""
    param_dtype, compute = dtypes
    tol = _LAYER_DTYPES[dtypes]
    gen = torch.Generator().manual_seed(1)
    r, n_in = 3, 5
    R = 2 * r if init == "paper" else r

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(param_dtype).requires_grad_()

    x, s, A, B = leaf(*tokens, n_in), leaf(R), leaf(r, n_in), leaf(n_out, r)
    w = (torch.rand(n_in, generator=gen) + 0.5).to(param_dtype)
    A0, B0 = (torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen))
    A0, B0 = (None, None) if init == "zero" else (A0.to(param_dtype), B0.to(param_dtype))
    up = torch.randn(*tokens, n_out, generator=gen).double()
    y = update._DeLoRALinear.apply(x, s, A, B, w, A0, B0, compute, keep_hidden)
    assert y.dtype == compute
    ours = torch.autograd.grad((y.double() * up).sum(), (x, s, A, B))
    ref_in = [t.detach().double().requires_grad_() for t in (x, s, A, B)]
    frozen = [None if t is None else t.double() for t in (A0, B0)]
    A_f, B_f = functional.scaled_factors(ref_in[2], ref_in[3], w.double(), ref_in[1], *frozen)
    ref = torch.nn.functional.linear(torch.nn.functional.linear(ref_in[0], A_f), B_f)
    want = torch.autograd.grad((ref * up).sum(), ref_in)
    for got, exp, leaf_in in zip((y, *ours), (ref, *want), (y, x, s, A, B), strict=True):
        assert got.dtype == leaf_in.dtype
        torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol * exp.abs().max().item())


def _bounded_net(init: str, rho: float | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 5))
    kwargs = {"relative_bound": rho} if rho else {"lambda_init": 1.5}
    config = dd.DeLoRAConfig(rank=3, init=init, target_modules=["0", "2"], **kwargs)
    dd.inject_delora(model, config).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, _, a in dd.iter_delora_layers(model):
            a.delora_A.add_(torch.randn(a.delora_A.shape, generator=gen, dtype=torch.float64))
            a.delora_B.add_(torch.randn(a.delora_B.shape, generator=gen, dtype=torch.float64))
            if rho:  # beyond the bound, as after an optimizer step: the forward projects lambda back
                a.delora_lambda.fill_(3 * a.lambda_max)
    return model


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("rho", [None, 0.05])
@pytest.mark.parametrize("batched", [True, False])
def test_model_gradients_equal_autograd_through_the_dense_delta(init, rho, batched):
    """End to end: the gradients of A, B and lambda equal plain autograd through functional.delta_weight."""
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = _bounded_net(init, rho)
    dd.set_delora_scale(model, 0.7)
    with fastpath.fastpath_options(batched=batched):
        model.train()
        loss = model(x).square().sum()
        loss.backward()
    ref_model = _bounded_net(init, rho)
    (_, base0, _, a0), (_, base2, _, a2) = list(dd.iter_delora_layers(ref_model))

    def adapted(base: nn.Linear, a: layers.DeLoRALayer, h: torch.Tensor) -> torch.Tensor:
        A0, B0 = a.frozen_pair
        a.project_lambda()
        lam = a.bounded_lambda()
        dW = functional.delta_weight(a.delora_A, a.delora_B, lam, a.delora_w_norm, a.rank, 0.7, A0, B0)
        return torch.nn.functional.linear(h, base.weight + dW, base.bias)

    ref_loss = adapted(base2, a2, torch.nn.functional.silu(adapted(base0, a0, x))).square().sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    ours = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    want = dict((n, p.grad) for n, p in ref_model.named_parameters() if p.requires_grad)
    assert len(ours) == 6
    for name, grad in ours:
        torch.testing.assert_close(grad, want[name], rtol=1e-9, atol=1e-12)
    if rho:
        assert all(a.delora_lambda.item() == a.lambda_max for *_, a in dd.iter_delora_layers(model))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes of the distinct storages autograd keeps for backward, besides the model's own tensors and the
    input x, the largest of them) for one forward of `model` on `x`."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) + [x]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    return sum(saved.values()), max(saved.values(), default=0)


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_training_keeps_no_folded_copy_of_the_adapter(init):
    """Structural memory check: an adapted layer saves for backward what PEFT LoRA saves on the same layer
    (x and the parameters) plus vectors of length r, never an adapter-sized folded copy; and what the fast
    path keeps across steps is vectors too (the cached scales, the group's constants)."""
    peft = pytest.importorskip("peft")
    n_in, n_out, r, tokens = 256, 192, 16, 8
    adapter_bytes = (n_in + n_out) * r * 4

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(n_in, n_out))

    x = torch.randn(tokens, n_in, requires_grad=True)
    lora = peft.get_peft_model(base(), peft.LoraConfig(r=r, target_modules=["0"]))
    lora_total, _ = _saved_bytes(lora, x)
    ours = base()
    dd.inject_delora(ours, dd.DeLoRAConfig(rank=r, lambda_init=2.0, init=init, target_modules=["0"]))
    ours_total, ours_largest = _saved_bytes(ours, x)
    assert ours_largest < adapter_bytes / 20
    assert ours_total <= lora_total + adapter_bytes / 50
    ((*_, adapter),) = list(dd.iter_delora_layers(ours))
    assert adapter.__dict__["_cache"] is None  # backward spent the step's scales (their graph is gone)
    with torch.no_grad():
        ours(x)
    assert adapter.__dict__["_cache"].shape == (2 * r if init == "paper" else r,)
    kept = [t for g in ours.__dict__["_delora_plan"].groups.values() for t in vars(g).values()]
    assert sum(t.numel() for t in kept if isinstance(t, torch.Tensor)) <= 2 * r


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


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_training_under_autocast_matches_fp32_and_keeps_no_folded_copy(init):
    """bf16 autocast: the update casts its transient factors itself; gradients follow fp32's within bf16's
    precision, and nothing adapter-sized is saved for backward there either."""
    n_in, r = 128, 16
    x = torch.randn(8, n_in, generator=torch.Generator().manual_seed(4), requires_grad=True)
    grads = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n_in, n_in))
        dd.inject_delora(model, dd.DeLoRAConfig(rank=r, lambda_init=2.0, init=init, target_modules=["0"]))
        with torch.no_grad():
            ((*_, a),) = list(dd.iter_delora_layers(model))
            a.delora_B.add_(torch.randn(a.delora_B.shape, generator=torch.Generator().manual_seed(5)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, _ = _saved_bytes(model, x)
            torch.manual_seed(0)
            frozen_total, _ = _saved_bytes(nn.Sequential(nn.Linear(n_in, n_in)).requires_grad_(False), x)
        assert total - frozen_total < n_in * r  # small vectors only: a bf16 copy of A alone is 2 n_in r
        grads.append([p.grad for p in (a.delora_A, a.delora_B, a.delora_lambda)])
    for fp32, bf16 in zip(*grads, strict=True):
        assert bf16.dtype == torch.float32
        torch.testing.assert_close(bf16, fp32, atol=0.05 * fp32.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("keep_hidden", [False, True])
@pytest.mark.parametrize(
    "geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, dilation=2)]
)
def test_the_conv_update_matches_autograd_through_the_transient_factors(init, keep_hidden, geometry):
    """update._DeLoRAConv2d (factors made again in backward) gives autograd's values and gradients."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, **geometry).double()
    r = 2
    R = 2 * r if init == "paper" else r

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).double().requires_grad_()

    x, s, A, B = leaf(2, 3, 9, 8), leaf(R), leaf(r, 27), leaf(5, r)
    w = torch.rand(27, generator=gen).double() + 0.5
    A0, B0 = torch.randn(r, 27, generator=gen).double(), torch.randn(5, r, generator=gen).double()
    if init == "zero":
        A0 = B0 = None
    y = update._DeLoRAConv2d.apply(x, s, A, B, w, A0, B0, torch.float64, keep_hidden, base)
    A_f, B_f = functional.scaled_factors(A, B, w, s, A0, B0)
    ref = torch.nn.functional.conv2d(
        base._conv_forward(x, A_f.reshape(R, 3, 3, 3), None), B_f[:, :, None, None]
    )
    torch.testing.assert_close(y, ref)
    up = torch.randn(y.shape, generator=gen).double()
    ours = torch.autograd.grad((y * up).sum(), (x, s, A, B))
    want = torch.autograd.grad((ref * up).sum(), (x, s, A, B))
    for got, exp in zip(ours, want, strict=True):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_conv_training_keeps_no_folded_copy_of_the_adapter(init):
    """A 3x3 Conv2d adapter saves for backward what PEFT LoRA saves on the same conv (plus vectors), never the
    folded kernel pair (it did: autograd kept A' and B' of every adapted conv)."""
    peft = pytest.importorskip("peft")
    c_in, c_out, r = 64, 48, 8
    adapter_bytes = (c_in * 9 + c_out) * r * 4

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1))

    x = torch.randn(1, c_in, 6, 6, requires_grad=True)
    lora_total, _ = _saved_bytes(peft.get_peft_model(base(), peft.LoraConfig(r=r, target_modules=["0"])), x)
    ours = base()
    dd.inject_delora(ours, dd.DeLoRAConfig(rank=r, lambda_init=2.0, init=init, target_modules=["0"]))
    ours_total, ours_largest = _saved_bytes(ours, x)
    assert ours_largest < adapter_bytes / 10
    assert ours_total <= lora_total + adapter_bytes / 20


@pytest.mark.parametrize("stack_fold", [False, True])
def test_the_stack_fold_switch_reaches_the_fold_and_keeps_the_gradients(stack_fold, monkeypatch):
    """`fastpath_options(stack_fold=...)` decides how the fold takes its norms (stacked copies on accelerators,
    per member on a CPU by default); either way the gradients are the per-layer path's."""
    seen: list[bool] = []
    apply = fold.FoldGroup.apply
    monkeypatch.setattr(fold.FoldGroup, "apply", lambda *args: seen.append(args[2]) or apply(*args))
    assert fastpath._stack_fold(torch.device("cpu")) is False
    assert fastpath._stack_fold(torch.device("cuda")) is True
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = []
    for batched in (True, False):
        model = _bounded_net("paper", 0.05)
        with fastpath.fastpath_options(batched=batched, stack_fold=stack_fold):
            model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert seen and set(seen) == {stack_fold}
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, msg=name)


def _assert_exact_at_the_paper_init(
    model: nn.Module, x: torch.Tensor, base: torch.Tensor, keep_hidden: bool
) -> None:
    """The update adds exactly nothing while training and lambda's gradient is exactly 0."""
    dd.set_delora_scale(model, 0.7)  # nor a power of two: scale and lambda must not break the cancellation
    with fastpath.fastpath_options(recompute_hidden=not keep_hidden):
        y = model(x)
        assert torch.equal(y, base)
        (y.float() * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    ((*_, adapter),) = list(dd.iter_delora_layers(model))
    assert adapter.delora_lambda.grad.item() == 0.0
    assert adapter.delora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("keep_hidden", [False, True])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,rank,tokens", [(32, 2, 12), (48, 4, 3), (64, 8, 20), (1280, 32, 16)])
def test_at_the_paper_init_the_update_and_lambdas_gradient_are_exactly_zero(
    n, rank, tokens, compute, keep_hidden
):
    """A = A0, B = B0: ΔW = 0, so where the two pairs run as separate products (fewer tokens than outputs)
    the layer adds exactly nothing and lambda's gradient is exactly 0 (not float noise, which Adam would
    scale up to a full lambda step), at PEFT's lambda 15 and a run-time scale of 0.7: the trainable and
    frozen scales are written alike. (With more tokens the pairs are stacked, [A; A0], for speed at low
    ranks, and one matmul may round its halves apart: there the start is exact only up to float noise.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n))
    if compute == "bfloat16":
        model = model.bfloat16()
    config = dd.DeLoRAConfig(rank=rank, init="paper", target_modules=["0"], lambda_init=15.0, dtype=compute)
    dd.inject_delora(model, config)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1)).to(getattr(torch, compute))
    with torch.no_grad():
        base = nn.functional.linear(x, model[0].weight, model[0].bias)
    _assert_exact_at_the_paper_init(model, x, base, keep_hidden)
