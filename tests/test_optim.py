"""SparseAdamW and SM3: updates against hand-written references, and state remapping."""

import pytest
import torch
from torch import nn

from spielft import SM3, SparseAdamW
from spielft.layer import SparseDelta, line_positions


def test_sparse_adamw_matches_torch_adamw_in_float32():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(10))
    b = nn.Parameter(a.detach().clone())
    ours = SparseAdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)


def test_bf16_deltas_keep_float32_state():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = SparseAdamW([p], lr=1e-3)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert p.dtype == torch.bfloat16 and (p != 0).all()


def test_sparse_adamw_reindex_moves_state_with_slots():
    p = nn.Parameter(torch.zeros(4))
    opt = SparseAdamW([p], lr=1e-3)
    p.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt.step()
    old = opt.state[p]["exp_avg"].clone()
    source = torch.tensor([2, -1, 0, -1])
    opt.reindex(p, source, {"exp_avg": torch.tensor([0.0, 9.0, 0.0, 7.0])})
    new = opt.state[p]["exp_avg"]
    assert new.tolist() == [old[2].item(), 9.0, old[0].item(), 7.0]
    assert opt.state[p]["exp_avg_sq"][1] == 0.0


def _reference_sm3(values, grads, rows, cols, shape, lr):
    row_acc, col_acc = torch.zeros(shape[0]), torch.zeros(shape[1])
    v = values.clone()
    for g in grads:
        nu = torch.stack([torch.minimum(row_acc[r], col_acc[c]) for r, c in zip(rows, cols, strict=True)]) + g * g
        new_row, new_col = row_acc.clone(), col_acc.clone()
        for r in set(rows.tolist()):
            new_row[r] = nu[rows == r].max()
        for c in set(cols.tolist()):
            new_col[c] = nu[cols == c].max()
        row_acc, col_acc = new_row, new_col
        v = v - lr * g / nu.sqrt()
    return v, row_acc, col_acc


def test_sm3_matches_reference_and_uses_row_col_memory():
    shape = (4, 5)
    delta = SparseDelta(shape, torch.tensor([0, 3, 6, 7, 19]))
    opt = SM3([delta.values], lr=0.1, sparse_deltas={delta.values: delta})
    grads = [torch.randn(5) for _ in range(3)]
    for g in grads:
        delta.values.grad = g.clone()
        opt.step()
    idx = delta.indices.long()
    ref_v, ref_row, ref_col = _reference_sm3(torch.zeros(5), grads, idx // 5, idx % 5, shape, 0.1)
    torch.testing.assert_close(delta.values.detach(), ref_v)
    row, col = opt.row_col_scores(delta.values)
    torch.testing.assert_close(row, ref_row)
    torch.testing.assert_close(col, ref_col)
    assert set(opt.state[delta.values]) == {"row_acc", "col_acc"}  # O(rows + cols)


def test_sm3_covered_rows_and_cols_are_replaced_and_the_others_kept():
    # After a reselection the accumulators hold older, larger maxima: a covered row/column
    # becomes the max of its new nu (which may be lower), an uncovered one keeps its value.
    delta = SparseDelta((3, 4), torch.tensor([0, 5]))  # (0, 0) and (1, 1)
    opt = SM3([delta.values], lr=0.1, sparse_deltas={delta.values: delta})
    delta.values.grad = torch.ones(2)
    opt.step()
    row, col = opt.row_col_scores(delta.values)
    row.copy_(torch.tensor([9.0, 0.5, 7.0]))
    col.copy_(torch.tensor([0.25, 8.0, 6.0, 5.0]))
    delta.values.grad = torch.tensor([1.0, 2.0])
    opt.step()
    # nu(0, 0) = min(9, 0.25) + 1 = 1.25; nu(1, 1) = min(0.5, 8) + 4 = 4.5
    torch.testing.assert_close(row, torch.tensor([1.25, 4.5, 7.0]))
    torch.testing.assert_close(col, torch.tensor([1.25, 4.5, 6.0, 5.0]))


@pytest.mark.parametrize("axis", [0, 1])
def test_sm3_on_whole_lines_equals_the_general_path(axis):
    """The dense per-line reductions give what the gathers and scatters give, bit for bit."""
    shape = (5, 7)
    indices = line_positions(torch.tensor([1, 3, 4]), shape, axis)
    lines, plain = SparseDelta(shape, indices, line_axis=axis), SparseDelta(shape, indices)
    opts = [SM3([d.values], lr=0.1, sparse_deltas={d.values: d}) for d in (lines, plain)]
    for opt in opts:  # old maxima, some larger than the new nu: covered ones are replaced
        opt.state[opt.param_groups[0]["params"][0]].update(
            row_acc=torch.arange(5.0), col_acc=torch.arange(7.0).flip(0)
        )
    for _ in range(3):
        g = torch.randn(indices.numel())
        for d, opt in zip((lines, plain), opts, strict=True):
            d.values.grad = g.clone()
            opt.step()
    assert torch.equal(lines.values, plain.values)
    for got, want in zip(opts[0].row_col_scores(lines.values),
                         opts[1].row_col_scores(plain.values), strict=True):
        assert torch.equal(got, want)


def test_sm3_momentum_buffer_remapped():
    delta = SparseDelta((3, 3), torch.tensor([0, 4, 8]))
    opt = SM3([delta.values], lr=0.1, momentum=0.9, sparse_deltas={delta.values: delta})
    delta.values.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    buf = opt.state[delta.values]["momentum_buffer"].clone()
    opt.reindex(delta.values, torch.tensor([-1, 2, 1]))
    assert opt.state[delta.values]["momentum_buffer"].tolist() == [0.0, buf[2].item(), buf[1].item()]


def test_state_dict_round_trip_keeps_float32_state_for_bf16_deltas():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = SparseAdamW([p], lr=1e-3)
    p.grad = torch.tensor([1e-3, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    fresh = SparseAdamW([p], lr=1e-3)
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[p][key].dtype == torch.float32
        assert torch.equal(fresh.state[p][key], opt.state[p][key])
