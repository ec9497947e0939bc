"""Review of the scales-only fast path: cache reuse across grad modes, lambda's projection, module dropout
under gradient checkpointing. Each against plain autograd through functional.delta_weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import delora_diffusion as dd
from delora_diffusion import fastpath, functional

X = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


class _Blocks(nn.Module):
    """Two adapted Linears; with `checkpointed`, each block is recomputed in backward (non-reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 5)
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            h = checkpoint(self.first, x, use_reentrant=False)
            return checkpoint(lambda t: self.second(torch.nn.functional.silu(t)), h, use_reentrant=False)
        return self.second(torch.nn.functional.silu(self.first(x)))


def _net(init: str = "paper", rho: float | None = None, dropout: float = 0.0) -> _Blocks:
    torch.manual_seed(0)
    model = _Blocks()
    kwargs = {"relative_bound": rho} if rho else {"lambda_init": 1.5}
    config = dd.DeLoRAConfig(
        rank=3, init=init, target_modules=["first", "second"], module_dropout=dropout, **kwargs
    )
    dd.inject_delora(model, config).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for *_, a in dd.iter_delora_layers(model):
            a.delora_A.add_(torch.randn(a.delora_A.shape, generator=gen, dtype=torch.float64))
            a.delora_B.add_(torch.randn(a.delora_B.shape, generator=gen, dtype=torch.float64))
    return model


def _reference(model: _Blocks, x: torch.Tensor, keep: tuple[bool, bool] = (True, True)) -> torch.Tensor:
    """The model's output through the dense dW (autograd all the way), adapters `keep`-ed or dropped; lambda
    projected onto its bound first (once per model, as the fast path does once per step)."""
    for *_, a in dd.iter_delora_layers(model):
        if a.delora_lambda.abs().item() > (a.lambda_max or float("inf")):
            a.project_lambda()
    out = x
    for i, (base, on) in enumerate(zip((model.first, model.second), keep, strict=True)):
        a = base.delora["default"]
        A0, B0 = a.frozen_pair
        dW = functional.delta_weight(
            a.delora_A, a.delora_B, a.bounded_lambda(), a.delora_w_norm, a.rank, a.effective_scale, A0, B0
        )
        out = torch.nn.functional.silu(out) if i else out
        out = torch.nn.functional.linear(out, base.weight + dW * on, base.bias)
    return out


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("init", ["paper", "zero"])
def test_training_right_after_an_eval_forward_gets_the_full_gradients(batched, mode, init):
    """step -> validation (no grad) -> next step's forward, with nothing written in between: the scales
    cached by the validation must not be reused (batched=False reused them: lambda got no gradient, A and B
    missed their share through the norms), and ones made in inference_mode cannot be saved for backward."""
    model = _net(init)
    with fastpath.fastpath_options(batched=batched):
        with getattr(torch, mode)():
            model(X)
        model(X).square().sum().backward()
    ref = _net(init)
    _reference(ref, X).square().sum().backward()
    for got, want in zip(_grads(model), _grads(ref), strict=True):
        assert got is not None
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batched", [True, False])
def test_a_frozen_adapter_passes_input_gradients_after_an_inference_mode_forward(batched):
    """A frozen adapter (textual inversion through it, a second adapter trained beside it): its cached
    scales from inference_mode, and the paper init's group constants, must not reach autograd."""
    model = _net("paper").requires_grad_(False)
    with fastpath.fastpath_options(batched=batched):
        with torch.inference_mode():
            model(X)
        x = X.clone().requires_grad_()
        model(x).square().sum().backward()
    ref_x = X.clone().requires_grad_()
    _reference(_net("paper").requires_grad_(False), ref_x).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("init", ["paper", "zero"])
def test_two_forwards_then_one_backward_with_a_relative_bound(batched, init):
    """The second forward's projection used to clamp lambda in place again (already inside its bound), which
    moved its version under the first forward's graph: autograd refused the backward."""
    model = _net(init, rho=0.05)
    with torch.no_grad():  # beyond the bound, as after an optimizer step
        for *_, a in dd.iter_delora_layers(model):
            a.delora_lambda.fill_(3 * a.lambda_max)
    with fastpath.fastpath_options(batched=batched):
        (model(X).square().sum() + model(2 * X).square().sum()).backward()
    ref = _net(init, rho=0.05)
    with torch.no_grad():
        for *_, a in dd.iter_delora_layers(ref):
            a.delora_lambda.fill_(3 * a.lambda_max)
    (_reference(ref, X).square().sum() + _reference(ref, 2 * X).square().sum()).backward()
    for got, want in zip(_grads(model), _grads(ref), strict=True):
        torch.testing.assert_close(got, want)
    assert all(a.delora_lambda.item() == a.lambda_max for *_, a in dd.iter_delora_layers(model))


