"""Drop-and-regrow on hand-crafted gradients/accumulators, the schedule, and index invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spielft import SpielConfig, get_spiel_model
from spielft.layer import SparseDelta, is_whole_lines, line_positions
from spielft.selection import LineEnergy, reselection_rate, top_outer_product


def _step(opt, selector):
    """One optimizer step followed by the selector, as in the documented training loop."""
    opt.step()
    stats = selector.step()
    opt.zero_grad()
    return stats


def _one_layer(regrowth, k, out_f=3, in_f=4, **overrides):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    fields = dict(num_tunable_weights=k, regrowth=regrowth, reselection_steps=2,
                  accumulation_steps=1, initial_reselection_rate=0.5,
                  full_first_reselection=False)
    fields.update(overrides)
    model = get_spiel_model(base, SpielConfig(**fields))
    delta = model.sparse_deltas()["0"]
    return model, delta


def _three_deltas(regrowth, values, **overrides):
    """A 3 x 4 layer with deltas at flat positions 0, 5, 10 holding ``values``, its zero-lr
    optimizer and its selector."""
    model, delta = _one_layer(regrowth, k=3, **overrides)
    delta.indices.copy_(torch.tensor([0, 5, 10], dtype=delta.indices.dtype))
    with torch.no_grad():
        delta.values.copy_(torch.tensor(values))
    opt = model.create_optimizer(lr=0.0)
    return model, delta, opt, model.create_selector(opt, total_steps=1000)


def _backward_with_weight_grad(model, grad, scaler=None):
    """A loss whose gradient w.r.t. the full weight is exactly ``grad`` (out x in), times
    ``scaler``'s loss scale if given."""
    x = torch.eye(grad.shape[1])
    loss = (model(x) * grad.T).sum()
    (loss if scaler is None else scaler.scale(loss)).backward()


def test_ag_drops_smallest_and_regrows_largest_accumulated_gradient():
    # Index 5 has the smallest |delta|.
    model, delta, opt, selector = _three_deltas("ag", [0.3, -0.01, 0.2])
    # Step 1 is outside the window (update at step 2, window of 1 step).
    _backward_with_weight_grad(model, torch.full((3, 4), 100.0))
    _step(opt, selector)
    assert delta.grad_capture is not None  # window for step 2 armed
    # Step 2: two micro-batches. Position 7 wins the first alone, but 2 wins the sum.
    g1 = torch.zeros(12).index_put((torch.tensor([7, 2, 1]),), torch.tensor([5.0, 4.0, 3.0]))
    g2 = torch.zeros(12).index_put((torch.tensor([2, 7]),), torch.tensor([3.0, -1.0]))
    g2[0] = 50.0  # active positions are never regrown
    g1, g2 = g1.view(3, 4), g2.view(3, 4)
    _backward_with_weight_grad(model, g1)
    _backward_with_weight_grad(model, g2)
    stats = _step(opt, selector)
    assert stats["spiel/indices_changed"] == 1
    assert delta.indices.tolist() == [0, 2, 10]
    # Kept deltas keep their values; the regrown one starts at zero.
    assert delta.values.tolist() == pytest.approx([0.3, 0.0, 0.2])
    assert delta.grad_capture is None  # window closed


def test_ag_window_stores_candidates_as_int32():
    # 8 bytes a candidate (int32 position + float32 sum) while a window is open, not 12.
    model, delta = _one_layer("ag", k=3)
    opt = model.create_optimizer(lr=0.0)
    selector = model.create_selector(opt, total_steps=1000)
    _backward_with_weight_grad(model, torch.ones(3, 4))
    _step(opt, selector)
    _backward_with_weight_grad(model, torch.arange(12.0).view(3, 4))
    acc = selector.accumulators["0"]
    assert acc.candidates.dtype == torch.int32 and acc.grad_sum.dtype == torch.float32
    assert acc.candidates.numel() == 3
    stats = _step(opt, selector)
    assert stats["spiel/indices_changed"] >= 1 and delta.indices.dtype == torch.int32


def _backward_with_scaled_inputs(model, grad, scales):
    """Token j carries only input feature j, at ``scales[j]``: the full weight's gradient is
    ``grad * scales`` (column-wise) and feature j's mean square over the tokens scales[j]**2 / n."""
    x = torch.diag(torch.as_tensor(scales, dtype=torch.float32))
    (model(x) * grad.T).sum().backward()


