"""Sparse deltas on bitsandbytes 4-bit (NF4/FP4) and 8-bit bases, on the CPU."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from torch import nn  # noqa: E402

from spielft import SpielConfig, SpielModel, get_spiel_model  # noqa: E402
from spielft.layer import (  # noqa: E402
    SparseDelta,
    SpielLinear,
    SpielLinear4bit,
    SpielLinear8bit,
    random_indices,
    wrap_module,
)
from spielft.model import find_target_modules  # noqa: E402
from tiny_models import tiny_llama, train_steps  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def to_4bit(linear, quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant,
                          quant_type=quant_type)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")  # quantizes


def to_8bit(linear):
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                            bias=linear.bias is not None, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")


def quantize_model(model, kind="4bit", **kwargs):
    """Replace every nn.Linear but the head by its bitsandbytes counterpart."""
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head:
            parent, _, child = name.rpartition(".")
            new = to_4bit(module, **kwargs) if kind == "4bit" else to_8bit(module)
            setattr(model.get_submodule(parent), child, new)
    return model


def quantized_llama(seed=0, kind="4bit", **kwargs):
    return quantize_model(tiny_llama(seed), kind, **kwargs)


def _batch(seed, batch=4, length=16):
    return torch.randint(128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _add_random_delta(layer, k, seed=0, scale=0.05):
    rows, cols = layer.weight_shape
    gen = torch.Generator().manual_seed(seed)
    delta = SparseDelta((rows, cols), random_indices(rows * cols, k, gen))
    with torch.no_grad():
        delta.values.copy_(scale * torch.randn(k, generator=gen))
    layer.add_delta("a", delta)
    layer.set_adapter(["a"])
    return delta


def _snapshot(q):
    w = q.weight
    state = getattr(w, "quant_state", None)
    parts = [w.data.clone()]
    if state is not None:
        parts.append(state.absmax.clone())
    else:
        parts.append(w.SCB.clone() if w.SCB is not None else q.state.SCB.clone())
    return parts


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_forward_and_gradients_match_dequantized_reference(quant_type, double_quant,
                                                               compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    q = to_4bit(linear, quant_type, double_quant, compute_dtype)
    layer = wrap_module(q)
    assert isinstance(layer, SpielLinear4bit)
    before = _snapshot(q)
    delta = _add_random_delta(layer, 400)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float32
    g = torch.randn_like(out)
    out.backward(g)
    # reference: dequantized W in the compute dtype, delta added there, computed in float64
    w = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).to(compute_dtype)
    flat = w.view(-1).clone()
    idx = delta.indices.long()
    flat[idx] = (flat[idx].float() + delta.values.detach()).to(compute_dtype)
    w_ref = flat.view(96, 64).double()
    x_ref = x.detach().to(compute_dtype).double().requires_grad_(True)
    dense = torch.zeros(96 * 64, dtype=torch.float64, requires_grad=True)
    ref = x_ref @ (w_ref + dense.view(96, 64)).T + q.bias.detach().to(compute_dtype).double()
    ref.backward(g.to(compute_dtype).double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if compute_dtype == torch.float32 else \
        {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **tol)
    torch.testing.assert_close(delta.values.grad.double(), dense.grad[idx], **tol)
    assert delta.values.grad.abs().sum() > 0
    assert _same(before, _snapshot(q))  # the quantized weight was never modified
    # without deltas the layer is exactly bitsandbytes' own forward
    with torch.no_grad():
        layer.disable_adapters = True
        assert torch.equal(layer(x), q(x))
        layer.disable_adapters = False
        delta.values.zero_()
        torch.testing.assert_close(layer(x), q(x), rtol=0, atol=0)


def test_8bit_forward_and_gradients_match_dequantized_reference():
    torch.manual_seed(1)
    linear = nn.Linear(64, 96)
    q = to_8bit(linear)
    assert q.weight.dtype == torch.int8
    layer = wrap_module(q)
    assert isinstance(layer, SpielLinear8bit)
    before = _snapshot(q)
    with torch.no_grad():
        plain = q(torch.randn(2, 64))  # a bnb forward moves CB/SCB into q.state
    assert plain.shape == (2, 96)
    delta = _add_random_delta(layer, 500)
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    scb = q.weight.SCB if q.weight.SCB is not None else q.state.SCB
    w = (q.weight.data.double() * scb.double()[:, None] / 127).view(-1)
    idx = delta.indices.long()
    w_ref = w.clone()
    w_ref[idx] += delta.values.detach().double()
    dense = torch.zeros(96 * 64, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    ref = x_ref @ (w_ref + dense).view(96, 64).T + q.bias.detach().double()
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.values.grad.double(), dense.grad[idx], rtol=1e-5, atol=1e-5)
    assert _same(before, _snapshot(q))
    # the dequantized weight is the one bitsandbytes computes with (it also quantizes x)
    with torch.no_grad():
        delta.values.zero_()
        err = (layer(x) - q(x)).abs().max() / q(x).abs().max()
    assert err < 0.03


def test_wrap_dispatch_merge_refusal_and_trainable_count(capsys):
    linear = nn.Linear(64, 32)
    assert type(wrap_module(linear)) is SpielLinear
    assert type(wrap_module(to_4bit(linear))) is SpielLinear4bit
    assert type(wrap_module(to_8bit(linear))) is SpielLinear8bit
    n_full = sum(p.numel() for p in tiny_llama().parameters())
    spiel = get_spiel_model(quantized_llama(), SpielConfig(num_tunable_weights=500))
    names = set(spiel.spiel_layers())
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert all(isinstance(m, SpielLinear4bit) for m in spiel.spiel_layers().values())
    trainable, total = spiel.get_nb_trainable_parameters()
    assert trainable == 500
    assert total == n_full + 500  # a packed 4-bit weight counts 2 parameters per byte
    spiel.print_trainable_parameters()
    assert f"all params: {n_full + 500:,d}" in capsys.readouterr().out
    layer = next(iter(spiel.spiel_layers().values()))
    with pytest.raises(TypeError, match="quantized"):
        layer.merge()
    with pytest.raises(TypeError, match="dequantize=True"):
        spiel.merge_and_unload()
    # mixed 8-bit model: default targeting picks Linear8bitLt too
    targets = find_target_modules(quantized_llama(kind="8bit"), SpielConfig())
    assert len(targets) == 14 and all(isinstance(m, bnb.nn.Linear8bitLt) for m in targets.values())


def test_merge_with_some_quantized_layers_merges_nothing():
    model = tiny_llama()
    for block in model.model.layers:  # a quantized MLP, full-precision attention
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.mlp, name, to_4bit(getattr(block.mlp, name)))
    spiel = get_spiel_model(model, SpielConfig(density=0.05))
    with pytest.raises(TypeError, match=r"6 targeted layers are quantized .* Nothing was merged"):
        spiel.merge()
    assert not any(layer.merged_adapters for layer in spiel.spiel_layers().values())


def _train(spiel, steps, lr, seed=0):
    optimizer = spiel.create_optimizer(lr=lr)
    selector = spiel.create_selector(optimizer, total_steps=steps)
    data = _batch(seed, batch=8)
    losses = train_steps(spiel, optimizer, selector, data, steps)
    spiel.eval()
    return losses


@pytest.mark.parametrize(("regrowth", "lr"), [("ag", 2e-2), ("ma", 5e-2)])
def test_tiny_quantized_llama_trains(regrowth, lr):
    model = quantized_llama(compute_dtype=torch.bfloat16)
    snapshots = [_snapshot(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    spiel = get_spiel_model(model, SpielConfig(density=0.05, regrowth=regrowth,
                                               reselection_steps=10, accumulation_steps=2))
    before = [d.indices.clone() for d in spiel.sparse_deltas().values()]
    losses = _train(spiel, 50, lr)
    # losses[0] is the base model's (deltas start at zero)
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    after = [d.indices for d in spiel.sparse_deltas().values()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    layers = [layer.base_layer for layer in spiel.spiel_layers().values()]
    assert all(_same(s, _snapshot(q)) for s, q in zip(snapshots, layers, strict=True))


def _delta_grads(spiel, data):
    spiel.zero_grad()
    spiel(input_ids=data, labels=data).loss.backward()
    return {n: d.values.grad.clone() for n, d in spiel.sparse_deltas().items()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("quantized", [False, True])
def test_gradient_checkpointing_gives_the_same_delta_gradients(quantized):
    model = quantized_llama() if quantized else tiny_llama()
    spiel = get_spiel_model(model, SpielConfig(density=0.05))
    with torch.no_grad():
        for delta in spiel.sparse_deltas().values():
            delta.values.normal_(0, 0.02)
    spiel.train()
    data = _batch(3)
    plain = _delta_grads(spiel, data)
    spiel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert spiel.base_model.model.gradient_checkpointing
    checkpointed = _delta_grads(spiel, data)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_save_load_and_dequantized_merge_of_an_adapter_on_a_4bit_base(tmp_path, compute_dtype):
    spiel = get_spiel_model(quantized_llama(compute_dtype=compute_dtype),
                            SpielConfig(density=0.05, reselection_steps=5, accumulation_steps=2))
    _train(spiel, 12, 2e-2)
    probe = _batch(7)
    with torch.no_grad():
        logits = spiel(input_ids=probe).logits
        with spiel.disable_adapter():
            base_logits = spiel(input_ids=probe).logits
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter does something
    spiel.save_pretrained(tmp_path)
    reloaded = SpielModel.from_pretrained(quantized_llama(compute_dtype=compute_dtype), tmp_path)
    assert all(isinstance(m, SpielLinear4bit) for m in reloaded.spiel_layers().values())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, logits)
    # fp32 compute: stored in the compute dtype; bf16 compute in an fp32 model: store in fp32
    dtype = torch.float32
    merged = reloaded.merge_and_unload(dequantize=True, dtype=dtype)
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == dtype for m in linears)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    if compute_dtype == torch.float32:
        torch.testing.assert_close(merged_logits, logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(merged_logits, logits, rtol=0.05, atol=0.05)
    # the merged weights are dequantized W + delta: far from the base model's
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)


def test_dequantized_merge_with_8bit_layers_and_untargeted_quantized_layers():
    model = quantized_llama(kind="8bit")
    spiel = get_spiel_model(model, SpielConfig(density=0.05, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for delta in spiel.sparse_deltas().values():
            delta.values.normal_(0, 0.05)
    probe = _batch(8)
    with torch.no_grad():
        q_out = {}
        hooks = [
            spiel.base_model.model.layers[0].self_attn.q_proj.register_forward_hook(
                lambda m, i, o: q_out.setdefault("spiel", o)
            )
        ]
        spiel(input_ids=probe)
        merged = spiel.merge_and_unload(dequantize=True)
        hooks.append(merged.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda m, i, o: q_out.setdefault("merged", o)))
        merged(input_ids=probe)
    for h in hooks:
        h.remove()
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in merged.modules())  # untargeted too
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(q_out["merged"], q_out["spiel"], rtol=1e-5, atol=1e-5)


def test_dequantized_merge_of_a_from_pretrained_4bit_model_saves_as_plain_floats(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        dtype=torch.float32,
    )
    spiel = get_spiel_model(quantized, SpielConfig(density=0.05))
    for delta in spiel.sparse_deltas().values():
        with torch.no_grad():
            delta.values.normal_(0, 0.05)
    probe = _batch(9)
    with torch.no_grad():
        expected = spiel(input_ids=probe).logits
    merged = spiel.merge_and_unload(dequantize=True)
    assert not hasattr(merged.config, "quantization_config") and not merged.is_quantized
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, expected, rtol=1e-4, atol=1e-4)
