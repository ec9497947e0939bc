"""The factor fold (fold.FoldFactors, on by default on accelerators): each group's folded factors made once per
step, each Linear update two plain matmuls. Checked here on the CPU, switched on: gradients against autograd
through the dense delta, checkpointing, training steps, mixed Conv2d/Linear groups, and the launch count it
exists for (dispatched kernels per step, the cost of a launch-bound GPU step). The compiled path with factors
is in tests/test_compile.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import delora_diffusion as dd
from delora_diffusion import fastpath, functional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_ops import LaunchCounter  # noqa: E402


def _net(init: str, rho: float | None, width: int = 8, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Three same-shaped adapted Linear layers (one group) and a differently shaped one."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, width), nn.SiLU(), nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 5)
    )
    kwargs = {"relative_bound": rho} if rho else {"lambda_init": 1.5}
    config = dd.DeLoRAConfig(rank=3, init=init, target_modules=["0", "2", "3", "4"], **kwargs)
    dd.inject_delora(model, config).to(dtype)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, _, a in dd.iter_delora_layers(model):
            a.delora_A.add_(torch.randn(a.delora_A.shape, generator=gen).to(dtype))
            a.delora_B.add_(torch.randn(a.delora_B.shape, generator=gen).to(dtype))
            if rho:  # beyond the bound, as after an optimizer step: the forward projects lambda back
                a.delora_lambda.fill_(3 * a.lambda_max)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _factored_layers(model: nn.Module) -> int:
    return sum(a.__dict__.get("_factors") is not None for *_, a in dd.iter_delora_layers(model))


def test_factors_are_on_for_accelerators_only_by_default():
    assert fastpath._factors_wanted(torch.device("cpu")) is False
    assert fastpath._factors_wanted(torch.device("cuda")) is True
    with fastpath.fastpath_options(fold_factors=True):
        assert fastpath._factors_wanted(torch.device("cpu")) is True


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("rho", [None, 0.05])
@pytest.mark.parametrize("tokens", [2, 40])
def test_gradients_equal_autograd_through_the_dense_delta(init, rho, tokens):
    """Every parameter's gradient and the input's equal plain autograd through functional.delta_weight
    (float64), with a run-time scale and lambda projected onto its relative bound; few and many tokens."""
    x = torch.randn(tokens, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = _net(init, rho)
    dd.set_delora_scale(model, 0.7)
    xs = x.clone().requires_grad_()
    with fastpath.fastpath_options(fold_factors=True):
        y = model(xs)
        assert _factored_layers(model) == 4
        loss = y.square().sum()
        loss.backward()
    assert _factored_layers(model) == 0  # released with the fold's graph once backward has run through it

    ref_model = _net(init, rho)
    xr = x.clone().requires_grad_()
    h = xr
    for module in ref_model:
        if isinstance(module, nn.Linear):
            ((*_, a),) = [entry for entry in dd.iter_delora_layers(module)]
            A0, B0 = a.frozen_pair
            a.project_lambda()
            dW = functional.delta_weight(
                a.delora_A, a.delora_B, a.bounded_lambda(), a.delora_w_norm, a.rank, 0.7, A0, B0
            )
            h = nn.functional.linear(h, module.weight + dW, module.bias)
        else:
            h = module(h)
    ref_loss = h.square().sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-9, atol=1e-12)
    want = _grads(ref_model)
    got = _grads(model)
    assert len(got) == 12
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_bf16_autocast_over_fp32_adapters_matches_the_scale_fold(init):
    """The usual GPU setting: factors in bf16, parameters' gradients in fp32, close to the per-layer path's."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(4))
    results = []
    for factors in (False, True):
        model = _net(init, None, width=16, dtype=torch.float32)
        with fastpath.fastpath_options(fold_factors=factors), torch.autocast("cpu", torch.bfloat16):
            y = model(x)
            if factors:
                assert {a._factors[1].dtype for *_, a in dd.iter_delora_layers(model)} == {torch.bfloat16}
            y.float().square().sum().backward()
        results.append((y.float(), _grads(model)))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0.02, atol=0.02 * y0.abs().max().item())
    for name, grad in g1.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, g0[name], rtol=0.03, atol=0.03 * g0[name].abs().max().item())


