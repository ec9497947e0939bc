"""DeLoRA adapters attached to a frozen nn.Linear / nn.Conv2d.

The frozen layer stays where it is, with its own class and parameter names, so diffusers, PEFT (diffusers'
own LoRA) and savers keep seeing a plain layer. A child ``delora`` (:class:`DeLoRAContainer`, one
:class:`DeLoRALayer` per named adapter) holds the adapter parameters, and a forward hook
(:func:`delora_diffusion.fastpath.delora_forward_hook`) adds their update to the layer's output:

    y = layer(x) + sum over active adapters of  x @ A'^T @ B'^T

``A' = A diag(w)`` and ``B' = B diag(s)`` (:func:`delora_diffusion.functional.scaled_factors`) are made per
forward from the per-rank scales s; how s is computed, cached, and when a cache goes stale, is
:mod:`delora_diffusion.fastpath`'s business alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the update's matmuls run in: autocast's when active, else the frozen weight's."""
    weight = base._parameters["weight"]
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _DeLoRALinear(torch.autograd.Function):
    """``x A'^T B'^T`` with ``A' = A diag(w)``, ``B' = B diag(s)`` (:func:`functional.scaled_factors`), without
    forming both: w scales A or x, s scales B or the T x r hidden, each on the smaller side (``_operands``).
    Where both go on the weights (many tokens, the common case) the update is LoRA's two matmuls on one folded
    pair (the paper init's [A; A0], [B, B0] stacked), with as few Python calls as small layers need; where x
    or the hidden takes a scale, the paper init's frozen pair runs as its own two skinny matmuls.
    Backward makes the same products again, so an adapted layer keeps for backward what LoRA keeps (x and
    the parameters) plus the small vectors w and s: no folded copy of the adapter lives across the step.
    Without `keep_hidden` the T x r hidden ``x A'^T`` is recomputed in backward too (one skinny matmul),
    which LoRA keeps.

    The gradients of A and B here are the direct ones; their share through the norms in s reaches them from
    the batched fold (``fastpath._FoldGroup``) via s's gradient. Inputs are cast to `dtype` explicitly, so
    autocast (a no-op on them then) needs no special case. Written with few Python-level calls: it runs per
    layer per step, where small layers are overhead-bound.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        s: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        w: torch.Tensor,
        A0: torch.Tensor | None,
        B0: torch.Tensor | None,
        dtype: torch.dtype,
        keep_hidden: bool,
    ) -> torch.Tensor:
        ctx.dtype = dtype
        ctx.on_weights = not any(_DeLoRALinear._sides(x, s, A, B, A0, dtype))
        if ctx.on_weights:  # many tokens (the common case): LoRA's two matmuls on one folded pair
            if A0 is not None:
                A_f, B_f = torch.cat((A, A0)).mul_(w), torch.cat((B, B0), 1).mul_(s)
            else:
                A_f, B_f = A * w, B * s
            if A_f.dtype != dtype:
                A_f, B_f = A_f.to(dtype), B_f.to(dtype)
            hidden = F.linear(x if x.dtype == dtype else x.to(dtype), A_f)
            ctx.save_for_backward(x, s, A, B, w, A0, B0, hidden if keep_hidden else None)
            return F.linear(hidden, B_f)
        x_in, downs, ups, s_parts = _DeLoRALinear._operands(x, s, A, B, w, A0, B0, dtype)
        hiddens = [F.linear(x_in, down) for down in downs]
        ctx.save_for_backward(x, s, A, B, w, A0, B0, *(hiddens if keep_hidden else ()))
        scaled = hiddens if s_parts is None else [h * sp for h, sp in zip(hiddens, s_parts, strict=True)]
        out = F.linear(scaled[0], ups[0])
        if len(scaled) > 1:
            out = out.add_(F.linear(scaled[1], ups[1]))
        return out

    @staticmethod
    def _sides(x, s, A, B, A0, dtype) -> tuple[bool, bool]:
        """(w scales x, s scales the hidden): each only where that side is smaller (fewer tokens than ranks,
        resp. outputs) and s is safe there (see ``_operands``); the one place forward and backward decide it."""
        tokens = x.numel() // x.shape[-1]
        w_on_x = A.dtype == dtype and tokens < A.shape[0] * (1 if A0 is None else 2)
        return w_on_x, s.dtype == dtype and dtype != torch.float16 and tokens < B.shape[0]

    @staticmethod
    def _operands(x, s, A, B, w, A0, B0, dtype):
        """(x or x diag(w), downs, ups, s split per pair or None), in `dtype`. w and s each go on the smaller
        side: w on x (T x in) or A (r x in), s on the hidden (T x r) or B (out x r); few tokens favour x and
        the hidden, many favour the weights. s is folded into B, in s's dtype, whenever the update runs in a
        lower one (autocast, half weights) or in fp16 at all (fp16 adapters: s itself fits, s times the
        hidden may not, and inf * B = 0 is NaN): the zero init's s is huge while B is tiny, and their
        product is what a half type can hold."""
        x_in = x if x.dtype == dtype else x.to(dtype)
        r, paper = A.shape[0], A0 is not None
        w_on_x, s_on_hidden = _DeLoRALinear._sides(x, s, A, B, A0, dtype)
        if w_on_x:
            x_in = x_in * w
            downs = (A, A0) if paper else (A,)
        else:
            downs = ((A * w).to(dtype), (A0 * w).to(dtype)) if paper else ((A * w).to(dtype),)
        if s_on_hidden:
            ups = (B, B0) if paper else (B,)
            return x_in, downs, tuple(u.to(dtype) for u in ups), s.split(r) if paper else (s,)
        ups = ((B * s[:r]).to(dtype), (B0 * s[r:]).to(dtype)) if paper else ((B * s).to(dtype),)
        return x_in, downs, ups, None

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.on_weights:
            return _DeLoRALinear._backward_on_weights(ctx, grad)
        x, s, A, B, w, A0, B0, *kept = ctx.saved_tensors
        dtype, needs = ctx.dtype, ctx.needs_input_grad
        x_in, downs, ups, s_parts = _DeLoRALinear._operands(x, s, A, B, w, A0, B0, dtype)
        w_on_x = downs[0] is A
        x2 = x_in.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        g2 = g2 if g2.dtype == dtype else g2.to(dtype)
        if s_parts is None:  # s folded into ups
            grad_hidden = [g2.mm(up) for up in ups]
        else:
            grad_scaled = [g2.mm(up) for up in ups]  # (T, r) each: d/d(hidden * s)
            grad_hidden = [g * sp for g, sp in zip(grad_scaled, s_parts, strict=True)]
        grad_x = grad_s = grad_A = grad_B = None
        if needs[0]:
            grad_x = grad_hidden[0].mm(downs[0])
            if len(downs) > 1:
                grad_x = grad_x.addmm_(grad_hidden[1], downs[1])
            grad_x = (grad_x * w if w_on_x else grad_x).reshape(x.shape)
            grad_x = grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)
        r, paper = A.shape[0], A0 is not None
        if needs[2]:
            grad_A = grad_hidden[0].t().mm(x2)
            grad_A = grad_A if grad_A.dtype == A.dtype else grad_A.to(A.dtype)
            grad_A = grad_A if w_on_x else grad_A.mul_(w)
        if needs[1] or needs[3]:
            if kept:
                hiddens = [h.reshape(-1, h.shape[-1]) for h in kept]
            else:
                hiddens = [x2.mm(down.t()) for down in downs]
            if s_parts is None:  # through B' = B diag(s), in the parameters' dtype
                ups_raw = (B, B0) if paper else (B,)
                grad_up = [g2.t().mm(h).to(B.dtype) for h in hiddens]  # (out, r) each
                if needs[1]:
                    parts = [(g * u).sum(0) for g, u in zip(grad_up, ups_raw, strict=True)]
                    grad_s = parts[0] if len(parts) == 1 else torch.cat(parts)
                if needs[3]:
                    grad_B = grad_up[0].mul_(s[:r])
            else:
                if needs[1]:
                    parts = [(g * h).sum(0) for g, h in zip(grad_scaled, hiddens, strict=True)]
                    grad_s = parts[0] if len(parts) == 1 else torch.cat(parts)
                    grad_s = grad_s if grad_s.dtype == s.dtype else grad_s.to(s.dtype)
                if needs[3]:
                    grad_B = g2.t().mm(hiddens[0] * s_parts[0])
                    grad_B = grad_B if grad_B.dtype == B.dtype else grad_B.to(B.dtype)
        return grad_x, grad_s, grad_A, grad_B, None, None, None, None, None

    @staticmethod
    def _backward_on_weights(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Backward of the folded pair (A', B'), remade here; few Python calls, as small layers need."""
        x, s, A, B, w, A0, B0, hidden = ctx.saved_tensors
        dtype, needs, r = ctx.dtype, ctx.needs_input_grad, A.shape[0]
        paper = A0 is not None
        A_cat, B_cat = (torch.cat((A, A0)), torch.cat((B, B0), 1)) if paper else (A, B)
        A_f, B_f = A_cat * w, B_cat * s
        cast = A_f.dtype != dtype
        if cast:
            A_f, B_f = A_f.to(dtype), B_f.to(dtype)
        x2, grad2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        if grad2.dtype != dtype:
            grad2 = grad2.to(dtype)
        grad_hidden = grad2.mm(B_f)  # (T, R)
        grad_x = grad_s = grad_A = grad_B = None
        if needs[0]:
            grad_x = grad_hidden.mm(A_f).reshape(x.shape)
            grad_x = grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)
        if needs[2]:
            grad_A = (grad_hidden[:, :r] if paper else grad_hidden).t().mm(x2)
            grad_A = (grad_A.to(A.dtype) if cast else grad_A).mul_(w)
        if needs[1] or needs[3]:
            hidden = x2.mm(A_f.t()) if hidden is None else hidden.reshape(-1, hidden.shape[-1])
            grad_B_f = grad2.t().mm(hidden)  # (out, R)
            grad_B_f = grad_B_f.to(B.dtype) if cast else grad_B_f
            grad_s = (grad_B_f * B_cat).sum(0)
            grad_B = grad_B_f[:, :r] * s[:r] if paper else grad_B_f.mul_(s)
        return grad_x, grad_s, grad_A, grad_B, None, None, None, None, None


