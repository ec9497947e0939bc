"""Behaviour of DeLoRA layers and the model-level API on real modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import delora_diffusion as dd
from delora_diffusion import fastpath, functional


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.SiLU(),
        nn.Linear(16, 5),
    )


ALL = ["0", "2", "5", "7"]


def perturb(model: nn.Module, seed: int = 0, adapter_name: str | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, a in dd.iter_delora_layers(model, adapter_name):
            a.delora_A.add_(0.5 * torch.randn(a.delora_A.shape, generator=gen))
            a.delora_B.add_(0.5 * torch.randn(a.delora_B.shape, generator=gen))


def reference_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The DeLoRA forward written naively: add every active adapter's dense dW to a copy of the weights."""
    ref = copy.deepcopy(model)
    dd.remove_delora(ref)
    layers = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer, _, adapter in dd.iter_delora_layers(model):
            if adapter.active and not layer.delora.disabled:
                delta = adapter.delta_weight().reshape(layer.weight.shape)
                layers[name].weight.add_(delta.to(layer.weight.dtype))
        return ref(x)


def test_conv_and_linear_forward_matches_dense_delta():
    model = tiny_net()
    x = torch.randn(2, 3, 8, 8)
    dd.inject_delora(model, dd.DeLoRAConfig(rank=3, lambda_init=2.0, target_modules=ALL))
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_output(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_fast_path_and_per_layer_path_agree_in_values_and_gradients(init):
    x = torch.randn(2, 3, 8, 8)
    results = []
    for enabled in (True, False):
        model = tiny_net()
        torch.manual_seed(1)
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, init=init, lambda_init=1.5, target_modules=ALL))
        perturb(model)
        dd.set_delora_scale(model, 0.7)
        with fastpath.fastpath_options(batched=enabled):
            loss = model(x).square().mean()
            loss.backward()
        grads = [p.grad.clone() for g in dd.delora_parameters(model) for p in g["params"]]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for fast, slow in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_training_steps_with_gradient_accumulation_and_the_cache():
    """Several forwards/backwards per step: cached factors must never reuse a freed graph or stale values."""
    model = tiny_net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL))
    opt = torch.optim.AdamW(dd.delora_parameters(model, lr=1e-2, lambda_lr=1e-1))
    x = torch.randn(4, 3, 8, 8)
    losses = []
    for _ in range(4):
        for chunk in x.split(2):
            loss = model(chunk).square().mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            losses.append(model(x).square().mean().item())
            # The cached (no-grad) output equals a fresh dense computation at the new parameters.
            torch.testing.assert_close(model(x), reference_output(model, x), atol=1e-5, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_only_the_new_adapter_trains_and_groups_split_lambda():
    model = tiny_net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL), "first")
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=["5", "7"]), "second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n and "delora" in n for n in trainable)
    assert len(trainable) == 3 * 2
    groups = dd.delora_parameters(model, lr=1e-3, lambda_lr=1e-2)
    assert [g["name"] for g in groups] == ["delora_AB", "delora_lambda"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert all(p.numel() == 1 for p in groups[1]["params"]) and len(groups[1]["params"]) == 2


def test_two_adapters_with_weights_apply_together():
    model = tiny_net()
    x = torch.randn(2, 3, 8, 8)
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, lambda_init=1.0, target_modules=ALL), "a")
    dd.inject_delora(model, dd.DeLoRAConfig(rank=3, lambda_init=2.0, target_modules=["5", "7"]), "b")
    perturb(model, 0, "a")
    perturb(model, 1, "b")
    dd.set_delora_adapters(model, ["a", "b"], [0.5, 1.5])
    with torch.no_grad():
        both = model(x)
        torch.testing.assert_close(both, reference_output(model, x), atol=1e-5, rtol=1e-5)
        dd.set_delora_adapters(model, "b", 1.5)
        only_b = model(x)
        assert not torch.allclose(both, only_b)
        torch.testing.assert_close(only_b, reference_output(model, x), atol=1e-5, rtol=1e-5)


