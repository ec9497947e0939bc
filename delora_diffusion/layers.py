"""DeLoRA adapters attached to a frozen nn.Linear / nn.Conv2d.

The frozen layer stays where it is, with its own class and parameter names, so diffusers, PEFT (diffusers'
own LoRA) and savers keep seeing a plain layer. A child ``delora`` (:class:`DeLoRAAdapters`, one entry per
named adapter) holds the adapter parameters, and a forward hook adds their update to the layer's output:

    y = layer(x) + sum over active adapters of  x @ A'^T @ B'^T

``A'`` and ``B'`` are the folded factors (see :mod:`delora_diffusion.functional`). They are cached per adapter;
:mod:`delora_diffusion.fastpath` fills the caches for a whole model in a few batched ops before each forward.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from . import functional

ADAPTABLE = (nn.Linear, nn.Conv2d)


class DeLoRAAdapter(nn.Module):
    """One named adapter on one layer: trainable A (r x in), B (out x r), lambda; frozen w (and A0, B0)."""

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        lambda_init: float,
        init: str = "paper",
        module_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        weight = base.weight
        out_features, in_features = weight.shape[0], weight[0].numel()
        kwargs = {"device": weight.device, "dtype": dtype}
        self.rank = rank
        self.init = init
        self.module_dropout = module_dropout
        self.delora_A = nn.Parameter(torch.empty(rank, in_features, **kwargs))
        self.delora_B = nn.Parameter(torch.empty(out_features, rank, **kwargs))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(lambda_init), **kwargs))
        self.register_buffer("delora_w_norm", functional.column_norms(weight).to(dtype))
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if init == "zero":
            nn.init.zeros_(self.delora_B)
        else:
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
            self.register_buffer("delora_A0", self.delora_A.detach().clone())
            self.register_buffer("delora_B0", self.delora_B.detach().clone())
        # Run-time state, not saved: the lambda scale (slider), the adapter weight (set_adapters), on/off.
        self.lambda_scale = 1.0
        self.adapter_weight = 1.0
        self.active = True
        self.merged = False
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache_stamp: tuple | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the factor cache behind (it may hold a training graph)."""
        state = self.__dict__.copy()
        state["_cache"] = state["_cache_stamp"] = None
        return state

    @property
    def frozen_pair(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return getattr(self, "delora_A0", None), getattr(self, "delora_B0", None)

    @property
    def multiplier(self) -> float:
        return self.lambda_scale * self.adapter_weight

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """dW (out x in, fp32) at the current lambda times `multiplier` (default: scale * weight)."""
        A0, B0 = self.frozen_pair
        mult = self.multiplier if multiplier is None else multiplier
        return functional.delta_weight(
            self.delora_A.float(),
            self.delora_B.float(),
            self.delora_lambda.float(),
            self.delora_w_norm.float(),
            self.rank,
            mult,
            None if A0 is None else A0.float(),
            None if B0 is None else B0.float(),
        )

    # --- factor cache -------------------------------------------------------------------------------------
    def stamp(self, dtype: torch.dtype) -> tuple:
        """Everything the folded factors depend on; in-place optimizer steps bump the parameter versions.

        The frozen buffers enter through their summed versions (counters only grow, so any in-place write,
        e.g. ``load_state_dict``, changes the sum) and w's storage. Reads go through ``_parameters`` /
        ``_buffers`` directly: this runs for every layer on every forward.
        """
        params, buffers = self._parameters, self._buffers
        A, B, lam, w = (
            params["delora_A"],
            params["delora_B"],
            params["delora_lambda"],
            buffers["delora_w_norm"],
        )
        frozen = sum(t._version for t in buffers.values() if t is not None)
        return (
            A._version,
            B._version,
            lam._version,
            A.data_ptr(),
            B.data_ptr(),
            w.data_ptr(),
            frozen,
            self.multiplier,
            dtype,
        )

    def set_cache(self, A_folded: torch.Tensor, B_folded: torch.Tensor, stamp: tuple) -> None:
        # Plain attributes: written straight into __dict__, skipping nn.Module.__setattr__'s checks.
        self.__dict__["_cache"] = (A_folded, B_folded)
        self.__dict__["_cache_stamp"] = stamp

    def cache_is_fresh(self, dtype: torch.dtype) -> bool:
        return self._cache is not None and self._cache_stamp == self.stamp(dtype)

    def compute_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-layer fold (used when the batched refresh did not run, e.g. sharded or called directly)."""
        A0, B0 = self.frozen_pair
        A_f, B_f = functional.fold_factors(
            self.delora_A,
            self.delora_B,
            self.delora_lambda,
            self.delora_w_norm,
            self.rank,
            self.multiplier,
            A0,
            B0,
        )
        return A_f.to(dtype), B_f.to(dtype)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded (A', B') in `dtype`: the cached pair when still valid, else computed here.

        When training, a pair computed here is not cached: the next forward may follow a backward that freed
        its graph. The model-level refresh (fastpath) owns caching while gradients flow.
        """
        if self.cache_is_fresh(dtype):
            return self._cache  # type: ignore[return-value]
        factors = self.compute_factors(dtype)
        if not (torch.is_grad_enabled() and self.delora_A.requires_grad):
            self.set_cache(*factors, self.stamp(dtype))
        return factors

    def clear_cache(self) -> None:
        self.__dict__["_cache"] = self.__dict__["_cache_stamp"] = None

    def contributes(self) -> bool:
        return self.active and not self.merged and self.multiplier != 0.0

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, init={self.init}, in={self.delora_A.shape[1]}, out={self.delora_B.shape[0]}"
        )


