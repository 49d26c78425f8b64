"""Sparse deltas on transformers' Conv1D (GPT-2) and on nn.Embedding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from recording_capture import RecordingCapture
from spielft import SpielConfig, SpielModel, get_spiel_model, ops
from spielft.layer import (
    SparseDelta,
    SpielConv1D,
    SpielEmbedding,
    is_whole_lines,
    random_indices,
    wrap_module,
)
from spielft.model import find_target_modules
from spielft.ops import sparse_delta_embedding, sparse_delta_linear
from tiny_models import tiny_llama, train_steps

pytestmark = pytest.mark.usefixtures("single_thread")


def _delta(shape, k, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    delta = SparseDelta(shape, random_indices(shape[0] * shape[1], k, gen), dtype)
    with torch.no_grad():
        delta.values.copy_(torch.randn(k, generator=gen, dtype=dtype))
    return delta


def _dense_param(delta):
    return delta.to_dense(torch.float64).clone().requires_grad_(True)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _batch(seed, vocab=128, batch=4, length=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (batch, length), generator=gen)


# -- Conv1D -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [30, 900])  # sampled SDDMM and dense-GEMM paths
def test_conv1d_forward_and_gradients_match_dense_float64(k):
    torch.manual_seed(0)
    conv = Conv1D(48, 24).double()  # weight stored (in=24, out=48)
    with torch.no_grad():
        conv.bias.normal_()
    layer = wrap_module(conv)
    assert isinstance(layer, SpielConv1D) and layer.weight_shape == (24, 48)
    delta = _delta((24, 48), k)
    layer.add_delta("a", delta)
    layer.set_adapter(["a"])
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = _dense_param(delta)
    ref = x_ref @ (conv.weight.detach() + dense) + conv.bias.detach()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        delta.values.grad, dense.grad.view(-1)[delta.indices.long()], rtol=1e-10, atol=1e-10
    )


def test_conv1d_captured_dense_gradient_is_in_the_stored_layout():
    torch.manual_seed(1)
    weight = torch.randn(24, 48, dtype=torch.float64)
    delta = _delta((24, 48), 40)
    capture = RecordingCapture(dense=True, inputs=True)
    x = torch.randn(7, 24, dtype=torch.float64)
    values = delta.values.detach().clone().requires_grad_(True)
    out = sparse_delta_linear(x, weight, None, delta.indices, values, [capture],
                              transposed=True)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(capture.dense[0].double(), x.T @ g, rtol=1e-5, atol=1e-5)
    assert capture.dense[0].shape == (24, 48)
    # The inputs' mean squares broadcast against the stored (in, out) layout: one per row.
    assert capture.input_ms[0].shape == (24, 1)
    torch.testing.assert_close(capture.input_ms[0].double().view(-1), x.square().mean(0))


def test_conv1d_merge_is_exact_and_unmerge_restores_bit_for_bit():
    torch.manual_seed(2)
    conv = Conv1D(48, 24)
    original = conv.weight.detach().clone()
    layer = SpielConv1D(conv)
    delta = _delta((24, 48), 100, torch.float32)
    layer.add_delta("a", delta)
    layer.set_adapter(["a"])
    x = torch.randn(6, 24)
    unmerged = layer(x)
    assert torch.equal(conv.weight, original)  # the op restores the patched weight
    layer.merge()
    assert torch.equal(conv(x), unmerged)
    assert torch.equal(layer(x), unmerged)
    layer.unmerge()
    assert torch.equal(conv.weight, original)


def test_tiny_gpt2_default_targets_conv1d_trains_and_merges_exactly():
    model = tiny_gpt2()
    head = model.lm_head.weight
    assert head is model.transformer.wte.weight  # GPT-2 ties its head to the embedding
    spiel = get_spiel_model(model, SpielConfig(density=0.05, regrowth="ag",
                                               reselection_steps=10, accumulation_steps=2))
    names = set(spiel.spiel_layers())
    assert {n.rsplit(".", 1)[1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert len(names) == 2 * 4
    assert all(isinstance(layer, SpielConv1D) for layer in spiel.spiel_layers().values())
    optimizer = spiel.create_optimizer(lr=1e-2)
    selector = spiel.create_selector(optimizer, total_steps=40)
    data = _batch(0, batch=8, length=16)
    before = [d.indices.clone() for d in spiel.sparse_deltas().values()]
    losses = train_steps(spiel, optimizer, selector, data, 40)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    after = [d.indices for d in spiel.sparse_deltas().values()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    spiel.eval()
    probe = _batch(1)
    with torch.no_grad():
        unmerged = spiel(input_ids=probe).logits
        merged_model = spiel.merge_and_unload()
        merged = merged_model(input_ids=probe).logits
    assert isinstance(merged_model.transformer.h[0].attn.c_attn, Conv1D)
    assert torch.equal(merged, unmerged)


@pytest.mark.parametrize("structure, stored_axis", [("rows", 1), ("columns", 0)])
def test_conv1d_rows_are_output_features_and_train_as_lines(structure, stored_axis):
    """Conv1D stores (in, out): the computation's rows (outputs) are its stored columns."""
    spiel = get_spiel_model(tiny_gpt2(), SpielConfig(density=0.1, structure=structure,
                                                     reselection_steps=4, accumulation_steps=2))
    deltas = spiel.sparse_deltas()
    assert all(d.line_axis == stored_axis for d in deltas.values())
    optimizer = spiel.create_optimizer(lr=1e-2)
    selector = spiel.create_selector(optimizer, total_steps=12)
    losses = train_steps(spiel, optimizer, selector, _batch(0, batch=8, length=16), 12)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(is_whole_lines(d.indices, d.shape, stored_axis) for d in deltas.values())


