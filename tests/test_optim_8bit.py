"""SparseAdamW8bit: blockwise 8-bit Adam moments for sparse deltas, remapped on regrowth."""

import pytest
import torch
from torch import nn

from spielft import SparseAdamW, SpielConfig, get_spiel_model
from spielft.optim import (
    SparseAdamW8bit,
    dequantize_blockwise_8bit,
    quantize_blockwise_8bit,
)
from tiny_models import tiny_llama, train_steps

bnbf = pytest.importorskip("bitsandbytes.functional")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_8bit_roundtrip_is_nearest_and_bnb_compatible(signed):
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    x = x if signed else x.abs()
    x[:300] = 0.0  # a whole zero block and zeros inside a nonzero block
    codes, absmax = quantize_blockwise_8bit(x, signed, 256)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (4,)
    y = dequantize_blockwise_8bit(codes, absmax, signed, 256)
    assert torch.equal(y[:300], torch.zeros(300))  # zero stays exactly zero
    # nearest map entry: no other code is closer to x / absmax
    code = bnbf.create_dynamic_map(signed=signed)
    scale = absmax.repeat_interleave(256)[:1000].clamp_min(1e-30)
    best = (x / scale)[:, None].sub(code[None]).abs().min(dim=1).values
    torch.testing.assert_close(((y - x) / scale).abs(), best, rtol=0, atol=1e-6)
    # same format as bitsandbytes' blockwise quantization
    theirs = bnbf.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=256)
    torch.testing.assert_close(theirs, y)


def _params(seed=0, n=700):
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(n) * 0.1)


def _grads(step, n=700):
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + step)) * 0.01


def test_8bit_adamw_tracks_the_float32_one_and_stores_uint8_state():
    p32, p8 = _params(), _params()
    opt32 = SparseAdamW([p32], lr=1e-2, weight_decay=0.1)
    opt8 = SparseAdamW8bit([p8], lr=1e-2, weight_decay=0.1)
    for step in range(20):
        p32.grad = _grads(step)
        p8.grad = _grads(step)
        opt32.step()
        opt8.step()
    state = opt8.state[p8]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg_absmax"].numel() == 3  # ceil(700 / 256)
    moments = opt8.moments(p8)
    ref = opt32.state[p32]
    for key in ("exp_avg", "exp_avg_sq"):
        err = (moments[key] - ref[key]).abs().max() / ref[key].abs().max()
        assert err < 0.05, (key, err)
    moved = (p32 - _params()).detach()
    assert (p8 - p32).abs().max() < 0.1 * moved.abs().max()
    assert not torch.equal(p8, p32)  # it really is a different (quantized) state


def test_8bit_reindex_remaps_state_dequantize_remap_requantize():
    p = _params()
    opt = SparseAdamW8bit([p], lr=1e-2)
    for step in range(5):
        p.grad = _grads(step)
        opt.step()
    old = opt.moments(p)
    gen = torch.Generator().manual_seed(7)
    source = torch.randperm(700, generator=gen)
    source[::7] = -1  # regrown slots
    seeds = {"exp_avg": torch.full((700,), 0.0), "exp_avg_sq": torch.zeros(700)}
    regrown = source < 0
    seeds["exp_avg"][regrown] = 1e-3
    seeds["exp_avg_sq"][regrown] = 4e-6
    opt.reindex(p, source, seeds)
    new = opt.moments(p)
    assert opt.state[p]["exp_avg"].dtype == torch.uint8
    kept = ~regrown
    for key in ("exp_avg", "exp_avg_sq"):
        scale = old[key].abs().max()
        err = (new[key][kept] - old[key][source[kept]]).abs().max()
        assert err < 0.02 * scale, (key, err / scale)
        # a wrong permutation (e.g. identity) would be far off
        assert (new[key][kept] - old[key][kept]).abs().max() > 0.1 * scale
    torch.testing.assert_close(new["exp_avg"][regrown], seeds["exp_avg"][regrown], rtol=0.05,
                               atol=0)
    torch.testing.assert_close(new["exp_avg_sq"][regrown], seeds["exp_avg_sq"][regrown],
                               rtol=0.05, atol=0)
    opt.reindex(p, source)  # no seeds: regrown slots restart at exactly zero
    again = opt.moments(p)
    assert torch.equal(again["exp_avg"][regrown], torch.zeros(int(regrown.sum())))
    assert torch.equal(again["exp_avg_sq"][regrown], torch.zeros(int(regrown.sum())))
    p.grad = _grads(9)
    opt.step()  # still steps after a remap
    assert torch.isfinite(p).all()


def _config():
    return SpielConfig(density=0.05, reselection_steps=5, accumulation_steps=2,
                       ag_seed_optimizer_state=True)


def _train(optim_bits, steps=30):
    spiel = get_spiel_model(tiny_llama(), _config())
    optimizer = spiel.create_optimizer(lr=2e-2, optim_bits=optim_bits)
    selector = spiel.create_selector(optimizer, total_steps=steps)
    data = torch.randint(128, (8, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    original = optimizer.reindex
    optimizer.reindex = lambda *a, **k: (calls.append(a[1]), original(*a, **k))[1]
    losses = train_steps(spiel, optimizer, selector, data, steps)
    return optimizer, losses, calls


def test_create_optimizer_optim_bits_and_training_with_regrowth():
    spiel = get_spiel_model(tiny_llama(), _config())
    assert type(spiel.create_optimizer()) is SparseAdamW
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32"):
        spiel.create_optimizer(optim_bits=4)
    ma = get_spiel_model(tiny_llama(), SpielConfig(regrowth="ma"))
    with pytest.raises(ValueError, match="SM3"):
        ma.create_optimizer(optim_bits=8)
    optimizer, losses, calls = _train(8)
    assert type(optimizer) is SparseAdamW8bit
    assert calls and any((c < 0).any() for c in calls)  # regrowth remapped the 8-bit state
    assert all(s["exp_avg"].dtype == torch.uint8 for s in optimizer.state.values())
    _, losses32, _ = _train(32)
    end, end32 = sum(losses[-5:]) / 5, sum(losses32[-5:]) / 5
    assert end < 0.95 * losses[0], losses  # it learns (despite the full reselection at step 5)
    assert abs(end - end32) < 0.1 * (losses[0] - end32), (end, end32)  # ...as fp32 Adam does


def test_8bit_state_resumes_with_its_own_block_size(tmp_path):
    """A checkpoint's codes decode with the block size they were made with, whatever the new one."""
    p = _params()
    opt = SparseAdamW8bit([p], lr=1e-2, block_size=64)
    for step in range(3):
        p.grad = _grads(step)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed = SparseAdamW8bit([p], lr=1e-2, block_size=256)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert resumed.block_size == 64 and resumed.param_groups[0]["block_size"] == 64
    for key, value in opt.moments(p).items():
        assert torch.equal(resumed.moments(p)[key], value)
