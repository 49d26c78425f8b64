"""The sparse-delta linear op: y = x @ (W + scatter(indices, values)).T + b.

Forward and backward never build a second dense copy of W for an ``nn.Linear`` base: the few
weights at ``indices`` are patched in place, used, and restored bit for bit (O(k) work). The
deltas' gradient is an SDDMM (for each active (i, j): sum over tokens of g[t, i] * x[t, j]):
a sampled matmul for sparse index sets, a dense GEMM plus gather only when the index set is so
dense that the GEMM is faster, or when the selector asks for the full weight gradient (AG).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this fraction of active entries, a dense GEMM + gather beats the sampled matmul on CPU
# (bench/bench_sddmm.py: 1536 x 576, 1024 tokens: 3.5 ms vs 11 ms at 1%, 14 ms vs 10 ms at 20%).
DENSE_SDDMM_DENSITY = 0.12

GradCapture = Callable[[Tensor], None]
WeightSource = Tensor | Callable[[], Tensor]


def merged_values(base: Tensor, values: Tensor) -> Tensor:
    """W[idx] + delta, added in float32 and rounded once to W's dtype.

    Forward, merge and unmerge all use this one formula, so a merged model's logits equal the
    unmerged model's exactly, in bf16/fp16 too.
    """
    return (base.float() + values.float()).to(base.dtype)


@contextmanager
def weight_with_deltas(weight: WeightSource, indices: Tensor, values: Tensor) -> Iterator[Tensor]:
    """Yield the dense weight W + scatter(indices, values).

    A tensor ``weight`` (a frozen parameter) is patched in place at ``indices`` and restored
    exactly on exit. A callable ``weight`` (e.g. a dequantizer) returns a fresh dense tensor,
    which is patched and simply dropped afterwards; the quantized storage is never touched.
    """
    with torch.no_grad():
        if callable(weight):
            dense = weight()
            flat = dense.view(-1)
            flat[indices] = merged_values(flat[indices], values)
            yield dense
            return
        flat = weight.view(-1)
        saved = flat[indices]
        flat[indices] = merged_values(saved, values)
        try:
            yield weight
        finally:
            flat[indices] = saved


def sddmm(grad_out: Tensor, x: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """Sampled dense-dense matmul: (grad_out.T @ x).view(-1)[indices] without the dense product.

    ``grad_out`` is (tokens, out), ``x`` is (tokens, in), ``indices`` sorted flat row-major
    positions in an (out, in) matrix. Computed in float32 (float64 stays float64).
    """
    out_features, in_features = shape
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    k = indices.numel()
    if k == 0:
        return grad_out.new_zeros(0, dtype=dtype)
    g = grad_out.to(dtype)
    xx = x.to(dtype)
    if k >= DENSE_SDDMM_DENSITY * out_features * in_features:
        return (g.T @ xx).view(-1)[indices]
    idx = indices.long()
    boundaries = torch.arange(out_features + 1, device=idx.device, dtype=torch.long) * in_features
    crow = torch.searchsorted(idx, boundaries)
    pattern = torch.sparse_csr_tensor(
        crow,
        idx % in_features,
        torch.zeros(k, dtype=dtype, device=idx.device),
        (out_features, in_features),
    )
    return torch.sparse.sampled_addmm(pattern, g.T.contiguous(), xx, beta=0.0).values()


class SparseDeltaLinearFn(torch.autograd.Function):
    """Autograd op for a linear layer with a sparse delta (see the module docstring)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        values: Tensor,
        indices: Tensor,
        weight: WeightSource,
        bias: Tensor | None,
        captures: Sequence[GradCapture],
    ) -> Tensor:
        with weight_with_deltas(weight, indices, values) as w:
            out = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, values, indices)
        ctx.weight, ctx.has_bias, ctx.captures = weight, bias is not None, tuple(captures)
        ctx.shape = (out.shape[-1], x.shape[-1])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, indices = ctx.saved_tensors
        out_features, in_features = ctx.shape
        g2 = grad_out.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            with weight_with_deltas(ctx.weight, indices, values) as w:
                grad_x = (g2 @ w.to(g2.dtype)).view(x.shape)
        if ctx.needs_input_grad[1]:
            if ctx.captures:
                dense = g2.float().T @ x2.float()
                for capture in ctx.captures:
                    capture(dense)
                grad_values = dense.view(-1)[indices]
            else:
                grad_values = sddmm(g2, x2, indices, ctx.shape)
            grad_values = grad_values.to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0)
        return grad_x, grad_values, None, None, grad_bias, None


def sparse_delta_linear(
    x: Tensor,
    weight: WeightSource,
    bias: Tensor | None,
    indices: Tensor,
    values: Tensor,
    captures: Sequence[GradCapture] = (),
) -> Tensor:
    """``x @ (W + scatter(indices, values)).T + bias`` with a sparse-aware backward.

    ``indices`` must be sorted and unique flat positions in W's (out, in) row-major layout.
    Each capture in ``captures`` is called in backward with the dense float32 gradient of the
    full weight (only the selector's AG accumulation windows pass any).
    """
    return SparseDeltaLinearFn.apply(x, values, indices.long(), weight, bias, captures)
