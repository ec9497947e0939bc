"""torch.compile with unfused adapters: no graph breaks, no recompiles on a scale change, eager's numbers.

CPU only, so the ``eager`` and ``aot_eager`` backends (inductor takes minutes to compile here); graph breaks
and recompiles are decided by dynamo before any backend runs, so they are the same on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import delora_diffusion as dd
from delora_diffusion import fastpath


class _Net(nn.Module):
    """A Conv2d feeding Linears, the two layer kinds DeLoRA adapts (a UNet's resnet conv and attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.out = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)
        return self.out(torch.tanh(self.q(h)) * self.k(h))


def _adapted(init: str, **config) -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    config.setdefault("lambda_init", 3.0)
    dd.inject_delora(
        net, dd.DeLoRAConfig(rank=2, init=init, target_modules=["conv", "q", "k", "out"], **config)
    )
    with torch.no_grad():  # a trained-looking adapter: B != 0 (zero init), B != B0 (paper init)
        for _, _, _, a in dd.iter_delora_layers(net):
            a.delora_B.add_(0.3 * torch.randn(a.delora_B.shape))
    return net


class _CountingBackend:
    """Counts the graphs dynamo hands over, then runs them with the named backend."""

    def __init__(self, backend: str) -> None:
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return self.backend(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


X = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("train", [False, True])
def test_no_graph_breaks(init, train):
    """One graph for the whole forward, with and without gradients (explain's count and its reasons)."""
    net = _adapted(init).train(train)
    with torch.set_grad_enabled(train):
        explanation = torch._dynamo.explain(net)(X)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("init", ["paper", "zero"])
@pytest.mark.parametrize("factors", [False, True])
def test_training_steps_match_eager_and_scale_changes_do_not_recompile(backend, init, factors):
    """Forward, backward and optimizer steps compiled == eager; set_delora_scale adds no graph. With the
    factor fold (accelerators' default) the Linear layers read the handed factors as plain inputs."""
    with fastpath.fastpath_options(fold_factors=factors):
        _compiled_training_steps(backend, init, factors)


def _compiled_training_steps(backend: str, init: str, factors: bool) -> None:
    eager_net = _adapted(init).train()
    compiled_net = copy.deepcopy(eager_net)
    counting = _CountingBackend(backend)
    compiled = torch.compile(compiled_net, backend=counting)
    optimizers = [
        torch.optim.SGD([p for p in n.parameters() if p.requires_grad], lr=0.1)
        for n in (eager_net, compiled_net)
    ]
    for scale in [1.0, 1.0, 0.5, 2.0]:
        for net in (eager_net, compiled_net):
            dd.set_delora_scale(net, scale)
        outputs = [eager_net(X), compiled(X)]
        handed = [a.__dict__.get("_compiled_factors") for *_, a in dd.iter_delora_layers(compiled_net)]
        assert sum(h is not None for h in handed) == (3 if factors else 0)  # q, k, out; the conv: scales
        for out in outputs:
            out.square().mean().backward()
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(_grads(compiled_net), _grads(eager_net), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert counting.graphs == 1
    assert not counters["graph_break"] and not counters["recompiles"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inference_scale_changes_do_not_recompile(backend):
    net = _adapted("paper").eval()
    counting = _CountingBackend(backend)
    compiled = torch.compile(net, backend=counting)
    with torch.no_grad():
        for scale in [1.0, 0.25, 0.0, 1.5]:
            dd.set_delora_scale(net, scale)
            got = compiled(X)
            torch.testing.assert_close(got, net(X))
    assert counting.graphs == 1 and not counters["graph_break"]


def test_without_the_batched_refresh_layers_fold_in_the_graph():
    """fastpath_options(batched=False): each layer folds from tensors in the graph (scale, bound limits)."""
    net = _adapted("paper", lambda_init=None, relative_bound=0.05).train()
    reference = copy.deepcopy(net)
    with torch.no_grad():  # lambda beyond its bound, as after an optimizer step: both paths project it back
        for n in (net, reference):
            for _, _, _, a in dd.iter_delora_layers(n):
                a.delora_lambda.mul_(3.0)
    counting = _CountingBackend("aot_eager")
    compiled = torch.compile(net, backend=counting)
    with fastpath.fastpath_options(batched=False):
        for scale in [1.0, 0.5]:
            dd.set_delora_scale(net, scale)
            dd.set_delora_scale(reference, scale)
            torch.testing.assert_close(compiled(X), reference(X), rtol=1e-5, atol=1e-6)
    for (_, _, _, a), (_, _, _, b) in zip(dd.iter_delora_layers(net), dd.iter_delora_layers(reference)):
        torch.testing.assert_close(a.delora_lambda, b.delora_lambda)
        assert a.delora_lambda.abs().item() <= a.lambda_max * (1 + 1e-6)
    assert counting.graphs == 1 and not counters["graph_break"]


def test_tiny_unet_training_step_is_one_graph():
    """The real model class: a UNet2DConditionModel with attention and resnet-conv adapters, compiled the
    way accelerate's --dynamo_backend does it (torch.compile of the model)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=8,
    )
    dd.inject_delora(
        unet, dd.DeLoRAConfig(rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    )
    unet.train()
    counting = _CountingBackend("eager")
    compiled = torch.compile(unet, backend=counting)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    for scale in [1.0, 0.5]:
        dd.set_delora_scale(unet, scale)
        compiled(sample, 10, text, return_dict=False)[0].square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert counting.graphs == 1 and not counters["graph_break"] and not counters["recompiles"]


def test_training_script_under_accelerate_dynamo_backend_matches_uncompiled(tmp_path):
    """`accelerate launch --dynamo_backend eager`: the script's denoiser is compiled (one traced frame, no graph
    break) and trains exactly as the uncompiled run does, step by step (tensorboard losses) and in the file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import LAUNCH, SCRIPT, common, env
    from tiny_pipelines import MAKERS

    model, images = MAKERS["sd"](tmp_path / "model"), tmp_path / "instance"
    images.mkdir()
    for i in range(2):
        pixels = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / f"{i}.png")
    runs = {}
    for backend in ("no", "eager"):
        out = tmp_path / backend
        launch = [*LAUNCH]
        launch[launch.index("--dynamo_backend") + 1] = backend
        args = [*common(model, images, out, "sd"), "--max_train_steps", "3", "--report_to", "tensorboard"]
        proc = subprocess.run(
            [*launch, str(SCRIPT), *args],
            capture_output=True,
            text=True,
            env=dict(env(), TORCH_LOGS="dynamo,graph_breaks"),
            timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-6000:]
        losses = []
        for events in out.rglob("events.out.tfevents.*"):  # one file per tracker run and writer
            accumulator = EventAccumulator(os.fspath(events))
            accumulator.Reload()
            if "loss" in accumulator.Tags()["scalars"]:
                losses += [e.value for e in accumulator.Scalars("loss")]
        runs[backend] = losses, load_file(out / "delora_weights.safetensors"), proc.stderr
    assert "torchdynamo done tracing" not in runs["no"][2]
    assert runs["eager"][2].count("torchdynamo done tracing") == 1 and "Graph break" not in runs["eager"][2]
    assert len(runs["no"][0]) == 3 and runs["eager"][0] == pytest.approx(runs["no"][0], rel=1e-5)
    for key, value in runs["no"][1].items():
        torch.testing.assert_close(runs["eager"][1][key], value, rtol=1e-4, atol=1e-5)
