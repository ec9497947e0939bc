"""Second review of the fast path's layer updates (update._DeLoRALinear / _DeLoRAConv2d): Conv2d geometries the
custom Function cannot take, fp16 adapters at the zero init, and input layouts. Each against plain autograd
through the dense dW of functional.delta_weight, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import delora_diffusion as dd
from delora_diffusion import fastpath, functional


def _adapted(make, init: str) -> nn.Sequential:
    """One adapted layer, in float64, its adapter moved away from the init (as training would)."""
    torch.manual_seed(0)
    model = nn.Sequential(make())
    dd.inject_delora(model, dd.DeLoRAConfig(rank=3, init=init, target_modules=["0"], lambda_init=1.5))
    model.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for *_, a in dd.iter_delora_layers(model):
            a.delora_A.add_(torch.randn(a.delora_A.shape, generator=gen, dtype=torch.float64))
            a.delora_B.add_(torch.randn(a.delora_B.shape, generator=gen, dtype=torch.float64))
    return model


def _dense(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The layer with W + dW, autograd all the way."""
    base = model[0]
    a = base.delora["default"]
    dW = functional.delta_weight(
        a.delora_A, a.delora_B, a.bounded_lambda(), a.delora_w_norm, a.rank, 1.0, *a.frozen_pair
    )
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, base.weight + dW.reshape(base.weight.shape), base.bias)
    return nn.functional.linear(x, base.weight + dW, base.bias)


def _assert_trains_like_dense(make, init: str, x: torch.Tensor, layout=lambda t: t) -> None:
    """Output, input gradient and every trainable gradient equal the dense reference's; `layout` rearranges the
    input (non-contiguous, channels_last) on its way into the layer."""
    model, ref = _adapted(make, init), _adapted(make, init)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    up = torch.randn(_dense(ref, layout(x)).shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    y = model(layout(x_ours))
    want = _dense(ref, layout(x_ref))
    torch.testing.assert_close(y, want)
    (y * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(3, 4, 3, padding="same"),
        lambda: nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2)),  # asymmetric: F.conv2d pads apart
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding="valid"),
    ],
    ids=["same", "same-even-dilated", "valid-strided"],
)
def test_a_conv2d_with_string_padding_trains_like_the_dense_reference(make, init):
    """nn.Conv2d(padding="same" / "valid") keeps the string; torch.nn.grad.conv2d_input / conv2d_weight took
    it as a sequence of characters and the backward failed (aten::convolution_backward's schema)."""
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _assert_trains_like_dense(make, init, x)


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_an_unbatched_conv2d_input_trains_like_the_dense_reference(init):
    """nn.Conv2d takes a (C, H, W) input; the custom Function's backward helpers (and its einsum) need N."""
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _assert_trains_like_dense(lambda: nn.Conv2d(3, 4, 3, padding=1), init, x)


@pytest.mark.parametrize("keep_hidden", [False, True])
def test_fp16_adapters_at_the_zero_init_add_nothing_while_training(keep_hidden):
    """DeLoRAConfig(dtype="float16") on an fp16 layer: s (about 1e4 at the zero init, B = 0 clamped to its
    norm's eps) fits fp16, but s times the T x r hidden overflowed to inf, and inf times B = 0 is NaN. Folded
    into B first, as before the hidden-side s, the update is exactly 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).half()
    config = dd.DeLoRAConfig(rank=4, init="zero", target_modules=["0"], lambda_init=8.0, dtype="float16")
    dd.inject_delora(model, config)
    x = (10 * torch.randn(40, 64, generator=torch.Generator().manual_seed(1))).half()
    with torch.no_grad():
        base = nn.functional.linear(x, model[0].weight, model[0].bias)
    with fastpath.fastpath_options(recompute_hidden=not keep_hidden):
        y = model(x)
        assert torch.equal(y, base)
        y.float().sum().backward()  # B's gradient may overflow fp16 here (s is huge); lambda's is exactly 0
    assert model[0].delora["default"].delora_lambda.grad.item() == 0.0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tokens", [40, 8])  # s folded into B in forward (more tokens than outputs) or not
def test_bf16_at_the_zero_init_scales_the_hidden_safely(autocast, tokens):
    """bf16 has fp32's range, so s (huge at the zero init) scales the T x r hidden in bf16 (bf16 weights, or
    bf16 autocast over fp32 adapters): the update is exactly 0 with B = 0, lambda's gradient exactly 0 and
    B's finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    if not autocast:
        model = model.bfloat16()
    dtype = "float32" if autocast else "bfloat16"
    config = dd.DeLoRAConfig(rank=4, init="zero", target_modules=["0"], lambda_init=8.0, dtype=dtype)
    dd.inject_delora(model, config)
    x = 10 * torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    x = x if autocast else x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            base = nn.functional.linear(x, model[0].weight, model[0].bias)
        y = model(x)
    assert torch.equal(y, base)
    y.float().sum().backward()
    adapter = model[0].delora["default"]
    assert adapter.delora_lambda.grad.item() == 0.0
    assert torch.isfinite(adapter.delora_B.grad).all() and adapter.delora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("tokens", [9, 1])  # w on A (more tokens than ranks) or on x (fewer)
def test_a_non_contiguous_linear_input_trains_like_the_dense_reference(init, tokens):
    """x arrives transposed (attention's head shuffles hand over such views): reshape, not view, in backward."""
    x = torch.randn(5, tokens, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _assert_trains_like_dense(lambda: nn.Linear(5, 4), init, x, layout=lambda t: t.transpose(0, -1))


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("keep_hidden", [False, True])
def test_a_channels_last_strided_conv2d_trains_like_the_dense_reference(init, keep_hidden):
    """channels_last input, a non-square kernel with stride and dilation, an odd size: the kernels rebuilt in
    backward and torch.nn.grad's helpers give autograd's gradients."""
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def make() -> nn.Conv2d:
        return nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    with fastpath.fastpath_options(recompute_hidden=not keep_hidden):
        _assert_trains_like_dense(
            make, init, x, layout=lambda t: t.contiguous(memory_format=torch.channels_last)
        )