class _DeLoRAConv2d(torch.autograd.Function):
    """The Conv2d form of :class:`_DeLoRALinear`: a kh x kw conv into the ranks with ``[A; A0] diag(w)``, then
    a 1x1 conv out with ``[B, B0] diag(s)`` (s folded into B in the parameters' dtype, as for half compute
    there). The pair is made in forward and again in backward, never saved: backward keeps x, the parameters
    and the small vectors (and the hidden only with `keep_hidden`), as LoRA keeps x and its parameters. Zero
    padding given as numbers, one group, a batched (N, C, H, W) input (``apply_update`` checks)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        s: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        w: torch.Tensor,
        A0: torch.Tensor | None,
        B0: torch.Tensor | None,
        dtype: torch.dtype,
        keep_hidden: bool,
        base: nn.Conv2d,
    ) -> torch.Tensor:
        ctx.dtype, ctx.geometry, ctx.kernel = dtype, _conv_geometry(base), base.weight.shape[1:]
        x_in = x if x.dtype == dtype else x.to(dtype)
        down, up = _DeLoRAConv2d._kernels(ctx, s, A, B, w, A0, B0)
        hidden = F.conv2d(x_in, down, None, *ctx.geometry)
        ctx.save_for_backward(x, s, A, B, w, A0, B0, hidden if keep_hidden else None)
        return F.conv2d(hidden, up)

    @staticmethod
    def _kernels(ctx, s, A, B, w, A0, B0):
        """(A', B') of :func:`functional.scaled_factors` as a kh x kw and a 1x1 kernel, in the compute dtype."""
        A_f, B_f = functional.scaled_factors(A, B, w, s, A0, B0)
        down = A_f.to(ctx.dtype).reshape(A_f.shape[0], *ctx.kernel)
        return down, B_f.to(ctx.dtype)[:, :, None, None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, s, A, B, w, A0, B0, hidden = ctx.saved_tensors
        dtype, needs, r = ctx.dtype, ctx.needs_input_grad, A.shape[0]
        x_in = x if x.dtype == dtype else x.to(dtype)
        g = grad if grad.dtype == dtype else grad.to(dtype)
        down, up = _DeLoRAConv2d._kernels(ctx, s, A, B, w, A0, B0)
        grad_hidden = F.conv2d(g, up.transpose(0, 1))  # (N, R, H, W)
        grad_x = grad_s = grad_A = grad_B = None
        if needs[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, down, grad_hidden, *ctx.geometry).to(x.dtype)
        if needs[2]:
            grad_down = torch.nn.grad.conv2d_weight(x_in, down[:r].shape, grad_hidden[:, :r], *ctx.geometry)
            grad_A = grad_down.reshape(r, -1).to(A.dtype).mul_(w)
        if needs[1] or needs[3]:
            if hidden is None:
                hidden = F.conv2d(x_in, down, None, *ctx.geometry)
            grad_up = torch.einsum("nohw,nrhw->or", g, hidden).to(B.dtype)  # d/d(B diag(s)), (out, R)
            ups = B if B0 is None else torch.cat((B, B0), 1)
            grad_s = (grad_up * ups).sum(0) if needs[1] else None
            grad_B = grad_up[:, :r] * s[:r] if needs[3] else None
        return grad_x, grad_s, grad_A, grad_B, None, None, None, None, None, None


def _conv_geometry(base: nn.Conv2d) -> tuple:
    return base.stride, base.padding, base.dilation


def _plain_conv(base: nn.Module) -> bool:
    """What :class:`_DeLoRAConv2d` handles. Not a string padding ("same", "valid"): torch.nn.grad's conv
    helpers take numbers only."""
    return (
        isinstance(base, nn.Conv2d)
        and base.padding_mode == "zeros"
        and base.groups == 1
        and not isinstance(base.padding, str)
    )


def apply_update(
    base: nn.Module, layer: DeLoRALayer, x: torch.Tensor, s: torch.Tensor, recompute_hidden: bool = True
) -> torch.Tensor:
    """x -> x A'^T B'^T for one adapter with per-rank scales `s`: LoRA's two skinny matmuls (two convs for a
    Conv2d: kxk into rank, then 1x1 out).

    Training (not compiling) goes through :class:`_DeLoRALinear` / :class:`_DeLoRAConv2d`, which keep no
    folded copy (`recompute_hidden`: nor the hidden) for backward. Elsewhere the transient (A', B') is plain
    autograd ops: inference keeps nothing, and a compiled graph is left to its compiler (dynamo's wrapper of a
    custom autograd.Function costs more than the matmuls here).
    """
    params, buffers = layer._parameters, layer._buffers
    A, B, w = params["delora_A"], params["delora_B"], buffers["delora_w_norm"]
    A0, B0 = buffers.get("delora_A0"), buffers.get("delora_B0")
    dtype = compute_dtype(base)
    conv = isinstance(base, nn.Conv2d)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if not conv:
            return _DeLoRALinear.apply(x, s, A, B, w, A0, B0, dtype, not recompute_hidden)
        if _plain_conv(base) and x.dim() == 4:  # batched: torch.nn.grad's helpers take no unbatched input
            return _DeLoRAConv2d.apply(x, s, A, B, w, A0, B0, dtype, not recompute_hidden, base)
    A_f, B_f = (t.to(dtype) for t in functional.scaled_factors(A, B, w, s, A0, B0))
    if conv:
        hidden = base._conv_forward(x, A_f.reshape(A_f.shape[0], *base.weight.shape[1:]), None)
        return F.conv2d(hidden, B_f[:, :, None, None])
    return F.linear(F.linear(x, A_f), B_f)


# --- merging: the frozen weight is always rebuilt from its pristine copy ------------------------------------
def _rebuild_weight(base: nn.Module) -> None:
    """weight = pristine + sum of the merged adapters' dW, or exactly pristine when none is merged.

    Rebuilding from the pristine copy (instead of adding and subtracting dW in place) is what makes any
    number of merges, unmerges and scale changes of a merged model give the very same weights as one fresh
    merge, in every dtype. The cost is one copy of each merged layer's weight while it is merged.
    """
    container: DeLoRAContainer = base._modules["delora"]
    merged = [a for a in container.values() if a.merged]
    weight = base.weight
    with torch.no_grad():
        if not merged:
            if container.pristine_weight is not None:
                weight.copy_(container.pristine_weight)
                container.pristine_weight = None
            return
        pristine = container.pristine_weight if container.pristine_weight is not None else weight.detach()
        total = pristine.float().clone()
        for adapter in merged:
            total += adapter.delta_weight().reshape(weight.shape)
        if not torch.isfinite(total).all():
            raise ValueError(
                "Merging this DeLoRA adapter produces non-finite weights; the adapter is broken."
            )
        if container.pristine_weight is None:
            container.pristine_weight = weight.detach().clone()
        weight.copy_(total.to(weight.dtype))


def merge_adapter(base: nn.Module, adapter: DeLoRALayer) -> None:
    """Add dW into the frozen weight (in its dtype); the hook then skips this adapter."""
    if adapter.merged:
        return
    adapter.merged = True
    try:
        _rebuild_weight(base)
    except BaseException:
        adapter.merged = False
        raise


def unmerge_adapter(base: nn.Module, adapter: DeLoRALayer) -> None:
    """Take dW back out: the weight is rebuilt from its pristine copy, bit for bit."""
    if not adapter.merged:
        return
    adapter.merged = False
    _rebuild_weight(base)