def test_disable_enable_and_remove_restore_the_base_exactly():
    model = tiny_net()
    x = torch.randn(2, 3, 8, 8)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x)
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL))
    perturb(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    dd.disable_delora(model)
    assert torch.equal(model(x), base)
    dd.enable_delora(model)
    torch.testing.assert_close(model(x), adapted)
    dd.remove_delora(model)
    assert torch.equal(model(x), base)
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert all(p.requires_grad is False for p in model.parameters())  # frozen by inject, as documented


def test_scale_on_a_merged_adapter_remerges():
    model = tiny_net()
    x = torch.randn(2, 3, 8, 8)
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL))
    perturb(model)
    with torch.no_grad():
        dd.set_delora_scale(model, 0.5)
        half = model(x)
        dd.set_delora_scale(model, 1.0)
        dd.merge_delora(model)
        dd.set_delora_scale(model, 0.5)
        torch.testing.assert_close(model(x), half, atol=1e-5, rtol=1e-5)
        with dd.delora_scale(model, 0.0):
            zero = model(x)
        dd.unmerge_delora(model)
        dd.remove_delora(model)
        torch.testing.assert_close(zero, model(x), atol=1e-5, rtol=1e-5)


def test_bf16_base_under_autocast_and_fp16_base():
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_net().to(dtype)
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL))
        perturb(model)
        assert all(p.dtype == torch.float32 for g in dd.delora_parameters(model) for p in g["params"])
        x = torch.randn(2, 3, 8, 8, dtype=dtype)
        out = model(x)
        assert out.dtype == dtype
        out.float().square().mean().backward()
        assert all(
            p.grad is not None and p.grad.dtype == torch.float32
            for p in model.parameters()
            if p.requires_grad
        )
    model = tiny_net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL))
    perturb(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_output(model, x), atol=0.1, rtol=0.05)


def test_module_dropout_drops_whole_updates_only_in_training():
    model = tiny_net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, module_dropout=0.5, target_modules=["7"]))
    perturb(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.eval()
        adapted = model(x)
        dd.disable_delora(model)
        base = model(x)
        dd.enable_delora(model)
        model.train()
        outs = [model(x) for _ in range(40)]
    assert all(torch.equal(o, base) or torch.allclose(o, adapted) for o in outs)
    assert any(torch.equal(o, base) for o in outs) and any(torch.allclose(o, adapted) for o in outs)


@pytest.mark.parametrize(
    "config, error",
    [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-2), "rank must be a positive integer"),
        (dict(lambda_init=float("nan")), "lambda_init must be a finite number"),
        (dict(lambda_init=float("inf")), "lambda_init must be a finite number"),
        (dict(init="gaussian"), "init must be one of"),
        (dict(module_dropout=1.0), "module_dropout must be in"),
        (dict(rank_pattern={"5": 0}), "rank_pattern"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
    ],
)
def test_bad_config_values_are_rejected(config, error):
    with pytest.raises(ValueError, match=error):
        dd.DeLoRAConfig(**config)


def snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        repr(model),
    )


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert after[1] == before[1] and after[2] == before[2]


def test_bad_injections_leave_the_model_as_it_was():
    model = tiny_net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=["7"]), "taken")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already injected"):
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL), "taken")
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="only nn.Linear and nn.Conv2d"):
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=["5", "6"]), "new")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"matched no module of Sequential.*include: 0, 2, 5, 7"):
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=["to_q"]), "new")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="Adapter names"):
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=["5"]), "a.b")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="No DeLoRA adapter named 'nope'"):
        dd.set_delora_scale(model, 1.0, "nope")
    with pytest.raises(ValueError, match="finite"):
        dd.set_delora_scale(model, float("nan"))
    assert_unchanged(model, before)