def test_gpt2_tied_embedding_is_refused_clearly():
    with pytest.raises(ValueError, match="tied"):
        get_spiel_model(tiny_gpt2(), SpielConfig(target_modules=["wte"]))
    with pytest.raises(ValueError, match="tied"):
        get_spiel_model(tiny_gpt2(), SpielConfig(target_modules=["lm_head"], exclude_modules=[]))
    # untied, the embedding is accepted
    model = tiny_gpt2()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    spiel = get_spiel_model(model, SpielConfig(target_modules=["wte"]))
    assert isinstance(spiel.base_model.transformer.wte, SpielEmbedding)


def test_unsupported_target_error_lists_supported_types():
    with pytest.raises(ValueError, match=r"Conv1D.*Linear4bit") as err:
        find_target_modules(tiny_llama(), SpielConfig(target_modules=r".*input_layernorm"))
    assert "nn.Embedding" in str(err.value)


# -- Embedding --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"padding_idx": 3},
        {"scale_grad_by_freq": True},
        {"max_norm": 1.5},
        {"padding_idx": 0, "max_norm": 2.0, "norm_type": 1.0, "scale_grad_by_freq": True},
    ],
)
def test_embedding_forward_and_gradients_match_dense_float64(options):
    torch.manual_seed(3)
    emb = nn.Embedding(40, 8, dtype=torch.float64, **options)
    original = emb.weight.detach().clone()
    layer = wrap_module(emb)
    assert isinstance(layer, SpielEmbedding)
    delta = _delta((40, 8), 120)
    layer.add_delta("a", delta)
    layer.set_adapter(["a"])
    ids = torch.tensor([[0, 3, 5, 5, 9], [3, 3, 21, 39, 0]])
    out = layer(ids)
    dense = _dense_param(delta)
    ref_options = {k: v for k, v in options.items()}
    ref = F.embedding(ids, original + dense, **ref_options)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(
        delta.values.grad, dense.grad.view(-1)[delta.indices.long()], rtol=1e-12, atol=1e-12
    )
    assert torch.equal(emb.weight, original)  # never renormalised nor left patched


def test_embedding_delta_gradient_only_on_rows_in_the_batch():
    torch.manual_seed(4)
    emb = nn.Embedding(50, 8)
    layer = SpielEmbedding(emb)
    delta = _delta((50, 8), 200, torch.float32)
    layer.add_delta("a", delta)
    layer.set_adapter(["a"])
    ids = torch.tensor([[1, 7, 7, 30]])
    layer(ids).pow(2).sum().backward()
    rows = delta.indices.long() // 8
    in_batch = torch.isin(rows, ids.unique())
    assert in_batch.any() and (~in_batch).any()
    assert (delta.values.grad[~in_batch] == 0).all()
    assert (delta.values.grad[in_batch] != 0).all()


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_embedding_backward_builds_no_dense_gradient_unless_captured():
    num, dim = 5000, 16
    weight = torch.randn(num, dim)
    delta = _delta((num, dim), 300, torch.float32)
    ids = torch.randint(num, (4, 8))
    values = delta.values.detach().clone().requires_grad_(True)
    out = sparse_delta_embedding(ids, weight, delta.indices, values)
    recorder = _RecordShapes()
    with recorder:
        out.sum().backward()
    assert values.grad is not None
    assert all(s[0] < num for s in recorder.shapes if len(s) == 2)
    assert max(torch.Size(s).numel() for s in recorder.shapes) < num * dim
    # a capture that wants no dense gradient (MA's input statistics) does not cause one
    values.grad = None
    inputs_only = RecordingCapture(dense=False, inputs=True)
    out = sparse_delta_embedding(ids, weight, delta.indices, values, [inputs_only])
    recorder = _RecordShapes()
    with recorder:
        out.sum().backward()
    assert (num, dim) not in recorder.shapes
    assert inputs_only.dense == [None] and inputs_only.input_ms == [None]  # one-hot: no scale
    sparse_grad = values.grad.clone()
    # with a capture (the selector's AG window), the dense gradient is built and handed over
    capture = RecordingCapture(dense=True)
    values.grad = None
    out = sparse_delta_embedding(ids, weight, delta.indices, values, [capture])
    recorder = _RecordShapes()
    with recorder:
        out.sum().backward()
    assert (num, dim) in recorder.shapes  # the recorder does see a dense gradient
    assert capture.dense[0].shape == (num, dim)
    expected = torch.zeros(num, dim).index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dim))
    torch.testing.assert_close(capture.dense[0], expected)
    torch.testing.assert_close(values.grad, expected.view(-1)[delta.indices.long()])
    torch.testing.assert_close(sparse_grad, values.grad)


