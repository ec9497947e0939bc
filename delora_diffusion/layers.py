"""DeLoRA adapters attached to a frozen nn.Linear / nn.Conv2d.

The frozen layer stays where it is, with its own class and parameter names, so diffusers, PEFT (diffusers'
own LoRA) and savers keep seeing a plain layer. A child ``delora`` (:class:`DeLoRAContainer`, one
:class:`DeLoRALayer` per named adapter) holds the adapter parameters, and a forward hook
(:func:`delora_diffusion.hooks.delora_forward_hook`) adds their update to the layer's output:

    y = layer(x) + sum over active adapters of  x @ A'^T @ B'^T

``A' = A diag(w)`` and ``B' = B diag(s)`` (:func:`delora_diffusion.functional.scaled_factors`) are made per
forward from the per-rank scales s; how s is computed, cached, and when a cache goes stale, is
:mod:`delora_diffusion.fastpath`'s business alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional

ADAPTABLE = (nn.Linear, nn.Conv2d)


class DeLoRALayer(nn.Module):
    """One named adapter on one frozen layer: trainable A (r x in), B (out x r), lambda; frozen w (A0, B0).

    Run-time state, not saved: ``scale`` (the lambda slider, :func:`set_delora_scale`), ``adapter_weight``
    (diffusers' ``set_adapters`` weight), ``active`` and ``merged``. Their product ``effective_scale`` also
    lives in the non-persistent buffer ``scale_tensor``, so a compiled model reads it as data and a scale
    change never recompiles.
    """

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        lambda_init: float | None,
        init: str = "paper",
        module_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        relative_bound: float | None = None,
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
        self.register_buffer("delora_w_norm", functional.column_norms(weight).to(dtype))
        self.relative_bound = relative_bound
        self._lambda_max_key: tuple | None = None
        self._lambda_max: float | None = None
        if lambda_init is None:
            if relative_bound is None:
                raise ValueError("DeLoRALayer needs a lambda_init or a relative_bound.")
            lambda_init = functional.lambda_limit(self.delora_w_norm, relative_bound, init == "paper")
        self.delora_lambda = nn.Parameter(torch.full((1,), float(lambda_init), **kwargs))
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if init == "zero":
            nn.init.zeros_(self.delora_B)
        else:
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
            self.register_buffer("delora_A0", self.delora_A.detach().clone())
            self.register_buffer("delora_B0", self.delora_B.detach().clone())
        self.register_buffer("scale_tensor", torch.ones((), device=weight.device), persistent=False)
        self._scale = 1.0
        self._adapter_weight = 1.0
        self.active = True
        self.merged = False

    def __getstate__(self) -> dict:
        """Copies and pickles leave fastpath's factor cache behind (it may hold a training graph)."""
        state = self.__dict__.copy()
        state.pop("_cache", None)
        state.pop("_compiled_scales", None)
        state.pop("_cache_stamp", None)
        state.pop("_factors", None)
        state.pop("_compiled_factors", None)
        state.pop("_projected", None)
        return state

    # --- run-time scale -----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = float(value)
        self._sync_scale_tensor()

    @property
    def adapter_weight(self) -> float:
        return self._adapter_weight

    @adapter_weight.setter
    def adapter_weight(self, value: float) -> None:
        self._adapter_weight = float(value)
        self._sync_scale_tensor()

    @property
    def effective_scale(self) -> float:
        """What lambda is multiplied by at run time: the slider's scale times the adapter weight."""
        return self._scale * self._adapter_weight

    def _sync_scale_tensor(self) -> None:
        with torch.no_grad():
            self.scale_tensor.fill_(self.effective_scale)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``model.to(bf16)`` casts buffers; the scale stays fp32 so compiled and eager scale alike."""
        super()._apply(fn, recurse)
        if self.scale_tensor.dtype != torch.float32:
            self._buffers["scale_tensor"] = self.scale_tensor.float()
            self._sync_scale_tensor()
        return self

    # --- tensors ------------------------------------------------------------------------------------------
    @property
    def frozen_pair(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self._buffers.get("delora_A0"), self._buffers.get("delora_B0")

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file stores for this layer (parameters and persistent buffers).

        lambda is stored projected onto the relative bound, so a file saved right after an optimizer step
        (before the next forward's projection) still holds the bound.
        """
        tensors = dict(self.state_dict(keep_vars=True))
        tensors["delora_lambda"] = self.bounded_lambda().detach()
        return tensors

    # --- the relative bound -------------------------------------------------------------------------------
    @property
    def lambda_max(self) -> float | None:
        """|lambda| limit from the relative bound (None without one); follows w if w is overwritten (a load)."""
        if self.relative_bound is None:
            return None
        w = self._buffers["delora_w_norm"]
        key = (w._version, w.data_ptr())
        if key != self._lambda_max_key:
            self._lambda_max = functional.lambda_limit(w, self.relative_bound, self.init == "paper")
            self._lambda_max_key = key
        return self._lambda_max

    def bounded_lambda(self) -> torch.Tensor:
        """lambda as the update uses it: clamped to +-lambda_max (a no-op once :meth:`project_lambda` ran)."""
        limit = self.lambda_max
        lam = self._parameters["delora_lambda"]
        return lam if limit is None else lam.clamp(-limit, limit)

    def project_lambda(self) -> None:
        """Put lambda back inside its bound, in place (projected gradient descent: the optimizer may step out,
        the next forward never sees it, and the gradient keeps flowing because lambda sits on the boundary,
        not beyond it)."""
        limit = self.lambda_max
        if limit is not None:
            with torch.no_grad():
                self._parameters["delora_lambda"].clamp_(-limit, limit)

    def delta_weight(self, scale: float | None = None) -> torch.Tensor:
        """dW (out x in, fp32) at the current lambda times `scale` (default: the effective scale)."""
        A0, B0 = self.frozen_pair
        return functional.delta_weight(
            self.delora_A.float(),
            self.delora_B.float(),
            self.bounded_lambda().float(),
            self.delora_w_norm.float(),
            self.rank,
            self.effective_scale if scale is None else scale,
            None if A0 is None else A0.float(),
            None if B0 is None else B0.float(),
        )

    def compute_scales(self, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """This layer's per-rank scales s (:func:`functional.rank_scales`), through autograd (the per-layer path)."""
        A0, B0 = self.frozen_pair
        frozen = None if A0 is None else functional.frozen_unit_scales(A0, B0, self.rank)
        return functional.rank_scales(
            self.delora_A,
            self.delora_B,
            self.bounded_lambda(),
            self.rank,
            self.effective_scale if scale is None else scale,
            frozen,
        )

    def contributes(self) -> bool:
        return self.active and not self.merged and self.effective_scale != 0.0

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, init={self.init}, in={self.delora_A.shape[1]}, out={self.delora_B.shape[0]}"
        )


class DeLoRAContainer(nn.ModuleDict):
    """The ``delora`` child of an adapted layer: its :class:`DeLoRALayer` per adapter name.

    ``disabled`` switches all of them off at once. ``pristine_weight`` keeps the frozen weight exactly as it
    was while any adapter is merged into it, so unmerging restores it bit for bit (see :func:`merge_adapter`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.disabled = False
        self.pristine_weight: torch.Tensor | None = None


# --- merging: the frozen weight is always rebuilt from its pristine copy ------------------------------------
def rebuild_weight(base: nn.Module) -> None:
    """weight = pristine + sum of the merged adapters' dW, or exactly pristine when none is merged.

    Rebuilding from the pristine copy (instead of adding and subtracting dW in place) is what makes any
    number of merges, unmerges and scale changes of a merged model give the very same weights as one fresh
    merge, in every dtype. The cost is one copy of each merged layer's weight while it is merged. Nothing is
    written unless the result is finite.
    """
    container: DeLoRAContainer = base._modules["delora"]
    merged = [a for a in container.values() if a.merged]
    weight = base.weight
    # fp32 whatever autocast is on: under it dW would come out in half precision, and the sum with it
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        if not merged:
            if container.pristine_weight is not None:
                weight.copy_(container.pristine_weight)
                container.pristine_weight = None
            return
        pristine = container.pristine_weight if container.pristine_weight is not None else weight.detach()
        # dW + pristine in fp32, in dW's own buffer: the same sums as pristine + dW, one copy fewer
        total = None
        for adapter in merged:
            delta = adapter.delta_weight().reshape(weight.shape)
            total = delta.add_(pristine) if total is None else total.add_(delta)
        if not _all_finite(total):
            raise ValueError(
                "Merging this DeLoRA adapter produces non-finite weights; the adapter is broken."
            )
        if container.pristine_weight is None:
            container.pristine_weight = weight.detach().clone()
        weight.copy_(total.to(weight.dtype))


def _all_finite(t: torch.Tensor) -> bool:
    """isfinite(t).all(), from one summing pass when the sum is finite (a NaN or inf makes it not); the
    elementwise check (several passes on a CPU) only decides when the sum itself overflowed."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def merge_adapter(base: nn.Module, adapter: DeLoRALayer) -> None:
    """Add dW into the frozen weight (in its dtype); the hook then skips this adapter."""
    if adapter.merged:
        return
    adapter.merged = True
    try:
        rebuild_weight(base)
    except BaseException:
        adapter.merged = False
        raise


def unmerge_adapter(base: nn.Module, adapter: DeLoRALayer) -> None:
    """Take dW back out: the weight is rebuilt from its pristine copy, bit for bit."""
    if not adapter.merged:
        return
    adapter.merged = False
    rebuild_weight(base)