@pytest.mark.parametrize("normalize, regrown", [(False, 1), (True, 2)])
def test_ag_scores_divided_by_input_rms(normalize, regrown):
    # Position 1 (row 0, column 1) has gradient 3 on an input 10x louder than the others;
    # position 2 has gradient 4. Raw |sum g x| prefers 1 (30 > 4); normalised by the input
    # RMS (10/2 and 1/2) the scores are 6 and 8, and 2 wins.
    model, delta, opt, selector = _three_deltas("ag", [0.3, -0.01, 0.2],
                                                normalize_regrowth_by_input=normalize)
    _backward_with_weight_grad(model, torch.ones(3, 4))
    _step(opt, selector)
    grad = torch.zeros(3, 4)
    grad[0, 1], grad[0, 2] = 3.0, 4.0
    _backward_with_scaled_inputs(model, grad, [1.0, 10.0, 1.0, 1.0])
    acc = selector.accumulators["0"]
    assert (acc.inputs is not None) == normalize
    stats = _step(opt, selector)
    assert stats["spiel/indices_changed"] == 1
    assert delta.indices.tolist() == sorted([0, 10, regrown])


@pytest.mark.parametrize("normalize, regrown", [(False, 9), (True, 4)])
def test_ma_regrows_top_row_times_col_over_input_mean_square(normalize, regrown):
    # Index 10 has the smallest |delta| and is dropped.
    model, delta, opt, selector = _three_deltas("ma", [0.3, 0.2, -0.01],
                                                normalize_regrowth_by_input=normalize)
    _backward_with_weight_grad(model, torch.ones(3, 4))
    _step(opt, selector)
    # MA's window (step 2) needs no dense gradient, only the inputs' mean squares.
    acc = selector.accumulators.get("0")
    assert (acc is not None) == normalize
    _backward_with_scaled_inputs(model, torch.ones(3, 4), [1.0, 3.0, 1.0, 2.0])
    opt.step()
    opt.zero_grad()
    state = opt.state[delta.values]
    state["row_acc"].copy_(torch.tensor([1.0, 3.0, 2.0]))
    state["col_acc"].copy_(torch.tensor([1.0, 4.0, 0.5, 1.0]))
    # Raw row*col: (1,1)=12 is active, next (2,1)=8 -> 9. Normalised, col / ms with
    # ms = [1, 9, 1, 4] / 4 is [4, 1.78, 2, 1]: (1,0)=12 -> 4.
    stats = selector.step()
    assert stats["spiel/indices_changed"] == 1
    assert delta.indices.tolist() == sorted([0, 5, regrown])
    kept = {0: 0.3, 5: 0.2, regrown: 0.0}  # kept deltas keep their values; regrown start at 0
    assert delta.values.tolist() == pytest.approx([kept[i] for i in delta.indices.tolist()])


def test_ma_without_input_statistics_keeps_its_indices(caplog):
    # A matrix with no backward pass in its window has no input statistics: it is skipped
    # (with a warning), not regrown from unnormalised scores.
    model, delta = _one_layer("ma", k=3, normalize_regrowth_by_input=True)
    before = delta.indices.clone()
    opt = model.create_optimizer(lr=0.0)
    selector = model.create_selector(opt, total_steps=1000)
    _backward_with_weight_grad(model, torch.ones(3, 4))
    _step(opt, selector)
    opt.step()
    with caplog.at_level("WARNING"):
        stats = selector.step()
    assert stats["spiel/indices_changed"] == 0 and torch.equal(delta.indices, before)
    assert "had no statistics" in caplog.text


def test_top_outer_product_in_blocks_equals_dense(monkeypatch):
    import spielft.selection as selection

    monkeypatch.setattr(selection, "_SCORE_BLOCK", 7)  # force many blocks
    gen = torch.Generator().manual_seed(1)
    row, col = torch.rand(9, generator=gen), torch.rand(5, generator=gen)
    exclude = torch.tensor([0, 3, 17, 44])
    dense = (row[:, None] * col[None, :]).view(-1).clone()
    dense[exclude] = -math.inf
    expected = set(torch.topk(dense, 6).indices.tolist())
    assert set(top_outer_product(row, col, 6, exclude).tolist()) == expected


def test_full_first_reselection_replaces_the_budget_from_gradients():
    model, delta = _one_layer("ag", k=3, full_first_reselection=True)
    opt = model.create_optimizer(lr=0.0)
    selector = model.create_selector(opt, total_steps=1000)
    grad = torch.arange(12, dtype=torch.float32).view(3, 4)
    for _ in range(2):
        _backward_with_weight_grad(model, grad)
        stats = _step(opt, selector)
    assert stats["spiel/reselection_rate"] == 1.0
    assert delta.indices.tolist() == [9, 10, 11]  # the three largest |grad|, anywhere
    assert selector.rate_at(4) == pytest.approx(0.5 * (1 - 4 / 1000))  # then the schedule