def test_failure_half_way_through_injection_is_rolled_back(monkeypatch):
    model = tiny_net()
    before = snapshot(model)
    calls = {"n": 0}
    real_init = dd.layers.DeLoRALayer.__init__

    def failing_init(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(dd.layers.DeLoRALayer, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="out of memory"):
        dd.inject_delora(model, dd.DeLoRAConfig(rank=2, target_modules=ALL))
    assert_unchanged(model, before)
    assert not list(dd.iter_delora_layers(model))


def test_rank_and_lambda_patterns_and_excludes():
    model = tiny_net()
    config = dd.DeLoRAConfig(
        rank=2,
        lambda_init=3.0,
        target_modules=ALL,
        exclude_modules=["0"],
        rank_pattern={"7": 5},
        lambda_pattern={"5": 0.5},
    )
    dd.inject_delora(model, config)
    found = {name: (a.rank, a.delora_lambda.item()) for name, _, _, a in dd.iter_delora_layers(model)}
    assert found == {"2": (2, 3.0), "5": (2, 0.5), "7": (5, 3.0)}


def test_norm_report_respects_the_bound():
    model = tiny_net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, lambda_init=0.3, target_modules=ALL))
    perturb(model)
    rows = dd.delora_norm_report(model)
    assert len(rows) == 4
    for row in rows:
        assert 0 < row["delta_norm"] <= row["bound"] * (1 + 1e-6)
        assert row["relative_delta"] <= row["relative_bound"] * (1 + 1e-6)


def test_peft_agreement_zero_init():
    peft = pytest.importorskip("peft")
    from peft.tuners.delora.layer import DeloraLinear

    torch.manual_seed(0)
    base = nn.Linear(24, 12)
    ours = nn.Sequential(copy.deepcopy(base))
    dd.inject_delora(ours, dd.DeLoRAConfig(rank=4, lambda_init=7.0, init="zero", target_modules=["0"]))
    (_, _, _, adapter) = next(dd.iter_delora_layers(ours))
    theirs = DeloraLinear(
        copy.deepcopy(base), "default", peft.DeloraConfig(r=4, delora_lambda=7), r=4, delora_lambda=7
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        A, B = torch.randn(4, 24, generator=gen), torch.randn(12, 4, generator=gen)
        for target in (adapter, theirs):
            a = target.delora_A if target is adapter else target.delora_A["default"]
            b = target.delora_B if target is adapter else target.delora_B["default"]
            a.copy_(A)
            b.copy_(B)
        lam = torch.tensor([2.5])
        adapter.delora_lambda.copy_(lam)
        theirs.delora_lambda["default"].copy_(lam)
    torch.testing.assert_close(adapter.delora_w_norm, theirs.delora_w_norm["default"])
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.delta_weight(), theirs.get_delta_weight("default"), atol=1e-5, rtol=0)
    # B = 0 (PEFT's init) is well defined: the clamp keeps it finite, and the update is exactly zero.
    with torch.no_grad():
        adapter.delora_B.zero_()
    assert torch.equal(ours(x), base(x))


def test_functional_bound_helper():
    w = torch.tensor([1.0, 3.0, 2.0])
    assert functional.norm_bound(-2.0, w, paper_init=False).item() == 6.0
    assert functional.norm_bound(2.0, w, paper_init=True).item() == 12.0


@pytest.mark.parametrize("grad", [False, True])
def test_a_model_on_the_meta_device_runs_its_forward(grad):
    """Shape-only runs (accelerate's init_empty_weights, launch counting) build models on meta; the update
    must not ask torch about autocast there, which raises for devices without it."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 8))
        dd.inject_delora(net, dd.DeLoRAConfig(rank=2, lambda_init=1.0, target_modules=["0"]))
        with torch.set_grad_enabled(grad):
            y = net(torch.empty(3, 8))
    assert y.device.type == "meta" and y.shape == (3, 8)
