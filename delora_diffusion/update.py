"""The update an adapted layer adds to its output, ``x A'^T B'^T``, as autograd sees it while training.

``A' = A diag(w)`` and ``B' = B diag(s)`` (:func:`delora_diffusion.functional.scaled_factors`), with the per-rank
scales s handed in by :mod:`delora_diffusion.fastpath`. While training (not compiling) the update runs
through its own autograd Function (:class:`_DeLoRALinear`, :class:`_DeLoRAConv2d`), which makes the scaled
factors again in backward instead of saving them: an adapted layer keeps for backward what LoRA keeps.
Elsewhere (inference, compiled graphs) it is plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .layers import DeLoRALayer


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the update's matmuls run in: autocast's when active, else the frozen weight's.

    Devices without autocast (meta, as in ``accelerate.init_empty_weights``) are asked nothing: torch raises
    for them rather than answer False."""
    weight = base._parameters["weight"]
    device_type = weight.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
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
    which LoRA keeps. Where the frozen pair runs on its own, its hidden is kept instead: with x, that is
    what LoRA keeps, and the paper init's backward makes one skinny matmul fewer.

    The gradients of A and B here are the direct ones; their share through the norms in s reaches them from
    the batched fold (``fold.FoldGroup``) via s's gradient. Inputs are cast to `dtype` explicitly, so
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
        # The frozen pair's hidden is always kept: the paper init then keeps what LoRA keeps (x and one T x r
        # hidden) and backward makes one skinny matmul fewer. The trainable one only with `keep_hidden`.
        kept = (hiddens[0] if keep_hidden else None, hiddens[1] if len(hiddens) > 1 else None)
        ctx.save_for_backward(x, s, A, B, w, A0, B0, *kept)
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
        return w_on_x, _s_safe(s, dtype) and tokens < B.shape[0]

    @staticmethod
    def _operands(x, s, A, B, w, A0, B0, dtype):
        """(x or x diag(w), downs, ups, s split per pair or None), in `dtype`. w and s each go on the smaller
        side: w on x (T x in) or A (r x in), s on the hidden (T x r) or B (out x r); few tokens favour x and
        the hidden, many favour the weights. s is folded into B, in s's dtype, wherever it is not safe on the
        hidden (``_s_safe``: fp16, or a lower compute dtype other than bf16)."""
        x_in = x if x.dtype == dtype else x.to(dtype)
        r, paper = A.shape[0], A0 is not None
        w_on_x, s_on_hidden = _DeLoRALinear._sides(x, s, A, B, A0, dtype)
        if w_on_x:
            x_in = x_in * w
            downs = (A, A0) if paper else (A,)
        else:
            downs = (_as(A * w, dtype), _as(A0 * w, dtype)) if paper else (_as(A * w, dtype),)
        if s_on_hidden:
            ups = (_as(B, dtype), _as(B0, dtype)) if paper else (_as(B, dtype),)
            s_c = _as(s, dtype)  # bf16 compute over fp32 adapters (autocast): s in bf16, fp32's range
            return x_in, downs, ups, s_c.split(r) if paper else (s_c,)
        ups = (_as(B * s[:r], dtype), _as(B0 * s[r:], dtype)) if paper else (_as(B * s, dtype),)
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
            hiddens = [
                x2.mm(down.t()) if h is None else h.reshape(-1, h.shape[-1])
                for h, down in zip(kept, downs, strict=False)
            ]
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


def _s_safe(s: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether s may scale the T x r hidden in the compute dtype: in s's own dtype, or in bf16 (fp32's range,
    so bf16 autocast over fp32 adapters qualifies). Not in fp16 (fp16 adapters or fp16 autocast: s may not
    fit, s times the hidden may not, and inf * B = 0 is NaN): the zero init's s is huge while B is tiny, and
    only their product, folded in s's dtype, is what fp16 can hold."""
    return dtype != torch.float16 and (s.dtype == dtype or dtype == torch.bfloat16)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, without a dispatcher call when it already is (this runs several times per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


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
