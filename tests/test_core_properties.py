"""Property tests of the DeLoRA math on real layers: bound, no-op at init, merge, unmerge, scale."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from delora_diffusion import (
    DeLoRAConfig,
    functional,
    inject_delora,
    iter_delora_layers,
    merge_delora,
    set_delora_scale,
    unmerge_delora,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tolerances relative to the output's scale, per base dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}

layer_specs = st.one_of(
    st.tuples(st.just("linear"), st.integers(1, 24), st.integers(1, 24), st.just(1)),
    st.tuples(st.just("conv"), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3])),
)


def make_layer(spec, dtype: torch.dtype, seed: int) -> nn.Module:
    kind, n_in, n_out, kernel = spec
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(n_in, n_out)
    else:
        layer = nn.Conv2d(n_in, n_out, kernel, padding=kernel // 2)
    return nn.Sequential(layer.to(dtype))


def make_input(spec, dtype: torch.dtype) -> torch.Tensor:
    kind, n_in, _, _ = spec
    shape = (3, n_in) if kind == "linear" else (2, n_in, 5, 5)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def randomize(model: nn.Module, seed: int, lam: float) -> None:
    """Move the adapter away from its init, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, adapter in iter_delora_layers(model):
            adapter.delora_A.add_(torch.randn(adapter.delora_A.shape, generator=gen))
            adapter.delora_B.add_(torch.randn(adapter.delora_B.shape, generator=gen))
            adapter.delora_lambda.fill_(lam)


common = dict(
    spec=layer_specs,
    rank=st.integers(1, 8),
    init=st.sampled_from(["paper", "zero"]),
    dtype_name=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, 1000),
)


@settings(max_examples=40, deadline=None)
@given(**common, lam=st.floats(-20, 20, allow_nan=False))
def test_update_norm_is_bounded_by_lambda(spec, rank, init, dtype_name, seed, lam):
    model = make_layer(spec, DTYPES[dtype_name], seed)
    inject_delora(model, DeLoRAConfig(rank=rank, init=init, target_modules=["0"]))
    randomize(model, seed, lam)
    (_, _, _, adapter) = next(iter_delora_layers(model))
    delta = adapter.delta_weight()
    bound = functional.norm_bound(lam, adapter.delora_w_norm, paper_init=init == "paper")
    assert delta.norm() <= bound * (1 + 1e-5) + 1e-6
    # The frozen norms are those of the base weight viewed as out x in.
    expected_w = model[0].weight.float().reshape(model[0].weight.shape[0], -1).norm(dim=0)
    torch.testing.assert_close(adapter.delora_w_norm, expected_w)


@settings(max_examples=40, deadline=None)
@given(**common)
def test_adapter_is_a_no_op_at_init(spec, rank, init, dtype_name, seed):
    dtype = DTYPES[dtype_name]
    model = make_layer(spec, dtype, seed)
    x = make_input(spec, dtype)
    base = model(x)
    inject_delora(model, DeLoRAConfig(rank=rank, init=init, lambda_init=15.0, target_modules=["0"]))
    (_, _, _, adapter) = next(iter_delora_layers(model))
    assert adapter.delta_weight().abs().max() <= 1e-6 * (1 + adapter.delora_w_norm.max())
    torch.testing.assert_close(model(x), base, atol=TOL[dtype] * (1 + base.abs().max().item()), rtol=0)


@settings(max_examples=40, deadline=None)
@given(**common, lam=st.floats(0.1, 5))
def test_merged_equals_unmerged_and_unmerge_restores(spec, rank, init, dtype_name, seed, lam):
    dtype = DTYPES[dtype_name]
    model = make_layer(spec, dtype, seed)
    original = model[0].weight.detach().clone()
    x = make_input(spec, dtype)
    inject_delora(model, DeLoRAConfig(rank=rank, init=init, target_modules=["0"]))
    randomize(model, seed, lam)
    with torch.no_grad():
        unmerged = model(x)
        merge_delora(model)
        merged = model(x)
        tol = TOL[dtype] * (1 + unmerged.abs().max().item())
        torch.testing.assert_close(merged, unmerged, atol=tol, rtol=0)
        unmerge_delora(model)
        weight_tol = TOL[dtype] * (1 + original.abs().max().item())
        torch.testing.assert_close(model[0].weight, original, atol=weight_tol, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=tol, rtol=0)


@settings(max_examples=40, deadline=None)
@given(**common, lam=st.floats(0.1, 5), scale=st.floats(-2, 2))
def test_scale_s_equals_lambda_times_s(spec, rank, init, dtype_name, seed, lam, scale):
    dtype = DTYPES[dtype_name]
    x = make_input(spec, dtype)
    outputs = []
    for use_scale in (True, False):
        model = make_layer(spec, dtype, seed)
        torch.manual_seed(seed)
        inject_delora(model, DeLoRAConfig(rank=rank, init=init, target_modules=["0"]))
        if use_scale:
            randomize(model, seed, lam)
            set_delora_scale(model, scale)
        else:
            randomize(model, seed, lam * scale)
        with torch.no_grad():
            outputs.append(model(x))
    tol = TOL[dtype] * (1 + outputs[1].abs().max().item())
    torch.testing.assert_close(outputs[0], outputs[1], atol=tol, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    spec=layer_specs, rank=st.integers(1, 6), init=st.sampled_from(["paper", "zero"]), seed=st.integers(0, 99)
)
def test_scale_zero_gives_the_base_output_exactly(spec, rank, init, seed):
    model = make_layer(spec, torch.float32, seed)
    x = make_input(spec, torch.float32)
    base = model(x)
    inject_delora(model, DeLoRAConfig(rank=rank, init=init, target_modules=["0"]))
    randomize(model, seed, 3.0)
    set_delora_scale(model, 0.0)
    assert torch.equal(model(x), base)


@settings(max_examples=20, deadline=None)
@given(**common, lam=st.floats(0.1, 5))
def test_lora_export_factors_reproduce_delta(spec, rank, init, dtype_name, seed, lam):
    model = make_layer(spec, DTYPES[dtype_name], seed)
    inject_delora(model, DeLoRAConfig(rank=rank, init=init, target_modules=["0"]))
    randomize(model, seed, lam)
    (_, _, _, a) = next(iter_delora_layers(model))
    A0, B0 = a.frozen_pair
    down, up = functional.lora_factors(
        a.delora_A, a.delora_B, a.delora_lambda, a.delora_w_norm, a.rank, 1.0, A0, B0
    )
    assert down.shape[0] == up.shape[1] == (2 * rank if init == "paper" else rank)
    torch.testing.assert_close(up @ down, a.delta_weight(), atol=1e-5, rtol=1e-5)
