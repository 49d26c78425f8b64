"""The sparse-delta linear op against a dense float64 reference, gradients included."""

import threading

import pytest
import torch
from torch import nn

from recording_capture import RecordingCapture
from spielft import ops
from spielft.layer import line_positions, random_indices
from spielft.ops import (
    csr_sddmm,
    dense_sddmm,
    gather_sddmm,
    merged_values,
    sddmm,
    sparse_delta_linear,
)


def _case(out_f, in_f, density, leading, bias, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    b = torch.randn(out_f, generator=gen, dtype=dtype) if bias else None
    k = max(1, int(density * out_f * in_f))
    indices = random_indices(out_f * in_f, k, gen)
    values = torch.randn(k, generator=gen, dtype=dtype, requires_grad=True)
    x = torch.randn(*leading, in_f, generator=gen, dtype=dtype, requires_grad=True)
    return weight, b, indices, values, x


def _dense_reference(x, weight, b, indices, values):
    delta = torch.zeros(weight.numel(), dtype=values.dtype).index_put((indices.long(),), values)
    return torch.nn.functional.linear(x, weight + delta.view_as(weight), b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(7,), (2, 5)])
@pytest.mark.parametrize("density", [0.02, 0.5])  # sampled SDDMM and dense GEMM + gather
def test_forward_and_gradients_match_dense_float64(bias, leading, density):
    weight, b, indices, values, x = _case(13, 11, density, leading, bias)
    before = weight.clone()
    out = sparse_delta_linear(x, weight, b, indices, values)
    ref = _dense_reference(x, weight, b, indices, values)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    gx, gv = torch.autograd.grad(out, (x, values), grad)
    rx, rv = torch.autograd.grad(ref, (x, values), grad)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gv, rv)
    assert torch.equal(weight, before), "the base weight must be restored bit for bit"


def test_gradcheck():
    weight, b, indices, values, x = _case(6, 5, 0.3, (2, 3), True)
    assert torch.autograd.gradcheck(
        lambda x_, v_: sparse_delta_linear(x_, weight, b, indices, v_), (x, values)
    )