@pytest.mark.parametrize("seed", range(6))
def test_module_dropout_under_gradient_checkpointing_drops_the_same_adapters_in_the_recompute(seed):
    """Non-reentrant checkpointing runs each block's forward again in backward; with Python's `random` the
    recompute drew other layers to drop (a CheckpointError, or silently wrong gradients)."""
    model = _net("paper", dropout=0.5).train()
    model.checkpointed = True
    x = X.clone().requires_grad_()
    torch.manual_seed(seed)
    model(x).square().sum().backward()
    plain = _net("paper", dropout=0.5).train()
    torch.manual_seed(seed)  # the same draws, in the same order: which adapters ran
    ran = [torch.rand(()).item() >= 0.5 for _ in range(2)]
    ref_x = X.clone().requires_grad_()
    _reference(plain, ref_x, keep=tuple(ran)).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    for got, want in zip(_grads(model), _grads(plain), strict=True):  # a dropped adapter: None vs zeros
        torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("init", ["paper", "zero"])
def test_gradient_accumulation_through_a_submodule_called_on_its_own(compiled, init):
    """Accumulating gradients over the model, then over one of its submodules (no refresh runs before it):
    the submodule used to reuse the scales the model's forward cached, whose graph that forward's backward had
    freed ("Trying to backward through the graph a second time")."""
    model = _net(init)
    first = torch.compile(model.first, backend="eager") if compiled else model.first
    run = torch.compile(model, backend="eager") if compiled else model
    run(X).square().sum().backward()
    first(X).square().sum().backward()
    ref = _net(init)
    _reference(ref, X).square().sum().backward()
    a = ref.first.delora["default"]
    dW = functional.delta_weight(
        a.delora_A, a.delora_B, a.bounded_lambda(), a.delora_w_norm, a.rank, 1.0, *a.frozen_pair
    )
    torch.nn.functional.linear(X, ref.first.weight + dW, ref.first.bias).square().sum().backward()
    for got, want in zip(_grads(model), _grads(ref), strict=True):
        torch.testing.assert_close(got, want)


class _SameShape(nn.Module):
    """Two same-shape adapted Linears (one fold group), the first recomputed by reentrant checkpointing
    (transformers' default for its encoders)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.first, x, use_reentrant=True)
        return self.second(torch.nn.functional.silu(h))


@pytest.mark.parametrize("init", ["paper", "zero"])
def test_reentrant_checkpointing_beside_a_layer_of_the_same_fold_group(init):
    """The recompute inside backward reused the step's cached scales, so its inner backward ran through the
    group's shared fold node and freed it; the outer backward then reached it again ("Trying to backward
    through the graph a second time"). A forward inside backward now folds its own scales."""

    def make() -> _SameShape:
        torch.manual_seed(0)
        model = _SameShape()
        config = dd.DeLoRAConfig(rank=2, init=init, lambda_init=1.5, target_modules=["first", "second"])
        dd.inject_delora(model, config).double()
        with torch.no_grad():
            for *_, a in dd.iter_delora_layers(model):
                a.delora_B.add_(0.3)
        return model

    x = X.clone().requires_grad_()
    model = make()
    model(x).square().sum().backward()
    ref, ref_x = make(), X.clone().requires_grad_()
    out = ref_x
    for i, base in enumerate((ref.first, ref.second)):
        a = base.delora["default"]
        dW = functional.delta_weight(
            a.delora_A, a.delora_B, a.bounded_lambda(), a.delora_w_norm, a.rank, 1.0, *a.frozen_pair
        )
        out = torch.nn.functional.linear(
            torch.nn.functional.silu(out) if i else out, base.weight + dW, base.bias
        )
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    for got, want in zip(_grads(model), _grads(ref), strict=True):
        torch.testing.assert_close(got, want)


def test_a_parameter_stepped_between_forward_and_backward_is_refused():
    """The fold keeps its tensors as attributes (reentrant checkpointing runs through it twice), so it checks
    the parameters' versions itself, as saved tensors would."""
    model = _net("zero")
    loss = model(X).square().sum()
    with torch.no_grad():
        model.first.delora["default"].delora_lambda.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()