def test_full_first_reselection_keeps_trained_deltas_it_reselects():
    model, delta = _one_layer("ag", k=3, full_first_reselection=True)
    opt = model.create_optimizer(lr=0.1)
    selector = model.create_selector(opt, total_steps=1000)
    grad = torch.zeros(3, 4)
    grad.view(-1)[delta.indices.long()[:2]] = 5.0  # two active positions stay the largest
    grad.view(-1)[0 if 0 not in delta.indices.tolist() else 1] = 1.0
    with torch.no_grad():
        delta.values.copy_(torch.tensor([0.3, -0.2, 0.7]))
    _backward_with_weight_grad(model, grad)
    assert _step(opt, selector) is None
    before = dict(zip(delta.indices.tolist(), delta.values.tolist(), strict=True))
    state_before = dict(zip(delta.indices.tolist(), opt.state[delta.values]["exp_avg"].tolist(),
                            strict=True))
    _backward_with_weight_grad(model, grad)
    stats = _step(opt, selector)
    assert stats["spiel/reselection_rate"] == 1.0
    after = dict(zip(delta.indices.tolist(), delta.values.tolist(), strict=True))
    kept = [i for i in after if i in before]
    assert len(kept) == 2 and stats["spiel/indices_changed"] == 1.0
    for i in kept:  # trained delta (and Adam state) survive; the new position starts at zero
        assert after[i] != 0.0
        assert opt.state[delta.values]["exp_avg"][list(after).index(i)] != 0.0
        assert state_before[i] != 0.0
    (new,) = set(after) - set(before)
    assert after[new] == 0.0


