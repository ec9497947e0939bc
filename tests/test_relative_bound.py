"""The relative bound rho: |dW|_F <= rho |W|_F on every layer, at every step of aggressive training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import delora_diffusion as dd
from delora_diffusion import fastpath, functional


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.SiLU(),
        nn.Linear(64, 5),
    )


TARGETS = ["0", "2", "5", "7"]


def relative_deltas(model: nn.Module) -> list[float]:
    return [row["relative_delta"] for row in dd.delora_norm_report(model)]


def unit_columns(model: nn.Module) -> nn.Module:
    """Every column of every weight scaled to norm 1: then a rank-1 update reaches the bound exactly, so a
    lambda beyond its limit shows up as an update beyond rho |W|."""
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                flat = layer.weight.reshape(layer.weight.shape[0], -1)
                flat /= flat.norm(dim=0, keepdim=True)
    return model


def raw_relative_delta(a: dd.layers.DeLoRALayer) -> float:
    """|dW|/|W| at the optimizer's lambda, before any projection (what a missing bound would use)."""
    A0, B0 = a.frozen_pair
    delta = functional.delta_weight(
        a.delora_A, a.delora_B, a.delora_lambda, a.delora_w_norm, a.rank, 1.0, A0, B0
    )
    return (delta.norm() / a.delora_w_norm.norm()).item()


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("init", ["paper", "zero"])
def test_bound_holds_at_every_step_of_aggressive_training(init, batched):
    """lr 1.0 on A/B and 10.0 on lambda: the optimizer takes lambda (and so the raw update) beyond rho |W|
    again and again, yet every forward, every report and every saved lambda stay inside, on Linear and
    Conv2d layers alike."""
    rho = 0.05
    model = unit_columns(net())
    dd.inject_delora(model, dd.DeLoRAConfig(rank=1, init=init, relative_bound=rho, target_modules=TARGETS))
    opt = torch.optim.SGD(dd.delora_parameters(model, lr=1.0, lambda_lr=10.0))
    x = torch.randn(8, 3, 8, 8)
    target = 10 * torch.randn(8, 5)  # far from the base output: only a large dW gets near it
    raw_beyond = 0
    with fastpath.fastpath_options(batched=batched):
        for _ in range(15):
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            layers = [a for *_, a in dd.iter_delora_layers(model)]
            with torch.no_grad():
                raw_beyond += sum(raw_relative_delta(a) > rho * (1 + 1e-4) for a in layers)
            for value in relative_deltas(model):  # what the next forward and any save use
                assert value <= rho * (1 + 1e-5)
            for a in layers:
                assert abs(a.file_tensors()["delora_lambda"].item()) <= a.lambda_max * (1 + 1e-6)
    assert raw_beyond > 0, "the optimizer never left the bound: this test would not catch a missing bound"
    assert max(relative_deltas(model)) > 0.5 * rho  # and the bound is reached, not vacuous


def test_the_forward_uses_the_bounded_update():
    """After an optimizer step pushed lambda out, the output equals base + dW at the projected lambda."""
    model = net()
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, relative_bound=0.1, target_modules=TARGETS))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for *_, a in dd.iter_delora_layers(model):
            a.delora_A.add_(torch.randn_like(a.delora_A))
            a.delora_lambda.mul_(100.0)  # far outside the bound, as a huge step would leave it
    ref = net()
    layers = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer, _, a in dd.iter_delora_layers(model):
            layers[name].weight.add_(a.delta_weight().reshape(layer.weight.shape))
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_lambda_starts_at_each_layers_limit_and_the_limit_is_relative():
    model = net()
    rho = 0.2
    dd.inject_delora(model, dd.DeLoRAConfig(rank=2, init="zero", relative_bound=rho, target_modules=TARGETS))
    for name, layer, _, a in dd.iter_delora_layers(model):
        w = functional.column_norms(layer.weight)
        assert a.lambda_max == pytest.approx(rho * w.norm().item() / w.max().item(), rel=1e-6)
        assert a.delora_lambda.item() == pytest.approx(a.lambda_max, rel=1e-6)
        bound = functional.norm_bound(a.delora_lambda, w, paper_init=False).item()
        assert bound / layer.weight.norm().item() == pytest.approx(rho, rel=1e-5), name


def test_relative_bound_pattern_sets_rho_per_layer():
    model = net()
    config = dd.DeLoRAConfig(
        rank=2, relative_bound=0.1, relative_bound_pattern={"7": 0.01}, target_modules=TARGETS
    )
    dd.inject_delora(model, config)
    rhos = {name: a.relative_bound for name, _, _, a in dd.iter_delora_layers(model)}
    assert rhos == {"0": 0.1, "2": 0.1, "5": 0.1, "7": 0.01}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"relative_bound": 0.1, "lambda_init": 2.0}, "mutually exclusive"),
        ({"relative_bound": 0.1, "lambda_pattern": {"7": 1.0}}, "mutually exclusive"),
        ({"relative_bound": 0.0}, "relative_bound must be a number in"),
        ({"relative_bound": float("nan")}, "relative_bound must be a number in"),
        ({"relative_bound": 1e6}, "relative_bound must be a number in"),
        ({"relative_bound_pattern": {"7": 0.1}}, "needs a default relative_bound"),
    ],
)
def test_bad_relative_bound_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dd.DeLoRAConfig(**kwargs)


def test_config_round_trip_and_old_configs():
    config = dd.DeLoRAConfig(rank=2, relative_bound=0.05)
    assert dd.DeLoRAConfig.from_dict(config.to_dict()) == config
    old = {"rank": 4, "lambda_init": 15.0, "init": "paper", "target_modules": None}  # a file from before rho
    assert dd.DeLoRAConfig.from_dict(old).relative_bound is None
    assert dd.DeLoRAConfig().lambda_init == 15.0


def test_rho_is_recorded_in_the_file_and_comes_back_per_layer(tmp_path, pipeline_dir, capsys):
    """Save -> load keeps each layer's rho (set per layer by a pattern) and the images; `inspect` and the
    app's info panel show rho and each layer's actual |dW|/|W|."""
    import tiny_pipelines as tp
    from conftest import make_nontrivial, max_diff

    from delora_diffusion import cli
    from delora_diffusion.app.info import format_adapter_info

    pipe = tp.load_pipeline(pipeline_dir("sd"))
    config = dd.DeLoRAConfig(rank=2, relative_bound=0.1, relative_bound_pattern={"to_v": 0.02})
    dd.inject_delora(pipe.unet, config)
    make_nontrivial(pipe.unet)
    pipe.unet.eval()
    saved_rhos = {n: a.relative_bound for n, _, _, a in dd.iter_delora_layers(pipe.unet)}
    assert set(saved_rhos.values()) == {0.1, 0.02}
    images = tp.run(pipe, "sd")
    pipe.save_delora_weights(tmp_path)

    fresh = tp.load_pipeline(pipeline_dir("sd"))
    fresh.load_delora_weights(tmp_path)
    assert {n: a.relative_bound for n, _, _, a in dd.iter_delora_layers(fresh.unet)} == saved_rhos
    assert max_diff(tp.run(fresh, "sd"), images) < 1e-6
    rows = fresh.delora_report()
    assert all(r["relative_delta"] <= r["rho"] * (1 + 1e-5) for r in rows)

    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "relative bound rho 0.1" in out and " 0.02 " in out
    panel = format_adapter_info("mine", 1.0, 1.0, rows, fresh.get_delora_metadata())
    assert "relative bound ρ" in panel and "0.02, 0.1" in panel
