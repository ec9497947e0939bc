"""The training script's AdamW (torch's fused kernel where every parameter has one, the default otherwise), and
optimizers that write parameters without moving their version counters, which the fast path keys on."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import delora_diffusion as dd
from delora_diffusion import fastpath
from delora_diffusion.training import loop
from delora_diffusion.training.args import parse_args

try:  # torch has fused AdamW on a CPU from 2.4 (pyproject allows 2.3)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    CPU_FUSED = "cpu" in _get_fused_kernels_supported_devices()
except ImportError:
    CPU_FUSED = False
needs_cpu_fused = pytest.mark.skipif(not CPU_FUSED, reason="this torch has no fused AdamW on a CPU")


def _adapted() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).requires_grad_(False)
    return dd.inject_delora(model, dd.DeLoRAConfig(rank=4, target_modules=["0", "2"]))


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 5) -> None:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@needs_cpu_fused
def test_the_scripts_adamw_is_fused_on_a_cpu_and_keeps_its_groups():
    args = parse_args(["--adam_weight_decay", "0.1", "--delora_lambda_lr", "3e-3"])
    model = _adapted()
    family = types.SimpleNamespace(denoiser="unet")
    opt = loop.make_optimizer(args, family, {"unet": model})
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["delora_lambda"]["lr"] == 3e-3 and by_name["delora_lambda"]["weight_decay"] == 0.0
    assert {g["weight_decay"] for n, g in by_name.items() if n != "delora_lambda"} == {0.1}


@needs_cpu_fused
def test_fused_and_the_plain_loop_take_the_same_steps():
    fused_model, plain_model = _adapted(), _adapted()
    groups = lambda m: [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": 0.1}]  # noqa: E731
    fused = loop.fused_adamw(groups(fused_model), lr=1e-2)
    plain = torch.optim.AdamW(groups(plain_model), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    _train(fused, fused_model)
    _train(plain, plain_model)
    for (name, a), b in zip(fused_model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(fused_model.state_dict().values(), _adapted().state_dict().values())
    )  # the steps moved something


def test_without_a_fused_kernel_it_takes_torchs_default_with_the_same_groups():
    on_meta = nn.Parameter(torch.empty(3, device="meta"))  # no fused kernel for the meta device
    complex_ = nn.Parameter(torch.zeros(3, dtype=torch.complex64))  # nor for complex numbers
    for param in (on_meta, complex_):
        opt = loop.fused_adamw([{"params": [param], "lr": 5e-4, "name": "x"}], betas=(0.8, 0.9))
        assert not opt.defaults["fused"]
        assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[0]["betas"] == (0.8, 0.9)


@needs_cpu_fused
def test_a_fused_step_moves_the_version_counters_the_fast_path_reads():
    """torch's fused kernel leaves version counters alone; the fast path's caches, lambda's projection into its
    relative bound and the fold's in-place check all key on them (a two-process run saved a lambda the
    projection had skipped)."""
    model = _adapted()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.fused_adamw([{"params": params}], lr=1e-2)
    model(torch.randn(4, 16)).square().mean().backward()
    before = [p._version for p in params]
    opt.step()
    assert all(p._version > v for p, v in zip(params, before, strict=True))


@needs_cpu_fused
def test_lambda_stays_inside_its_relative_bound_under_the_fused_step():
    from delora_diffusion.fastpath import project_lambdas

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).requires_grad_(False)
    dd.inject_delora(model, dd.DeLoRAConfig(rank=4, target_modules=["0", "2"], relative_bound=0.3))
    layers = [a for *_, a in dd.iter_delora_layers(model)]
    opt = loop.fused_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=0.5)
    x = torch.randn(32, 16)
    for _ in range(3):
        (-model(x).square().mean()).backward()  # pushes every lambda outward, past its limit
        opt.step()
        project_lambdas(layers)
        opt.zero_grad()
        for a in layers:
            assert abs(a.delora_lambda.item()) <= a.lambda_max + 1e-6


class DataSGD(torch.optim.Optimizer):
    """Writes through ``p.data``, as prodigyopt and bitsandbytes do: no version counter moves."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@needs_cpu_fused
@pytest.mark.parametrize("make", ["fused AdamW", "p.data writer"])
def test_a_no_grad_forward_after_a_step_sees_the_new_weights(make):
    """Validation between backward and the step caches no-grad scales; after a step of an optimizer that leaves
    version counters alone, the next no-grad forward reused them (images from the weights of before)."""
    model = _adapted()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, fused=True) if make == "fused AdamW" else DataSGD(params, lr=0.5)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        model(x).square().mean().backward()
        with torch.no_grad():
            model(x)  # validation before the step: caches the scales
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            seen = model(x)
            for *_, a in dd.iter_delora_layers(model):
                fastpath.clear_cache(a)
            assert torch.equal(seen, model(x))


@needs_cpu_fused
@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_resumed_optimizer_keeps_this_runs_fused_setting(saved_fused):
    """load_state_dict restores each group's 'fused' from the checkpoint; the run's own choice must win."""
    model = _adapted()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = torch.optim.AdamW(params, lr=1e-2, fused=saved_fused or None)
    _train(saved, model, steps=2)
    for wanted in (True, None):
        opt = torch.optim.AdamW(params, lr=1e-2, fused=wanted)
        opt.load_state_dict(copy.deepcopy(saved.state_dict()))
        loop.keep_fused_setting(opt)
        assert all(g["fused"] == wanted for g in opt.param_groups)
        _train(opt, model, steps=1)  # steps with this setting: step counts where it keeps them
        assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_fp16_training_keeps_the_unfused_optimizer():
    """A fused step hides GradScaler's skipped steps from accelerate (its LR schedule would advance past them)."""
    args = parse_args(["--mixed_precision", "fp16"])
    opt = loop.make_optimizer(args, types.SimpleNamespace(denoiser="unet"), {"unet": _adapted()})
    assert not opt.defaults["fused"]