class DeLoRAAdapters(nn.ModuleDict):
    """The named adapters of one layer; ``disabled`` switches all of them off at once."""

    def __init__(self) -> None:
        super().__init__()
        self.disabled = False


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the update's matmuls run in: autocast's when active, else the frozen weight's."""
    weight = base._parameters["weight"]
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


RECOMPUTE_HIDDEN = True
"""Linear layers: recompute the T x r hidden in backward instead of keeping it (see :class:`_LowRankLinear`)."""


class _LowRankLinear(torch.autograd.Function):
    """``x A'^T B'^T`` that keeps only x (which the layer's input holds anyway) and the small factors.

    Autograd's two linears would also keep the hidden ``x A'^T`` (T x r; T x 2r for the paper init), a sizable
    activation when r is not tiny against the layer width. Backward recomputes it with one skinny matmul,
    so the update adds no activation memory of its own: less than LoRA, which keeps its hidden.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A_f: torch.Tensor, B_f: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, A_f, B_f)
        return F.linear(F.linear(x, A_f), B_f)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, A_f, B_f = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_hidden = grad2 @ B_f  # (T, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ A_f).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_A = grad_hidden.t() @ x2
        if ctx.needs_input_grad[2]:
            grad_B = grad2.t() @ (x2 @ A_f.t())
        return grad_x, grad_A, grad_B


def apply_update(base: nn.Module, x: torch.Tensor, A_f: torch.Tensor, B_f: torch.Tensor) -> torch.Tensor:
    """x -> x A'^T B'^T, LoRA's two skinny matmuls (two convs for a Conv2d: kxk into rank, then 1x1 out)."""
    if isinstance(base, nn.Conv2d):
        down = A_f.reshape(A_f.shape[0], *base.weight.shape[1:])
        hidden = base._conv_forward(x, down, None)
        return F.conv2d(hidden, B_f[:, :, None, None])
    if (
        RECOMPUTE_HIDDEN
        and torch.is_grad_enabled()
        and x.dtype == A_f.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _LowRankLinear.apply(x, A_f, B_f)
    return F.linear(F.linear(x, A_f), B_f)


def delora_forward_hook(base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    adapters: DeLoRAAdapters = base._modules["delora"]
    if adapters.disabled:
        return output
    x = args[0]
    dtype = None
    for adapter in adapters._modules.values():
        if not adapter.contributes():
            continue
        if adapter.training and adapter.module_dropout > 0 and random.random() < adapter.module_dropout:
            continue
        dtype = dtype or compute_dtype(base)
        A_f, B_f = adapter.factors(dtype)
        output = output + apply_update(base, x, A_f, B_f).to(output.dtype)
    return output


def attach(base: nn.Module) -> DeLoRAAdapters:
    """Give `base` its adapter container and the forward hook (once)."""
    adapters = base._modules.get("delora")
    if adapters is None:
        adapters = DeLoRAAdapters()
        base.add_module("delora", adapters)
        base._delora_hook = base.register_forward_hook(delora_forward_hook)
    return adapters


def detach(base: nn.Module) -> None:
    """Remove the container and hook from `base` (after its last adapter is gone)."""
    base._delora_hook.remove()
    del base._delora_hook
    del base._modules["delora"]


def merge_adapter(base: nn.Module, adapter: DeLoRAAdapter) -> None:
    """Add dW into the frozen weight (in its dtype); the hook then skips this adapter."""
    if adapter.merged:
        return
    with torch.no_grad():
        delta = adapter.delta_weight().reshape(base.weight.shape)
        merged = base.weight.float() + delta
        if not torch.isfinite(merged).all():
            raise ValueError(
                "Merging this DeLoRA adapter produces non-finite weights; the adapter is broken."
            )
        base.weight.copy_(merged.to(base.weight.dtype))
    adapter.merged = True


def unmerge_adapter(base: nn.Module, adapter: DeLoRAAdapter) -> None:
    if not adapter.merged:
        return
    with torch.no_grad():
        delta = adapter.delta_weight().reshape(base.weight.shape)
        base.weight.copy_((base.weight.float() - delta).to(base.weight.dtype))
    adapter.merged = False
