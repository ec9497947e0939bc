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

from .layers import DeLoRALayer


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the update's matmuls run in: autocast's when active, else the frozen weight's."""
    weight = base._parameters["weight"]
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _DeLoRALinear(torch.autograd.Function):
    """``x A'^T B'^T`` with ``A' = A diag(w)``, ``B' = B diag(s)`` (:func:`functional.scaled_factors`), as
    LoRA's two skinny matmuls per pair (the trainable one, and the paper init's frozen one), without forming
    A' or B' where that is dearer: w scales x instead of A with fewer tokens than ranks, and s scales the
    T x r hidden instead of B with fewer tokens than outputs (``_sides``).

    The paper init's two pairs run as separate, same-shaped products, never stacked: at its start (A = A0,
    B = B0) they are then bitwise equal, so the update is exactly 0 and so is lambda's gradient (a stacked
    matmul may round its two halves differently, and Adam would turn that noise into a lambda step).

    Backward makes the factors again rather than saving them, so an adapted layer keeps for backward what
    LoRA keeps: x, and one T x r hidden only for the paper init (its frozen pair's, which backward needs for
    lambda's share and which would cost a matmul to make again); the trainable hidden is recomputed unless
    `keep_hidden`. Where s is safe on the hidden (``_s_safe``), backward takes the gradient through
    ``hidden * s`` whatever the forward did: s's gradient is then a T x r product per pair, and the frozen
    pair costs no (out x r) gradient of a B0 that nothing trains.

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
        w_on_x, s_on_hidden = _DeLoRALinear._sides(x, s, A, B, A0, dtype)
        ctx.dtype, ctx.w_on_x = dtype, w_on_x
        x_in, downs = _DeLoRALinear._downs(x, A, w, A0, dtype, w_on_x)
        hiddens = [F.linear(x_in, down) for down in downs]
        if s_on_hidden:
            parts = _DeLoRALinear._split(_as(s, dtype), A0)
            ups = _DeLoRALinear._ups(B, B0, dtype)
            out = F.linear(hiddens[0] * parts[0], ups[0])
            if A0 is not None:
                out = out.add_(F.linear(hiddens[1] * parts[1], ups[1]))
        else:
            ups = _DeLoRALinear._scaled_ups(B, B0, s, dtype)
            out = F.linear(hiddens[0], ups[0])
            if A0 is not None:
                out = out.add_(F.linear(hiddens[1], ups[1]))
        # The frozen pair's hidden is always kept: the paper init then keeps what LoRA keeps (x and one T x r
        # hidden). The trainable one only with `keep_hidden`.
        kept = (hiddens[0] if keep_hidden else None, hiddens[1] if A0 is not None else None)
        ctx.save_for_backward(x, s, A, B, w, A0, B0, *kept)
        return out

    @staticmethod
    def _sides(x, s, A, B, A0, dtype) -> tuple[bool, bool]:
        """(w scales x, s scales the hidden in forward): each only where that side is smaller (fewer tokens
        than ranks, resp. outputs) and safe (``_s_safe``). Backward reads w's side from ctx and takes s on the
        hidden wherever it is safe."""
        tokens = x.numel() // x.shape[-1]
        w_on_x = A.dtype == dtype and tokens < A.shape[0] * (1 if A0 is None else 2)
        return w_on_x, _DeLoRALinear._s_safe(s, dtype) and tokens < B.shape[0]

    @staticmethod
    def _s_safe(s: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether s may scale the hidden in the compute dtype: in s's own dtype, or in bf16 (fp32's range).
        Not in fp16 (fp16 adapters, or fp16 autocast: s itself may not fit, s times the hidden may not, and
        inf * B = 0 is NaN): the zero init's s is huge while B is tiny, and only their product, folded in
        s's dtype, is what fp16 can hold."""
        return dtype != torch.float16 and (s.dtype == dtype or dtype == torch.bfloat16)

    @staticmethod
    def _split(s: torch.Tensor, A0: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """s per pair: (trainable, frozen) for the paper init, (s,) for the zero init."""
        return (s,) if A0 is None else s.split(s.shape[0] // 2)

    @staticmethod
    def _downs(x, A, w, A0, dtype, w_on_x) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(x or x diag(w), the down factors A or A diag(w), one per pair), in `dtype`."""
        x_in = x if x.dtype == dtype else x.to(dtype)
        pairs = (A,) if A0 is None else (A, A0)
        if w_on_x:
            return x_in * w, pairs
        return x_in, tuple(_as(a * w, dtype) for a in pairs)

    @staticmethod
    def _ups(B, B0, dtype) -> tuple[torch.Tensor, ...]:
        return (_as(B, dtype),) if B0 is None else (_as(B, dtype), _as(B0, dtype))

    @staticmethod
    def _scaled_ups(B, B0, s, dtype) -> tuple[torch.Tensor, ...]:
        """B diag(s) per pair, folded in s's dtype, then cast to `dtype`."""
        if B0 is None:
            return (_as(B * s, dtype),)
        s_t, s_0 = s.split(B.shape[1])
        return _as(B * s_t, dtype), _as(B0 * s_0, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, s, A, B, w, A0, B0, *kept = ctx.saved_tensors
        dtype, needs, w_on_x = ctx.dtype, ctx.needs_input_grad, ctx.w_on_x
        r, paper = A.shape[0], A0 is not None
        x_in, downs = _DeLoRALinear._downs(x, A, w, A0, dtype, w_on_x)
        x2 = x_in.reshape(-1, x_in.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        g2 = g2 if g2.dtype == dtype else g2.to(dtype)
        s_safe = _DeLoRALinear._s_safe(s, dtype)
        if s_safe:  # through hidden * s: grad_scaled is d/d(hidden * s), (T, r) per pair
            parts = _DeLoRALinear._split(_as(s, dtype), A0)
            grad_scaled = [g2.mm(up) for up in _DeLoRALinear._ups(B, B0, dtype)]
            grad_hidden = [g * p for g, p in zip(grad_scaled, parts, strict=True)]
        else:
            grad_hidden = [g2.mm(up) for up in _DeLoRALinear._scaled_ups(B, B0, s, dtype)]
        grad_x = grad_s = grad_A = grad_B = None
        if needs[0]:
            grad_x = grad_hidden[0].mm(downs[0])
            if paper:  # addmm_: not bitwise 0 at the start, nor needs to be (both pairs see the same grad)
                grad_x = grad_x.addmm_(grad_hidden[1], downs[1])
            grad_x = (grad_x.mul_(w) if w_on_x else grad_x).reshape(x.shape)
            grad_x = grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)
        if needs[2]:
            grad_A = grad_hidden[0].t().mm(x2)
            grad_A = grad_A if grad_A.dtype == A.dtype else grad_A.to(A.dtype)
            grad_A = grad_A if w_on_x else grad_A.mul_(w)
        if needs[1] or needs[3]:
            hiddens = [  # remade by the forward's own op, so bitwise equal to the kept frozen one at the start
                (F.linear(x_in, down) if h is None else h).reshape(-1, down.shape[0])
                for h, down in zip(kept, downs, strict=False)
            ]
            if s_safe:
                if needs[1]:
                    grad_s = (grad_scaled[0] * hiddens[0]).sum(0)
                    if paper:
                        grad_s = torch.cat((grad_s, (grad_scaled[1] * hiddens[1]).sum(0)))
                    grad_s = grad_s if grad_s.dtype == s.dtype else grad_s.to(s.dtype)
                if needs[3]:
                    grad_B = g2.t().mm(hiddens[0] * parts[0])
                    grad_B = grad_B if grad_B.dtype == B.dtype else grad_B.to(B.dtype)
            else:  # through B diag(s), in the parameters' dtype: (out, r) per pair
                grad_up = _as(g2.t().mm(hiddens[0]), B.dtype)
                if needs[1]:
                    grad_s = (grad_up * B).sum(0)
                    if paper:
                        grad_s = torch.cat((grad_s, (_as(g2.t().mm(hiddens[1]), B.dtype) * B0).sum(0)))
                if needs[3]:
                    grad_B = grad_up.mul_(s[:r])
        return grad_x, grad_s, grad_A, grad_B, None, None, None, None, None


class _DeLoRAConv2d(torch.autograd.Function):
    """The Conv2d form of :class:`_DeLoRALinear`: per pair, a kh x kw conv into the ranks with ``A diag(w)``,
    then a 1x1 conv out with ``B diag(s)`` (s always folded into B, in the parameters' dtype). The paper init's two pairs run as separate, same-shaped convs, so that at its start the update
    and lambda's gradient are exactly 0 (see :class:`_DeLoRALinear`). The factors are made in forward and
    again in backward, never saved: backward keeps x and the paper init's frozen hidden (the trainable one
    too with `keep_hidden`), as LoRA keeps x and its hidden. Zero padding given as numbers, one group, a
    batched (N, C, H, W) input (``apply_update`` checks)."""

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
        downs, ups = _DeLoRAConv2d._kernels(ctx, s, A, B, w, A0, B0)
        hiddens = [F.conv2d(x_in, down, None, *ctx.geometry) for down in downs]
        out = F.conv2d(hiddens[0], ups[0])
        if A0 is not None:
            out = out.add_(F.conv2d(hiddens[1], ups[1]))
        kept = (hiddens[0] if keep_hidden else None, hiddens[1] if A0 is not None else None)
        ctx.save_for_backward(x, s, A, B, w, A0, B0, *kept)
        return out

    @staticmethod
    def _kernels(ctx, s, A, B, w, A0, B0):
        """Per pair, A diag(w) as a kh x kw kernel and B diag(s) as a 1x1 one, in the compute dtype."""
        pairs = ((A, B),) if A0 is None else ((A, B), (A0, B0))
        scales = (s,) if A0 is None else s.split(A.shape[0])
        downs = tuple(_as(a * w, ctx.dtype).reshape(a.shape[0], *ctx.kernel) for a, _ in pairs)
        ups = tuple(
            _as(b * sc, ctx.dtype)[:, :, None, None] for (_, b), sc in zip(pairs, scales, strict=True)
        )
        return downs, ups

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, s, A, B, w, A0, B0, *kept = ctx.saved_tensors
        dtype, needs, r = ctx.dtype, ctx.needs_input_grad, A.shape[0]
        x_in = x if x.dtype == dtype else x.to(dtype)
        g = grad if grad.dtype == dtype else grad.to(dtype)
        downs, ups = _DeLoRAConv2d._kernels(ctx, s, A, B, w, A0, B0)
        grad_hidden = [F.conv2d(g, up.transpose(0, 1)) for up in ups]  # (N, r, H, W) per pair
        grad_x = grad_s = grad_A = grad_B = None
        if needs[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, downs[0], grad_hidden[0], *ctx.geometry)
            if A0 is not None:
                grad_x = grad_x.add_(
                    torch.nn.grad.conv2d_input(x.shape, downs[1], grad_hidden[1], *ctx.geometry)
                )
            grad_x = grad_x.to(x.dtype)
        if needs[2]:
            grad_down = torch.nn.grad.conv2d_weight(x_in, downs[0].shape, grad_hidden[0], *ctx.geometry)
            grad_A = grad_down.reshape(r, -1).to(A.dtype).mul_(w)
        if needs[1] or needs[3]:
            hiddens = [
                F.conv2d(x_in, down, None, *ctx.geometry) if h is None else h
                for h, down in zip(kept, downs, strict=False)
            ]
            # d/d(B diag(s)), (out, r) per pair, in the parameters' dtype
            grad_up = [torch.einsum("nohw,nrhw->or", g, h).to(B.dtype) for h in hiddens]
            if needs[1]:
                parts = [
                    (gu * b).sum(0) for gu, b in zip(grad_up, (B,) if B0 is None else (B, B0), strict=True)
                ]
                grad_s = parts[0] if len(parts) == 1 else torch.cat(parts)
            grad_B = grad_up[0].mul_(s[:r]) if needs[3] else None
        return grad_x, grad_s, grad_A, grad_B, None, None, None, None, None, None


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
    out = None
    pairs = ((A, B, s),) if A0 is None else ((A, B, s[: A.shape[0]]), (A0, B0, s[A.shape[0] :]))
    for a, b, scales in pairs:  # one pair at a time, as in training: exact 0 at the paper init's start
        A_f, B_f = (a * w).to(dtype), (b * scales).to(dtype)
        if conv:
            hidden = base._conv_forward(x, A_f.reshape(A_f.shape[0], *base.weight.shape[1:]), None)
            term = F.conv2d(hidden, B_f[:, :, None, None])
        else:
            term = F.linear(F.linear(x, A_f), B_f)
        out = term if out is None else out + term
    return out