def test_callable_weight_source_is_not_modified():
    weight, b, indices, values, x = _case(9, 8, 0.1, (4,), True)
    frozen = weight.clone()
    out = sparse_delta_linear(x, lambda: weight.clone(), b, indices, values)
    torch.testing.assert_close(out, _dense_reference(x, weight, b, indices, values))
    assert torch.equal(weight, frozen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_weights_match_reference_rounding(dtype):
    weight, b, indices, values, x = _case(16, 12, 0.1, (3, 4), True, dtype=torch.float32)
    w, bb, xx = weight.to(dtype), b.to(dtype), x.detach().to(dtype).requires_grad_()
    vals = values.detach().float().requires_grad_()
    out = sparse_delta_linear(xx, w, bb, indices, vals)
    assert out.dtype == dtype
    merged = w.clone().view(-1)
    merged[indices.long()] = (merged[indices.long()].float() + vals.detach()).to(dtype)
    ref = torch.nn.functional.linear(xx.detach(), merged.view_as(w), bb)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().sum().backward()
    assert vals.grad.dtype == torch.float32
    g = torch.ones(12, 16)
    ref_grad = (g.T @ xx.detach().float().reshape(12, 12)).view(-1)[indices.long()]
    torch.testing.assert_close(vals.grad, ref_grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", [dense_sddmm, csr_sddmm, gather_sddmm])
@pytest.mark.parametrize("density", [0.001, 0.02, 0.3, 1.0])
def test_each_sddmm_path_matches_float64_reference(path, density, monkeypatch):
    monkeypatch.setattr(ops, "_GATHER_CHUNK", 50 * 7)  # several chunks of 7 indices
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    x = torch.randn(50, 30, generator=gen, dtype=torch.float64)
    idx = random_indices(1200, max(1, int(density * 1200)), gen)
    torch.testing.assert_close(path(g, x, idx, (40, 30)), (g.T @ x).view(-1)[idx])


@pytest.mark.parametrize("path", ["dense", "csr", "gather"])
def test_sddmm_dispatch_computes_the_same_in_every_regime(path, monkeypatch):
    """Force each path through the thresholds: the op's gradients must not depend on which."""
    dense_at, gather_below = {"dense": (0.0, 0.0), "csr": (2.0, 0.0), "gather": (2.0, 2.0)}[path]
    monkeypatch.setattr(ops, "DENSE_SDDMM_DENSITY", dense_at)
    monkeypatch.setattr(ops, "GATHER_SDDMM_DENSITY", gather_below)
    weight, b, indices, values, x = _case(13, 11, 0.05, (2, 5), True)
    out = sparse_delta_linear(x, weight, b, indices, values)
    grad = torch.randn_like(out)
    gv = torch.autograd.grad(out, values, grad)[0]
    rv = torch.autograd.grad(_dense_reference(x, weight, b, indices, values), values, grad)[0]
    torch.testing.assert_close(gv, rv)
    assert sddmm(grad.reshape(-1, 13), x.reshape(-1, 11), indices[:0], (13, 11)).numel() == 0


def test_dense_weight_gradient_only_when_captured():
    weight, b, indices, values, x = _case(10, 7, 0.2, (6,), False)
    capture = RecordingCapture(dense=True)
    out = sparse_delta_linear(x, weight, b, indices, values, captures=[capture])
    out.sum().backward()
    seen = capture.dense
    assert len(seen) == 1 and seen[0].shape == (10, 7) and seen[0].dtype == torch.float32
    assert capture.input_ms == [None]  # not asked for
    expected = torch.ones(6, 10, dtype=torch.float64).T @ x.detach()
    torch.testing.assert_close(seen[0], expected.float())
    values.grad = None
    sparse_delta_linear(x, weight, b, indices, values).sum().backward()
    assert len(seen) == 1  # no capture requested: no dense gradient handed out


@pytest.mark.parametrize("density", [0.02, 0.5])
def test_input_statistics_capture_without_dense_gradient(density):
    # MA's windows ask only for each input feature's mean square: the deltas' gradient still
    # comes from the SDDMM and matches the float64 reference.
    weight, b, indices, values, x = _case(10, 7, density, (2, 3), True)
    capture = RecordingCapture(dense=False, inputs=True)
    sparse_delta_linear(x, weight, b, indices, values, captures=[capture]).sum().backward()
    assert capture.dense == [None] and capture.input_ms[0].shape == (1, 7)
    x2 = x.detach().reshape(-1, 7)
    torch.testing.assert_close(capture.input_ms[0].double(), x2.square().mean(0, keepdim=True))
    grad = values.grad.clone()
    values.grad = None
    _dense_reference(x, weight, b, indices, values).sum().backward()
    torch.testing.assert_close(grad, values.grad)


def test_concurrent_forwards_leave_the_shared_weight_intact():
    # Each call patches W in place; without the per-weight lock, threads save each other's
    # patched values as "original" and the frozen weight drifts.
    weight, b, _, _, _ = _case(128, 128, 0.5, (1,), True, dtype=torch.float32)
    frozen = weight.clone()
    cases = []
    for seed in range(4):
        _, _, indices, values, x = _case(128, 128, 0.5, (4,), False, torch.float32, seed=seed)
        with torch.no_grad():
            cases.append((indices, values, x, sparse_delta_linear(x, weight, b, indices, values)))
    errors = []

    def run(indices, values, x, expected):
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(sparse_delta_linear(x, weight, b, indices, values), expected):
                    errors.append("wrong output")

    threads = [threading.Thread(target=run, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert torch.equal(weight, frozen)


def _bf16_rounded_grad(grad, x, indices, out_f, in_f):
    """The float64 weight gradient of bf16-rounded operands, at ``indices``."""
    g2 = grad.reshape(-1, out_f).bfloat16().double()
    x2 = x.detach().reshape(-1, in_f).bfloat16().double()
    return (g2.T @ x2).view(-1)[indices.long()]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("density", [0.02, 0.5])  # below and above BF16_DENSE_SDDMM_DENSITY
def test_bfloat16_weight_gradient_is_the_rounded_operands_product(density, transposed):
    # The bf16 GEMM's gradient equals the exact product of the bf16-rounded operands up to the
    # bf16 rounding of its output; below the threshold the exact sparse paths are used.
    weight, b, indices, values, x = _case(24, 20, density, (3, 10), True, dtype=torch.float32)
    w = weight.T.contiguous() if transposed else weight
    out = sparse_delta_linear(x, w, b, indices, values, transposed=transposed,
                              grad_dtype=torch.bfloat16)
    exact = sparse_delta_linear(x, w, b, indices, values, transposed=transposed)
    torch.testing.assert_close(out, exact, rtol=0, atol=0)  # the forward is unchanged
    grad = torch.randn_like(out)
    gx, gv = torch.autograd.grad(out, (x, values), grad)
    rx, rv = torch.autograd.grad(exact, (x, values), grad)
    torch.testing.assert_close(gx, rx, rtol=0, atol=0)  # so is the input gradient
    assert gv.dtype == torch.float32
    if density < ops.BF16_DENSE_SDDMM_DENSITY:
        torch.testing.assert_close(gv, rv, rtol=0, atol=0)
        return
    left, right = (x, grad) if transposed else (grad, x)
    shape = (20, 24) if transposed else (24, 20)
    rounded = _bf16_rounded_grad(left, right.reshape(-1, shape[1]), indices, *shape)
    torch.testing.assert_close(gv.double(), rounded, rtol=2**-8, atol=1e-6)
    # against the exact gradient: a relative error of a few bf16 ulps of the largest entry
    assert (gv - rv).abs().max() <= 2**-6 * rv.abs().max()
    assert not torch.equal(gv, rv), "the bf16 GEMM was not used"


def test_bfloat16_dense_capture_is_the_rounded_operands_product():
    weight, b, indices, values, x = _case(10, 7, 0.2, (6,), False, dtype=torch.float32)
    capture = RecordingCapture(dense=True)
    out = sparse_delta_linear(x, weight, b, indices, values, captures=[capture],
                              grad_dtype=torch.bfloat16)
    grad = torch.randn_like(out)
    out.backward(grad)
    (dense,) = capture.dense
    assert dense.dtype == torch.float32 and dense.shape == (10, 7)
    everything = torch.arange(70)
    rounded = _bf16_rounded_grad(grad, x, everything, 10, 7).view(10, 7)
    torch.testing.assert_close(dense.double(), rounded, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(values.grad, dense.view(-1)[indices.long()], rtol=0, atol=0)


def test_bfloat16_gemm_leaves_float64_exact_when_not_asked():
    g = torch.randn(9, 5, dtype=torch.float64)
    x = torch.randn(9, 4, dtype=torch.float64)
    assert ops.weight_grad(g, x).dtype == torch.float64
    torch.testing.assert_close(ops.weight_grad(g, x), g.T @ x, rtol=0, atol=0)
    assert ops.weight_grad(g, x, torch.bfloat16).dtype == torch.float64


def test_auto_grad_dtype_follows_a_bfloat16_layer_and_float32_forces_exact():
    weight, b, indices, values, x = _case(24, 20, 0.5, (3, 10), True, dtype=torch.float32)
    xb = x.detach().bfloat16().requires_grad_()
    vals = values.detach().requires_grad_()
    grad = torch.randn(3, 10, 24).bfloat16()

    def grads(grad_dtype):
        out = sparse_delta_linear(xb, weight.bfloat16(), b.bfloat16(), indices, vals,
                                  grad_dtype=grad_dtype)
        return torch.autograd.grad(out, vals, grad)[0]

    g2, x2 = grad.reshape(-1, 24).double(), xb.detach().reshape(-1, 20).double()
    exact = (g2.T @ x2).view(-1)[indices.long()]
    forced = grads(torch.float32)  # the operands upcast: exact up to float32 rounding
    torch.testing.assert_close(forced.double(), exact, rtol=1e-6, atol=1e-6)
    auto = grads(None)
    torch.testing.assert_close(auto, grads(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(auto.double(), exact, rtol=2**-8, atol=1e-6)
    assert not torch.equal(auto, forced)


def _reference_grads(x, weight, b, indices, values, grad):
    ref = _dense_reference(x, weight, b, indices, values)
    return ref, torch.autograd.grad(ref, (x, values), grad)


def test_applied_deltas_give_the_same_outputs_and_gradients_and_restore_w():
    weight, b, indices, values, x = _case(13, 11, 0.3, (2, 5), True)
    pretrained = weight.clone()
    _, _, other_indices, other_values, _ = _case(13, 11, 0.3, (2, 5), True, seed=1)
    grad = torch.randn(2, 5, 13, dtype=torch.float64)
    with ops.applied_deltas([weight]):
        for step in range(3):
            out = sparse_delta_linear(x, weight, b, indices, values)
            # W now holds the deltas: W0 + delta, written once by the forward.
            delta = torch.zeros(weight.numel(), dtype=weight.dtype)
            delta[indices.long()] = values.detach()
            assert torch.equal(weight, (pretrained.view(-1) + delta).view_as(weight))
            ref, (rx, rv) = _reference_grads(x, pretrained, b, indices, values, grad)
            gx, gv = torch.autograd.grad(out, (x, values), grad)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
            torch.testing.assert_close((gx, gv), (rx, rv), rtol=0, atol=1e-12)
            with torch.no_grad():
                values.add_(0.1 * step)  # an optimizer step
            indices, other_indices = other_indices, indices  # and a reselection
            values, other_values = other_values, values
    assert torch.equal(weight, pretrained), "restored bit for bit on exit"


def test_a_backward_after_another_forward_writes_its_own_values_back():
    # Two graphs on one weight with different deltas (e.g. two adapters' forwards before one
    # backward): the first graph's backward must not compute with the second one's W.
    weight, b, indices, values, x = _case(9, 8, 0.3, (4,), False)
    _, _, indices2, values2, _ = _case(9, 8, 0.3, (4,), False, seed=1)
    pretrained = weight.clone()
    grad = torch.randn(4, 9, dtype=torch.float64)
    with ops.applied_deltas([weight]):
        first = sparse_delta_linear(x, weight, b, indices, values)
        second = sparse_delta_linear(x, weight, b, indices2, values2)
        gx1 = torch.autograd.grad(first, x, grad)[0]
        gx2 = torch.autograd.grad(second, x, grad)[0]
    for gx, idx, vals in ((gx1, indices, values), (gx2, indices2, values2)):
        _, (rx, _) = _reference_grads(x, pretrained, b, idx, vals, grad)
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    assert torch.equal(weight, pretrained)


@pytest.mark.parametrize("line_axis", [None, 0])
def test_applied_deltas_write_unchanged_values_once(monkeypatch, line_axis):
    """Micro-batches, evaluation and generation reuse what W holds; any in-place change of the
    values (an optimizer step), or other values, is written before the next use."""
    weight, b, indices, values, x = _case(13, 11, 0.3, (2, 5), True)
    if line_axis is not None:
        indices = _line_case((13, 11), line_axis, 4)
        values = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)
    pretrained = weight.clone()
    writes = []
    monkeypatch.setattr(ops, "merged_values", lambda *a: writes.append(1) or merged_values(*a))
    grad = torch.randn(2, 5, 13, dtype=torch.float64)
    with ops.applied_deltas([weight]):
        for _ in range(3):  # three micro-batches of one step: forward and backward each
            out = sparse_delta_linear(x, weight, b, indices, values, line_axis=line_axis)
            gx, gv = torch.autograd.grad(out, (x, values), grad)
        assert len(writes) == 1
        ref, (rx, rv) = _reference_grads(x, pretrained, b, indices, values, grad)
        torch.testing.assert_close((out, gx, gv), (ref, rx, rv), rtol=0, atol=1e-12)
        with torch.no_grad():
            values.mul_(2.0)  # an optimizer step, in place: the next forward writes
            copy = values.clone()  # equal values in another tensor: written too
        out = sparse_delta_linear(x, weight, b, indices, values, line_axis=line_axis)
        torch.testing.assert_close(out, _dense_reference(x, pretrained, b, indices, values),
                                   rtol=0, atol=1e-12)
        sparse_delta_linear(x, weight, b, indices, copy, line_axis=line_axis)
        assert len(writes) == 3
    assert torch.equal(weight, pretrained)


def test_applied_deltas_see_a_fused_optimizer_step():
    """torch's fused optimizers leave the version counter alone; their step still re-writes W."""
    weight, b, indices, _, x = _case(9, 8, 0.3, (4,), False, dtype=torch.float32)
    pretrained = weight.clone()
    values = torch.zeros(indices.numel(), requires_grad=True)
    optimizer = torch.optim.AdamW([values], lr=0.1, fused=True)
    with ops.applied_deltas([weight]):
        for _ in range(3):
            out = sparse_delta_linear(x, weight, b, indices, values)
            ref = _dense_reference(x, pretrained, b, indices, values)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
            out.square().sum().backward()
            version = values._version
            optimizer.step()
            optimizer.zero_grad()
        assert values._version == version, "fused: no version bump, so the step count matters"
        assert values.abs().sum() > 0
    assert torch.equal(weight, pretrained)


def test_applied_deltas_write_again_after_a_dtype_change_of_w():
    """``module.float()`` inside the block: W is re-written from its own values, not kept as
    the rounded bf16 W0 + delta."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 6, generator=gen).bfloat16(), requires_grad=False)
    pretrained = weight.detach().float()
    indices = torch.arange(0, 48, 3, dtype=torch.int32)
    values = torch.full((indices.numel(),), 1e-3, requires_grad=True)  # below bf16's spacing
    x = torch.randn(2, 6, generator=gen)
    with torch.no_grad(), ops.applied_deltas([weight]):
        sparse_delta_linear(x.bfloat16(), weight, None, indices, values)
        weight.data = weight.data.float()  # what module.float() does
        out = sparse_delta_linear(x, weight, None, indices, values)
        torch.testing.assert_close(out, _dense_reference(x, pretrained, None, indices, values),
                                   rtol=0, atol=1e-6)
    assert torch.equal(weight, pretrained)


def test_applied_deltas_restore_on_error_nest_and_restore_weight_on_demand():
    weight, b, indices, values, x = _case(9, 8, 0.3, (4,), False)
    pretrained = weight.clone()
    with pytest.raises(KeyError), ops.applied_deltas([weight]):
        sparse_delta_linear(x, weight, b, indices, values)
        raise KeyError("stop")
    assert torch.equal(weight, pretrained)
    with ops.applied_deltas([weight]):
        with ops.applied_deltas([weight]):
            sparse_delta_linear(x, weight, b, indices, values)
        assert not torch.equal(weight, pretrained), "only the outermost block restores"
        ops.restore_weight(weight)
        assert torch.equal(weight, pretrained)
        out = sparse_delta_linear(x, weight, b, indices, values)  # written again as needed
        torch.testing.assert_close(out, _dense_reference(x, pretrained, b, indices, values))
    assert torch.equal(weight, pretrained)


def test_a_base_weight_modified_inside_applied_deltas_fails_clearly():
    weight, b, indices, values, x = _case(9, 8, 0.3, (4,), False)
    with ops.applied_deltas([weight]):
        sparse_delta_linear(x, weight, b, indices, values)
        weight.mul_(2)  # e.g. load_state_dict into the base model
        with pytest.raises(RuntimeError, match="modified in place while spielft kept"):
            sparse_delta_linear(x, weight, b, indices, values)


def test_applied_deltas_keep_low_precision_rounding_and_embeddings():
    weight, b, indices, values, x = _case(16, 12, 0.2, (3,), True, dtype=torch.float32)
    w, xx = weight.bfloat16(), x.detach().bfloat16()
    vals = values.detach().float()
    expected = sparse_delta_linear(xx, w, b.bfloat16(), indices, vals)
    ids = torch.tensor([[0, 3, 15, 3]])
    expected_rows = ops.sparse_delta_embedding(ids, w, indices, vals)
    pretrained = w.clone()
    with ops.applied_deltas([w]):
        for _ in range(2):
            assert torch.equal(sparse_delta_linear(xx, w, b.bfloat16(), indices, vals), expected)
            assert torch.equal(ops.sparse_delta_embedding(ids, w, indices, vals), expected_rows)
    assert torch.equal(w, pretrained)


def test_a_failed_write_inside_applied_deltas_leaves_the_block_usable():
    # e.g. a caught error retried in the same block (auto_find_batch_size): no false alarm.
    weight, b, indices, values, x = _case(9, 8, 0.3, (4,), False)
    indices = indices.int()  # the layers' own index dtype
    pretrained = weight.clone()
    with ops.applied_deltas([weight]):
        for wrong in (values.detach()[:-1], values.detach()):
            with pytest.raises(RuntimeError):
                sparse_delta_linear(x, weight, b, indices, wrong[:-1])
            out = sparse_delta_linear(x, weight, b, indices, values)
            torch.testing.assert_close(out, _dense_reference(x, pretrained, b, indices, values),
                                       rtol=0, atol=1e-12)
    assert torch.equal(weight, pretrained)


# -- whole lines (SpielConfig.structure) ----------------------------------------------------------


def _line_case(stored_shape, axis, n_lines, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lines = torch.randperm(stored_shape[axis], generator=gen)[:n_lines].sort().values
    return line_positions(lines, stored_shape, axis).int()


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_whole_lines_match_dense_float64_and_restore_w(axis, transposed, bias):
    """The line-by-line patch and the line GEMM against the dense reference, gradients too."""
    weight, b, _, _, x = _case(13, 11, 0.1, (2, 5), bias)
    if b is not None:
        b.requires_grad_(True)
    stored = weight.T.contiguous() if transposed else weight  # Conv1D stores (in, out)
    indices = _line_case(tuple(stored.shape), axis, 3)
    values = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)
    before = stored.clone()
    out = sparse_delta_linear(x, stored, b, indices, values, transposed=transposed, line_axis=axis)
    delta = torch.zeros(stored.numel(), dtype=torch.float64).index_put((indices.long(),), values)
    dense = stored + delta.view_as(stored)
    ref = torch.nn.functional.linear(x, dense.T if transposed else dense, b)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    inputs = (x, values) if b is None else (x, values, b)
    for got, want in zip(
        torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True
    ):
        torch.testing.assert_close(got, want)
    assert torch.equal(stored, before), "the base weight must be restored bit for bit"


@pytest.mark.parametrize("axis", [0, 1])
def test_whole_lines_of_a_callable_weight_and_in_low_precision(axis):
    """A dequantizing source is patched line by line too; bf16 rounds as the flat path does."""
    weight, b, _, _, x = _case(9, 8, 0.1, (4,), True, dtype=torch.bfloat16)
    indices = _line_case((9, 8), axis, 2)
    values = torch.randn(indices.numel(), dtype=torch.float32)
    flat = sparse_delta_linear(x, weight, b, indices, values)
    lines = sparse_delta_linear(x, lambda: weight.clone(), b, indices, values, line_axis=axis)
    assert torch.equal(lines, flat)


def test_whole_lines_with_dense_capture_give_the_same_gradient():
    """An AG window's dense gradient and the line GEMM agree (and the capture sees W's)."""
    weight, b, _, _, x = _case(12, 10, 0.1, (6,), False)
    indices = _line_case((12, 10), 0, 4)
    values = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)
    capture = RecordingCapture(dense=True)
    out = sparse_delta_linear(x, weight, b, indices, values, [capture], line_axis=0)
    (with_capture,) = torch.autograd.grad(out.sum(), values)
    out = sparse_delta_linear(x, weight, b, indices, values, line_axis=0)
    (without,) = torch.autograd.grad(out.sum(), values)
    torch.testing.assert_close(with_capture, without)


def _saved_shapes(run):
    """The shapes of the tensors autograd saves while ``run()`` builds its graph."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return shapes


@pytest.mark.parametrize("transposed", [False, True])
def test_lines_across_the_input_features_save_only_those_features(transposed):
    """Columns (rows of a transposed weight) keep the lines' features of x for backward, not
    x; with a capture (a selection window) x is kept whole; with frozen values, nothing."""
    weight, b, _, _, x = _case(13, 11, 0.1, (2, 5), True)
    stored = weight.T.contiguous() if transposed else weight
    axis = 0 if transposed else 1  # the input features' axis of the stored weight
    indices = _line_case(tuple(stored.shape), axis, 3)
    values = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)

    def run(vals, captures=()):
        return lambda: sparse_delta_linear(x, stored, b, indices, vals, captures,
                                           transposed=transposed, line_axis=axis)

    assert (10, 3) in _saved_shapes(run(values))
    assert (2, 5, 11) not in _saved_shapes(run(values))
    assert (2, 5, 11) in _saved_shapes(run(values, [RecordingCapture(dense=True)]))
    assert (2, 5, 11) not in _saved_shapes(run(values.detach()))
    # over a third of the features, q/k/v's copies would outweigh their shared x: x it is
    many = _line_case(tuple(stored.shape), axis, 4)
    saved = _saved_shapes(lambda: sparse_delta_linear(
        x, stored, b, many, torch.randn(many.numel(), dtype=torch.float64, requires_grad=True),
        transposed=transposed, line_axis=axis))
    assert (2, 5, 11) in saved and (10, 4) not in saved
    # and the output-feature lines still need all of x
    other = _line_case(tuple(stored.shape), 1 - axis, 3)
    saved = _saved_shapes(lambda: sparse_delta_linear(
        x, stored, b, other, torch.randn(other.numel(), dtype=torch.float64, requires_grad=True),
        transposed=transposed, line_axis=1 - axis))
    assert (2, 5, 11) in saved


def _saved_dtypes(run):
    """The (shape, dtype) of each tensor autograd saves while ``run()`` builds its graph."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, saved


@pytest.mark.parametrize("transposed", [False, True])
def test_lines_of_input_features_are_saved_in_bfloat16_for_a_bfloat16_gemm(transposed):
    """With a bf16 weight-gradient GEMM the saved features are the rounded operand itself (half
    the bytes), and the gradient is still the rounded operands' product; float32 stays exact,
    and "auto" (None) follows the dtype the layer computes in, autocast included."""
    weight, b, _, _, x = _case(13, 11, 0.1, (2, 5), True, dtype=torch.float32)
    stored = weight.T.contiguous() if transposed else weight
    axis = 0 if transposed else 1
    indices = _line_case(tuple(stored.shape), axis, 3)
    values = torch.randn(indices.numel(), requires_grad=True)

    def run(grad_dtype, inputs=x):
        return lambda: sparse_delta_linear(inputs, stored, b, indices, values,
                                           transposed=transposed, grad_dtype=grad_dtype,
                                           line_axis=axis)

    low, saved = _saved_dtypes(run(torch.bfloat16))
    assert ((10, 3), torch.bfloat16) in saved and ((10, 3), torch.float32) not in saved
    exact, saved = _saved_dtypes(run(torch.float32))
    assert ((10, 3), torch.float32) in saved and ((10, 3), torch.bfloat16) not in saved
    assert ((10, 3), torch.float32) in _saved_dtypes(run(None))[1]  # auto on float32: exact
    xb = x.detach().bfloat16().requires_grad_()
    assert ((10, 3), torch.bfloat16) in _saved_dtypes(run(None, xb))[1]  # auto on bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 x, bf16 output and GEMM
        autocast, saved = _saved_dtypes(run(None))
    assert autocast.dtype == torch.bfloat16 and ((10, 3), torch.bfloat16) in saved
    torch.testing.assert_close(low, exact, rtol=0, atol=0)
    grad = torch.randn_like(exact)
    (low_grad,) = torch.autograd.grad(low, values, grad)
    (exact_grad,) = torch.autograd.grad(exact, values, grad)
    (autocast_grad,) = torch.autograd.grad(autocast, values, grad.bfloat16())
    assert low_grad.dtype == torch.float32
    left, right = (x, grad) if transposed else (grad, x)
    shape = tuple(stored.shape)
    rounded = _bf16_rounded_grad(left, right.reshape(-1, shape[1]), indices, *shape)
    torch.testing.assert_close(low_grad.double(), rounded, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(autocast_grad, low_grad, rtol=0, atol=0)  # same operands
    full = left.reshape(-1, shape[0]).double().T @ right.reshape(-1, shape[1]).double()
    torch.testing.assert_close(exact_grad.double(), full.view(-1)[indices.long()],
                               rtol=1e-5, atol=1e-5)
    assert not torch.equal(low_grad, exact_grad), "the bf16 GEMM was not used"


def test_a_second_derivative_through_the_op_is_refused():
    """W is patched under no_grad, so the input gradient has no graph to the values: a second
    derivative would silently miss terms, and autograd says so instead."""
    weight, b, indices, values, x = _case(9, 7, 0.3, (4,), True)
    out = sparse_delta_linear(x, weight, b, indices, values)
    (grad_values,) = torch.autograd.grad(out.square().sum(), values, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_values.sum().backward()


@pytest.mark.parametrize("axis", [0, 1])
def test_whole_lines_inside_applied_deltas(axis):
    """The applied block writes whole lines as any entries; gradients stay the line GEMM's."""
    weight, b, _, _, x = _case(13, 11, 0.1, (2, 5), True)
    pretrained = weight.clone()
    indices = _line_case((13, 11), axis, 3)
    values = torch.randn(indices.numel(), dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 13, dtype=torch.float64)
    ref, (rx, rv) = _reference_grads(x, pretrained, b, indices, values, grad)
    with ops.applied_deltas([weight]):
        out = sparse_delta_linear(x, weight, b, indices, values, line_axis=axis)
        gx, gv = torch.autograd.grad(out, (x, values), grad)
    torch.testing.assert_close((out, gx, gv), (ref, rx, rv), rtol=0, atol=1e-12)
    assert torch.equal(weight, pretrained)
