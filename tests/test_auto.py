"""AutoSpielModelForCausalLM: the adapter's recorded base model, loaded by transformers."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from spielft import AutoSpielModelForCausalLM, SpielConfig, get_spiel_model
from spielft.files import ADAPTER_WEIGHTS_NAME
from tiny_models import tiny_llama

IDS = torch.arange(12).view(1, 12)


def _adapter_on_saved_base(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_spiel_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), SpielConfig(density=0.05))
    with torch.no_grad():
        for delta in model.sparse_deltas().values():
            delta.values.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    return model


def test_loads_the_recorded_base_and_the_adapter(tmp_path):
    model = _adapter_on_saved_base(tmp_path)
    loaded = AutoSpielModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference by default, as peft
    trainable = AutoSpielModelForCausalLM.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_an_adapter_without_a_usable_base_says_what_to_do(tmp_path):
    # Built from a config: transformers records no name or path.
    get_spiel_model(tiny_llama(), SpielConfig(density=0.05)).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"records no base model.*SpielModel\.from_pretrained"):
        AutoSpielModelForCausalLM.from_pretrained(tmp_path / "bare")
    # Recorded as a local folder that is not here (trained on another machine).
    _adapter_on_saved_base(tmp_path)
    path = tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["spielft"])
    meta["base_model_name_or_path"] = str(tmp_path / "elsewhere")
    save_file(load_file(path), path, metadata={"spielft": json.dumps(meta)})
    with pytest.raises(FileNotFoundError, match="a local folder that is not on this machine"):
        AutoSpielModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_a_recorded_default_model_cache_folder_maps_to_the_default_model(monkeypatch):
    import spielft.auto as auto

    monkeypatch.setattr(auto, "default_model_path", lambda: "/here/spielft/SmolLM2-135M-Instruct")
    assert auto.locate_base_model("/other/home/.cache/spielft/SmolLM2-135M-Instruct", "a") == (
        "/here/spielft/SmolLM2-135M-Instruct")
    assert auto.locate_base_model("HuggingFaceTB/SmolLM2-135M", "a") == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize("saved", [["embed_tokens", "lm_head"], ["lm_head"], None])
def test_a_base_resized_for_added_tokens_is_resized_again(tmp_path, saved):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(base.config.vocab_size + 4)  # e.g. chat tokens added
    train_embeddings = saved == ["embed_tokens", "lm_head"]
    model = get_spiel_model(base, SpielConfig(density=0.05, modules_to_save=saved))
    optimizer = model.create_optimizer(lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 130, 131]])  # two of the new tokens
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "adapter")
    if train_embeddings:
        loaded = AutoSpielModelForCausalLM.from_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    else:  # the rows of the module not carried are named
        with pytest.warns(UserWarning, match=r"new rows of \[.*'model.embed_tokens'\] are freshly"):
            loaded = AutoSpielModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert loaded.get_input_embeddings().weight.shape[0] == 132


def test_a_peft_adapter_is_pointed_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    tiny_llama().save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                               peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a peft LORA adapter, not a spielft one"):
        AutoSpielModelForCausalLM.from_pretrained(tmp_path / "lora")
