"""SpielLayer and SparseDelta: base-layer pass-through, unmerge after a cast, slot remapping."""

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

from spielft import SpielConfig, get_spiel_model
from spielft.layer import SparseDelta, SpielConv1D, SpielEmbedding, SpielLinear, random_indices

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("layer_type", "base"),
    [
        (SpielLinear, nn.Linear(8, 4)),
        (SpielConv1D, Conv1D(4, 8)),
        (SpielEmbedding, nn.Embedding(8, 4)),
    ],
)
def test_weight_and_bias_read_through_to_the_base_layer(layer_type, base):
    layer = layer_type(base)
    assert layer.weight is base.weight
    if hasattr(base, "bias"):
        assert layer.bias is base.bias
    else:
        assert not hasattr(layer, "bias")  # as the base layer: nn.Embedding has none
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(4, 8)  # read-only: the base layer owns it


def test_tiny_t5_forward_and_backward_reach_every_delta():
    # T5's feed-forward reads self.wo.weight.dtype, which a layer without `.weight` breaks.
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    model = get_spiel_model(T5ForConditionalGeneration(config), SpielConfig(density=0.05))
    assert len(model.spiel_layers()) == 16  # q, k, v, o per attention (x3), wi, wo per FFN (x2)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [d.values.grad for d in model.sparse_deltas().values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unmerge_after_a_dtype_cast_restores_and_can_be_retried():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = SpielLinear(base)
    delta = SparseDelta((8, 16), random_indices(128, 20, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        delta.values.normal_()
    layer.add_delta("a", delta)
    layer.set_adapter(["a"])
    pretrained = base.weight.detach().clone()
    layer.merge()
    layer.to(torch.bfloat16)  # the float32 backup no longer matches the weight's dtype
    layer.unmerge()
    assert layer.merged_adapters == [] and layer._merge_backup == {}
    assert torch.equal(base.weight, pretrained.to(torch.bfloat16))


def test_reassign_moves_an_accumulated_gradient_with_its_slot():
    delta = SparseDelta((4, 4), torch.tensor([1, 5, 9, 13]))
    with torch.no_grad():
        delta.values.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    delta.values.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    grad = delta.values.grad
    # Keep old slots 3 and 1 (positions 13 and 5), regrow positions 0 and 7.
    delta.reassign(torch.tensor([0, 5, 7, 13]), torch.tensor([-1, 1, -1, 3]))
    assert torch.equal(delta.values.detach(), torch.tensor([0.0, 20.0, 0.0, 40.0]))
    assert delta.values.grad is grad  # the same tensor, remapped in place
    assert torch.equal(delta.values.grad, torch.tensor([0.0, 2.0, 0.0, 4.0]))