class _Checkpointed(nn.Module):
    """The middle layers under activation checkpointing, as diffusers' blocks run."""

    def __init__(self, model: nn.Module, reentrant: bool | None) -> None:
        super().__init__()
        self.model, self.reentrant = model, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, act, mid1, mid2, last = self.model
        h = act(first(x))
        if self.reentrant is not None:
            h = checkpoint(lambda t: mid2(mid1(t)), h, use_reentrant=self.reentrant)
            h = checkpoint(lambda t: mid1(t), h, use_reentrant=self.reentrant)
        else:
            h = mid1(mid2(mid1(h)))
        return last(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gets_the_gradients_of_a_plain_run(reentrant):
    """Recomputed blocks use the very same factors; reentrant checkpointing runs backward through the fold's
    node once per block, which must add up to one plain backward. mid1 runs twice, in two blocks."""
    x = torch.randn(
        12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True
    )
    grads = []
    for mode in (None, reentrant):
        model = _net("paper", 0.05)
        with fastpath.fastpath_options(fold_factors=True):
            fastpath.refresh_pre_hook(model, ())  # the wrapper calls the layers, not the hooked model
            _Checkpointed(model, mode)(x).square().sum().backward()
        grads.append(_grads(model))
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


def test_training_steps_end_where_the_scale_fold_ends():
    """Three AdamW steps: the factors are folded anew after every step (the optimizer moves the parameters'
    versions), so both paths end at the same parameters."""
    gen = torch.Generator().manual_seed(6)
    x, target = torch.randn(16, 6, generator=gen), torch.randn(16, 5, generator=gen)
    finals = []
    for factors in (False, True):
        model = _net("paper", 0.3, dtype=torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        with fastpath.fastpath_options(fold_factors=factors):
            for _ in range(3):
                (model(x) - target).square().mean().backward()
                opt.step()
                opt.zero_grad()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in finals[1].items():
        torch.testing.assert_close(value, finals[0][name], rtol=1e-4, atol=1e-5, msg=name)


class _ConvAndLinear(nn.Module):
    """A Conv2d(5, 4, 1) and a Linear(5, 4): the same adapter shapes, so one group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.linear = nn.Conv2d(5, 4, 1), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).square().sum() + self.linear(x.permute(0, 2, 3, 1)).square().sum()


def test_a_group_with_conv_layers_folds_scales_only():
    """Conv2d updates do not take the factors: a group holding one folds scales only, and its gradients are
    the per-layer path's."""
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = []
    for factors in (False, True):
        torch.manual_seed(0)
        model = _ConvAndLinear().double()
        config = dd.DeLoRAConfig(rank=2, init="paper", lambda_init=1.5, target_modules=["conv", "linear"])
        dd.inject_delora(model, config)
        with torch.no_grad():
            for *_, a in dd.iter_delora_layers(model):
                a.delora_B.add_(0.5)
        with fastpath.fastpath_options(fold_factors=factors):
            loss = model(x)
            assert _factored_layers(model) == 0
            loss.backward()
        grads.append(_grads(model))
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


def _launches(model: nn.Module, x: torch.Tensor, **options: bool) -> int:
    with fastpath.fastpath_options(**options), torch.autocast("cpu", torch.bfloat16):
        model(x).float().sum().backward()  # the first step builds the group and caches
        with LaunchCounter() as launches:
            model(x).float().sum().backward()
    return sum(launches.ops.values())


def test_a_step_launches_fewer_kernels_than_peft_lora():
    """Twelve adapted Linear(64, 64) under bf16 autocast with fp32 adapters: with the factor fold, a forward +
    backward dispatches fewer kernels than PEFT LoRA's (its per-layer casts and scaling run once per group
    here), and far fewer than the per-layer path."""
    peft = pytest.importorskip("peft")

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)]).to(torch.bfloat16).requires_grad_(False)

    targets = [str(i) for i in range(12)]
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    lora = peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets), base())
    for name, param in lora.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    ours = dd.inject_delora(base(), dd.DeLoRAConfig(rank=8, lambda_init=2.0, target_modules=targets))
    lora_count = _launches(lora, x)
    factored = _launches(ours, x, fold_factors=True, stack_fold=True)
    per_layer = _launches(ours, x, fold_factors=False, stack_fold=True)
    assert factored < lora_count < per_layer, (factored, lora_count, per_layer)


def test_training_steps_leave_no_fold_node_and_free_the_model():
    """The fold's node must not outlive its step: nothing of an old step's graph stays reachable, and a
    deleted model's parameters are freed (a node keeping its own output formed a cycle nothing collected)."""
    import gc
    import weakref

    model = _net("paper", None, dtype=torch.float32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with fastpath.fastpath_options(fold_factors=True):
        for _ in range(5):
            model(torch.randn(4, 6)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    param = weakref.ref(next(p for p in model.parameters() if p.requires_grad))
    del model, opt
    gc.collect()
    assert param() is None
    assert not [o for o in gc.get_objects() if type(o).__name__ == "FoldFactorsBackward"]