def test_schedules():
    assert reselection_rate(0, 100, 0.2, "linear") == pytest.approx(0.2)
    assert reselection_rate(50, 100, 0.2, "linear") == pytest.approx(0.1)
    assert reselection_rate(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert reselection_rate(25, 100, 0.2, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert reselection_rate(100, 100, 0.2, "linear") == 0.0


def test_no_updates_and_no_captures_after_total_steps():
    model, delta = _one_layer("ag", k=4, reselection_steps=2, accumulation_steps=2)
    opt = model.create_optimizer(lr=1e-2)
    selector = model.create_selector(opt, total_steps=6)
    updates = []
    for _ in range(10):
        _backward_with_weight_grad(model, torch.randn(3, 4))
        stats = _step(opt, selector)
        updates.append(stats is not None)
        if selector.step_count >= 5:
            assert delta.grad_capture is None and not selector.accumulators
    assert updates == [False, True, False, True, False, False, False, False, False, False]


@settings(max_examples=25, deadline=None)
@given(
    regrowth=st.sampled_from(["ag", "ma"]),
    k=st.integers(1, 30),
    rate=st.floats(0.05, 1.0),
    full_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_index_invariants_after_many_updates(regrowth, k, rate, full_first, seed):
    torch.manual_seed(seed)
    model, delta = _one_layer(regrowth, k=k, out_f=5, in_f=7, initial_reselection_rate=rate,
                              full_first_reselection=full_first, seed=seed)
    opt = model.create_optimizer(lr=0.05)
    selector = model.create_selector(opt, total_steps=40)
    for _ in range(30):
        before = delta.indices.long().clone()
        values_before = dict(zip(before.tolist(), delta.values.detach().tolist(), strict=True))
        _backward_with_weight_grad(model, torch.randn(5, 7))
        opt.step()
        values_after_step = dict(zip(before.tolist(), delta.values.detach().tolist(), strict=True))
        stats = selector.step()
        opt.zero_grad()
        idx = delta.indices.long()
        assert idx.numel() == k
        assert (idx[1:] > idx[:-1]).all(), "sorted and unique"
        assert idx.min() >= 0 and idx.max() < 35
        if stats is not None and stats["spiel/reselection_rate"] < 1.0:
            kept = set(before.tolist()) & set(idx.tolist())
            new = set(idx.tolist()) - set(before.tolist())
            for pos, value in zip(idx.tolist(), delta.values.detach().tolist(), strict=True):
                if pos in new:
                    assert value == 0.0
                else:
                    assert value == pytest.approx(values_after_step[pos])
            assert len(new) == int(stats["spiel/indices_changed"])
            assert not (new & kept)
        del values_before


def test_first_reselection_step_moves_the_first_update_and_its_window():
    model, delta = _one_layer("ag", k=4, reselection_steps=4, accumulation_steps=2,
                              first_reselection_step=1, full_first_reselection=True)
    opt = model.create_optimizer(lr=1e-2)
    selector = model.create_selector(opt, total_steps=14)
    assert [selector.next_update_step(s) for s in (0, 1, 4, 5, 8, 9)] == [1, 5, 5, 9, 9, 13]
    assert delta.grad_capture is not None  # the window of the step-1 update opens at once
    updates = []
    for _ in range(14):
        _backward_with_weight_grad(model, torch.randn(3, 4))
        stats = _step(opt, selector)
        if stats is not None:
            updates.append((selector.step_count, stats["spiel/reselection_rate"]))
    assert [s for s, _ in updates] == [1, 5, 9, 13]
    assert updates[0][1] == 1.0 and updates[1][1] == pytest.approx(0.5 * (1 - 5 / 14))


@pytest.mark.parametrize("bad", [0, -2, True])
def test_first_reselection_step_must_be_positive(bad):
    with pytest.raises(ValueError, match="first_reselection_step"):
        SpielConfig(first_reselection_step=bad)


def test_seeded_moments_are_the_mean_over_a_first_window_cut_short():
    model, delta = _one_layer("ag", k=3, reselection_steps=4, accumulation_steps=3,
                              first_reselection_step=1, full_first_reselection=True,
                              ag_seed_optimizer_state=True)
    opt = model.create_optimizer(lr=0.0)
    selector = model.create_selector(opt, total_steps=100)
    grad = torch.arange(12, dtype=torch.float32).view(3, 4)
    _backward_with_weight_grad(model, grad)
    assert _step(opt, selector)["spiel/reselection_rate"] == 1.0
    assert delta.indices.tolist() == [9, 10, 11]
    # One step was accumulated, not accumulation_steps=3: the mean is the gradient itself.
    assert opt.state[delta.values]["exp_avg"].tolist() == pytest.approx([9.0, 10.0, 11.0])


# -- optimizer wrappers, accelerate, fp16 loss scaling ----------------------------------------------
def test_selector_refuses_an_optimizer_without_reindex():
    model, _ = _one_layer("ag", k=3)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"AdamW.*model\.create_optimizer\(\)"):
        model.create_selector(plain, total_steps=10)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_selector_under_accelerate_counts_optimizer_steps_not_micro_batches(
    fresh_accelerate_state, regrowth
):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, _ = _one_layer(regrowth, k=3, normalize_regrowth_by_input=False)
    prepared, opt = accelerator.prepare(model, model.create_optimizer(lr=1e-2))
    selector = model.create_selector(opt, total_steps=10)  # the AcceleratedOptimizer itself
    assert selector.optimizer is opt.optimizer
    updates = []
    for micro in range(8):  # 4 optimizer steps: updates at steps 2 and 4
        with accelerator.accumulate(prepared):
            prepared(torch.randn(5, 4)).square().sum().backward()
            opt.step()
            if selector.step() is not None:
                updates.append(micro)
            opt.zero_grad()
    assert selector.step_count == 4 and updates == [3, 7]  # micro-batches 3, 7: steps 2, 4


def test_ag_sums_are_unscaled_and_drop_overflowed_micro_batches():
    model, delta, opt, selector = _three_deltas("ag", [0.3, -0.01, 0.2],
                                                ag_seed_optimizer_state=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    selector.grad_scaler = scaler

    def step():
        scaler.step(opt)  # skipped after an overflow, as the selector's sums skip it
        scaler.update()
        opt.zero_grad()
        return selector.step()

    _backward_with_weight_grad(model, torch.ones(3, 4), scaler)
    step()  # step 1: outside the window
    overflow = torch.zeros(3, 4)
    overflow[1, 3] = float("inf")
    _backward_with_weight_grad(model, overflow, scaler)  # the window's first micro-batch overflows
    assert not selector.accumulators["0"].started  # no candidates picked from inf/NaN
    g = torch.zeros(12).index_put((torch.tensor([7, 2]),), torch.tensor([5.0, -4.0])).view(3, 4)
    _backward_with_weight_grad(model, g, scaler)
    nan = torch.zeros(3, 4)
    nan[0, 1] = float("nan")
    _backward_with_weight_grad(model, nan, scaler)  # a later overflow: dropped, not summed
    acc = selector.accumulators["0"]
    sums = dict(zip(acc.candidates.tolist(), acc.grad_sum.tolist(), strict=True))
    assert sums[7] == pytest.approx(5.0) and sums[2] == pytest.approx(-4.0)  # unscaled
    assert all(math.isfinite(v) for v in sums.values())
    stats = step()
    assert stats["spiel/indices_changed"] == 1 and delta.indices.tolist() == [0, 7, 10]
    # Seeded moments: the unscaled mean gradient, not 1024 times it.
    slot = delta.indices.tolist().index(7)
    assert opt.state[delta.values]["exp_avg"][slot].item() == pytest.approx(5.0)


# -- whole lines (SpielConfig.structure) ----------------------------------------------------------


def _lines_layer(regrowth, structure, lines, values, out_f=5, in_f=4, **overrides):
    """A layer whose delta holds the given whole ``lines`` with ``values`` (by line), a
    zero-lr optimizer and a selector dropping one of two lines at step 2."""
    axis = 0 if structure == "rows" else 1
    width = in_f if axis == 0 else out_f
    model, delta = _one_layer(regrowth, k=len(lines) * width, out_f=out_f, in_f=in_f,
                              structure=structure, initial_reselection_rate=0.6, **overrides)
    positions = line_positions(torch.tensor(lines), (out_f, in_f), axis)
    delta.indices.copy_(positions.to(delta.indices.dtype))
    with torch.no_grad():
        delta.values_by_line().copy_(torch.tensor(values).view(len(lines), 1).expand(-1, width))
    opt = model.create_optimizer(lr=0.0)
    return model, delta, opt, model.create_selector(opt, total_steps=1000)


@pytest.mark.parametrize("seeded", [False, True])
def test_ag_rows_drop_the_weakest_row_and_regrow_the_largest_summed_gradient(seeded):
    # Rows 0 and 3 active; row 3's deltas are smaller, so it goes.
    model, delta, opt, selector = _lines_layer("ag", "rows", [0, 3], [0.3, 0.01],
                                               ag_seed_optimizer_state=seeded)
    _backward_with_weight_grad(model, torch.ones(5, 4))
    _step(opt, selector)
    # Row 1 wins the first micro-batch, row 4 the window's sum; row 0 (active) is ignored.
    g1, g2 = torch.zeros(5, 4), torch.zeros(5, 4)
    g1[1], g1[4], g1[2] = 5.0, 4.0, 0.5
    g2[1], g2[4], g2[0] = -4.0, 3.0, 100.0
    _backward_with_weight_grad(model, g1)
    _backward_with_weight_grad(model, g2)
    assert selector.accumulators["0"].grad_sum.shape == (2, 4)  # whole candidate lines
    stats = _step(opt, selector)
    assert stats["spiel/indices_changed"] == 4  # one row of 4 entries
    assert delta.lines().tolist() == [0, 4]
    assert delta.values_by_line()[:, 0].tolist() == pytest.approx([0.3, 0.0])
    exp_avg = opt.state[delta.values]["exp_avg"].view(2, 4)  # row 0's slots, then row 4's
    if seeded:  # the regrown row's moments start at its window's mean gradient: 4 + 3
        assert exp_avg[1].tolist() == pytest.approx([7.0] * 4)
    else:
        assert exp_avg[1].tolist() == [0.0] * 4
    assert exp_avg[0].abs().sum() > 0  # the kept row keeps its state


@pytest.mark.parametrize("normalize, regrown", [(False, 1), (True, 3)])
def test_ma_columns_regrow_the_largest_squared_gradient_over_input_mean_square(normalize, regrown):
    model, delta, opt, selector = _lines_layer(
        "ma", "columns", [0, 2], [0.01, 0.3], out_f=3, normalize_regrowth_by_input=normalize
    )
    _backward_with_weight_grad(model, torch.ones(3, 4))
    _step(opt, selector)
    assert isinstance(selector.accumulators["0"], LineEnergy)  # not SM3's accumulators
    # Column 1's gradient is 1 on an input 10x louder, column 3's is 3: raw energies 300 and
    # 27, over the inputs' mean squares (100 and 1, / 4 tokens) 4 and 36. Column 0 goes.
    grad = torch.zeros(3, 4)
    grad[:, 1], grad[:, 3] = 1.0, 3.0
    _backward_with_scaled_inputs(model, grad, [1.0, 10.0, 1.0, 1.0])
    stats = _step(opt, selector)
    assert stats["spiel/indices_changed"] == 3
    assert delta.lines().tolist() == sorted([2, regrown])
    kept = {2: 0.3, regrown: 0.0}
    assert delta.values_by_line()[:, 0].tolist() == pytest.approx(
        [kept[line] for line in delta.lines().tolist()]
    )


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("normalize", [False, True])
def test_line_energy_estimates_each_lines_squared_gradient(axis, normalize):
    """The random projections are unbiased: with many probes they give ||G_line||^2."""
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(64, 6, generator=gen), torch.randn(64, 5, generator=gen)
    grad = left.T @ right  # the stored (6, 5) weight's gradient
    input_ms = torch.rand(1, 5, generator=gen) + 0.5 if normalize else None
    delta = SparseDelta((6, 5), line_positions(torch.tensor([0]), (6, 5), axis), line_axis=axis)
    energy = LineEnergy(delta, normalize, seed=1, probes=20_000)
    energy(None, input_ms, (left, right))
    energy(None, input_ms, (left, right))  # summed over the window
    scaled = grad if input_ms is None else grad / input_ms.sqrt()
    exact = 2 * scaled.square().sum(1 - axis)
    torch.testing.assert_close(energy.scores(), exact, rtol=0.05, atol=0)


@pytest.mark.parametrize("axis", [0, 1])
def test_line_energies_are_unscaled_and_drop_overflowed_backwards(axis):
    """Under a GradScaler the factors carry the loss scale: energies divide it out, and a
    backward that overflowed adds nothing (the scaler skips that step too)."""
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(16, 6, generator=gen), torch.randn(16, 5, generator=gen)
    delta = SparseDelta((6, 5), line_positions(torch.tensor([0]), (6, 5), axis), line_axis=axis)
    plain = LineEnergy(delta, normalize=False, seed=3)
    plain(None, None, (left, right))
    scale = torch.tensor(1024.0)
    scaled = LineEnergy(delta, normalize=False, seed=3, loss_scale=lambda: scale)
    scaled(None, None, (left * 32, right * 32))  # the gradient left.T @ right, times 1024
    overflow = left.clone()
    overflow[0, 0] = float("inf")
    scaled(None, None, (overflow, right))
    torch.testing.assert_close(scaled.scores(), plain.scores())


@pytest.mark.parametrize("structure", ["rows", "columns"])
def test_a_full_reselection_regrowing_fewer_lines_keeps_each_line_once(structure):
    """If a full reselection finds fewer lines than the budget (non-finite scores), the
    active lines it regrew keep their deltas and the rest of the budget is filled from the
    other active lines by norm, never the same line twice."""
    _, delta, _, selector = _lines_layer("ag", structure, [0, 3], [0.01, 0.3], out_f=5)
    changed = selector._reassign(delta, torch.tensor([3]), None)  # line 3 alone, already active
    assert changed == 0 and delta.lines().tolist() == [0, 3]
    assert delta.values_by_line()[:, 0].tolist() == pytest.approx([0.01, 0.3])


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
@pytest.mark.parametrize("structure", ["rows", "columns"])
@pytest.mark.parametrize("full_first", [False, True])
def test_whole_lines_stay_whole_lines_through_updates(regrowth, structure, full_first):
    axis = 0 if structure == "rows" else 1
    model, delta = _one_layer(regrowth, k=14, out_f=6, in_f=7, structure=structure,
                              initial_reselection_rate=0.6, full_first_reselection=full_first,
                              ag_seed_optimizer_state=regrowth == "ag")
    opt = model.create_optimizer(lr=0.05)
    selector = model.create_selector(opt, total_steps=40)
    changed = 0
    for _ in range(20):
        before = delta.lines().tolist()
        _backward_with_weight_grad(model, torch.randn(6, 7))
        opt.step()
        kept_values = {line: row.clone() for line, row in
                       zip(before, delta.values_by_line().detach(), strict=True)}
        stats = selector.step()
        opt.zero_grad()
        assert is_whole_lines(delta.indices, (6, 7), axis)
        lines = delta.lines().tolist()
        assert delta.values.numel() == len(lines) * (7 if axis == 0 else 6)
        if stats is not None:
            changed += stats["spiel/indices_changed"]
            if stats["spiel/reselection_rate"] < 1.0:
                for line, row in zip(lines, delta.values_by_line().detach(), strict=True):
                    expected = kept_values.get(line, torch.zeros_like(row))
                    torch.testing.assert_close(row, expected)
    assert changed > 0