def test_embedding_is_not_a_default_target_but_can_be_named_trained_saved_and_merged(tmp_path):
    base = tiny_llama()
    spiel = get_spiel_model(tiny_llama(), SpielConfig(density=0.05))
    assert not any(isinstance(m, SpielEmbedding) for m in spiel.spiel_layers().values())
    config = SpielConfig(density=0.05, target_modules=["embed_tokens", "q_proj"],
                         regrowth="ma", reselection_steps=5)
    spiel = get_spiel_model(base, config)
    layers = spiel.spiel_layers()
    assert isinstance(layers["model.embed_tokens"], SpielEmbedding)
    optimizer = spiel.create_optimizer(lr=1e-2)
    selector = spiel.create_selector(optimizer, total_steps=12)
    data = _batch(2)
    spiel.train()
    for _ in range(12):
        spiel(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
    emb_delta = spiel.sparse_deltas()["model.embed_tokens"]
    rows = emb_delta.indices.long() // 64
    changed = emb_delta.values.detach() != 0
    assert changed.any()
    assert torch.isin(rows[changed], data.unique()).all()  # only looked-up rows ever move
    spiel.eval()
    probe = _batch(5)
    with torch.no_grad():
        logits = spiel(input_ids=probe).logits
    spiel.save_pretrained(tmp_path)
    reloaded = SpielModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(reloaded.base_model.model.embed_tokens, SpielEmbedding)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, logits)
        merged = reloaded.merge_and_unload()
        assert type(merged.model.embed_tokens) is nn.Embedding
        assert torch.equal(merged(input_ids=probe).logits, logits)


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_embedding_rows_regrow_rows_of_tokens_in_the_batch(regrowth):
    """Whole embedding rows (tokens): both regrowths score them from the exact row gradient."""
    config = SpielConfig(density=0.1, target_modules=["embed_tokens"], structure="rows",
                         regrowth=regrowth, reselection_steps=3, accumulation_steps=1,
                         initial_reselection_rate=0.5)
    spiel = get_spiel_model(tiny_llama(), config)
    delta = spiel.sparse_deltas()["model.embed_tokens"]
    assert delta.line_axis == 0
    optimizer = spiel.create_optimizer(lr=1e-2)
    selector = spiel.create_selector(optimizer, total_steps=4)
    before = set(delta.lines().tolist())
    data = _batch(3, length=8)
    for _ in range(3):
        spiel(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
    grown = set(delta.lines().tolist()) - before
    assert grown and grown <= set(data.unique().tolist())  # only tokens with a gradient
    assert is_whole_lines(delta.indices, delta.shape, 0)


def test_embedding_rows_inside_applied_deltas_are_written_as_lines_and_restored():
    """The embedding op patches whole rows as lines too, so the block's first write stands."""
    config = SpielConfig(density=0.1, target_modules=["embed_tokens"], structure="rows")
    spiel = get_spiel_model(tiny_llama(), config)
    delta = spiel.sparse_deltas()["model.embed_tokens"]
    with torch.no_grad():
        delta.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    weight = spiel.base_model.model.embed_tokens.base_layer.weight
    pretrained = weight.clone()
    data = _batch(2, length=8)
    outside = spiel(input_ids=data).logits
    with spiel.applied_deltas():
        inside = spiel(input_ids=data).logits
        held = ops._applied_for(weight)
        assert held.line_axis == 0  # line numbers only, not the positions
        assert torch.equal(held.where, delta.lines().to(held.where.dtype))
    assert torch.equal(inside, outside)
    assert torch.equal(weight, pretrained)
