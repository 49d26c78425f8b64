"""Modules trained in full next to the deltas (``modules_to_save``, ``task_type``), as in peft."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForSequenceClassification

from spielft import ModulesToSaveWrapper, SpielConfig, SpielModel, SpielTrainer, get_spiel_model
from spielft.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from spielft.trainer import load_adapter_in_place
from tiny_models import TINY_LLAMA_SIZES, tiny_llama

IDS = torch.arange(32).view(4, 8) % 100 + 1
LABELS = torch.tensor([0, 1, 2, 1])


def classifier(seed: int = 0, **config) -> LlamaForSequenceClassification:
    """A tiny random Llama with a 3-label classification head (``score``)."""
    torch.manual_seed(seed)
    fields = {**TINY_LLAMA_SIZES, "vocab_size": 128, "num_labels": 3, "pad_token_id": 0, **config}
    return LlamaForSequenceClassification(LlamaConfig(**fields))


def train(model: SpielModel, steps: int = 3, lr: float = 1e-2) -> None:
    optimizer = model.create_optimizer(lr=lr)
    selector = model.create_selector(optimizer, total_steps=100)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=LABELS).loss.backward()
        optimizer.step()
        selector.step()
        optimizer.zero_grad()
    model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"modules_to_save": "score"}, "modules_to_save must be a list"),
        ({"modules_to_save": ["score", 3]}, "modules_to_save must be a list"),
        ({"modules_to_save": [""]}, "modules_to_save must be a list"),
        ({"task_type": "CLASSIFY"}, "task_type must be one of"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SpielConfig(**fields)


def test_config_takes_peft_task_type_enum_and_round_trips():
    peft = pytest.importorskip("peft")
    config = SpielConfig(task_type=peft.TaskType.SEQ_CLS, modules_to_save=("norm",))
    assert config.task_type == "SEQ_CLS" and config.modules_to_save == ["norm"]
    assert config.task_heads == ("classifier", "score")
    assert SpielConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_seq_cls_head_trains_as_a_copy_and_the_original_stays(regrowth):
    base = classifier()
    original = base.score.weight.detach().clone()
    model = get_spiel_model(base, SpielConfig(density=0.05, regrowth=regrowth, task_type="SEQ_CLS"))
    wrapper = model.base_model.score
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert "score" not in model.spiel_layers()  # trained in full, so not also targeted
    copy = wrapper.modules_to_save["default"]
    assert copy.weight.requires_grad and not wrapper.original_module.weight.requires_grad
    trainable, _ = model.get_nb_trainable_parameters()
    deltas = sum(d.values.numel() for d in model.sparse_deltas().values())
    assert trainable == deltas + copy.weight.numel()

    before = logits(model)
    train(model)
    assert torch.equal(wrapper.original_module.weight, original)
    assert not torch.equal(copy.weight, original)  # the optimizer stepped the copy
    assert torch.equal(wrapper.weight, copy.weight)  # attributes come from the module in use
    with model.disable_adapter():
        assert torch.equal(logits(model), before)  # the original head, no deltas
    assert not torch.equal(logits(model), before)


def test_classifier_without_its_head_in_modules_to_save_warns_at_the_callers_line():
    with pytest.warns(UserWarning, match=r"head \['score'\] stays frozen") as caught:
        get_spiel_model(classifier(), SpielConfig(density=0.05))
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_spiel_model(classifier(), SpielConfig(density=0.05, modules_to_save=["score"]))


def test_causal_lm_norm_in_modules_to_save_trains_next_to_all_linear_targets():
    model = get_spiel_model(tiny_llama(), SpielConfig(density=0.05, modules_to_save=["norm"]))
    wrappers = model.modules_to_save_wrappers()
    assert list(wrappers) == ["model.norm"]  # the suffix matches the final norm, not the layers'
    original = wrappers["model.norm"].original_module.weight.detach().clone()
    optimizer = model.create_optimizer(lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert not torch.equal(wrappers["model.norm"].weight, original)
    assert torch.equal(wrappers["model.norm"].original_module.weight, original)


# -- what is refused, before anything changes -------------------------------------------------------
def _refused(model, config, message):
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=message):
        get_spiel_model(model, config)
    assert [n for n, _ in model.named_modules()] == names  # nothing wrapped


def test_unmatched_names_and_missing_task_heads_are_refused():
    _refused(tiny_llama(), SpielConfig(modules_to_save=["classifier_head"]), r"names \['classifier_head'\]")
    _refused(tiny_llama(), SpielConfig(task_type="SEQ_CLS"), "has no module named any of")


def test_targets_inside_a_module_trained_in_full_are_skipped_with_a_warning():
    # As peft: RoBERTa's head holds a `dense`, which target_modules=["dense", ...] also names.
    with pytest.warns(UserWarning, match=r"matched \['score'\], inside modules trained in full"):
        model = get_spiel_model(
            classifier(), SpielConfig(density=0.05, target_modules=["score", "q_proj"], task_type="SEQ_CLS")
        )
    assert "score" not in model.spiel_layers() and len(model.spiel_layers()) == 2
    with pytest.warns(UserWarning, match="inside modules trained in full"):  # nothing left
        _refused(tiny_llama(), SpielConfig(modules_to_save=["self_attn"], target_modules=["q_proj"]),
                 "matched no supported module")


def test_an_offloaded_module_to_save_is_refused_before_anything_is_wrapped():
    from types import SimpleNamespace

    model = classifier()
    model.score._hf_hook = SimpleNamespace(offload=True)
    _refused(model, SpielConfig(density=0.05, task_type="SEQ_CLS"), "offloaded by accelerate")
    del model.score._hf_hook
    get_spiel_model(model, SpielConfig(density=0.05, task_type="SEQ_CLS"))  # a retry works


def test_tied_weights_and_aliases_are_refused():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _refused(model, SpielConfig(modules_to_save=["lm_head"]), r"shares weights with \['model.embed_tokens'\]")
    aliased = tiny_llama()
    aliased.model.extra_norm = aliased.model.norm  # one module, two names
    _refused(aliased, SpielConfig(modules_to_save=["model.norm"]), r"shares weights with \['model.extra_norm'\]")


def test_loading_allows_tied_weights_only_for_embeddings(tmp_path):
    get_spiel_model(tiny_llama(), SpielConfig(density=0.05, modules_to_save=["model.norm"])).save_pretrained(tmp_path)
    aliased = tiny_llama(tie_word_embeddings=True)
    aliased.model.extra_norm = aliased.model.norm
    with pytest.raises(ValueError, match="shares weights with"):
        SpielModel.from_pretrained(aliased, tmp_path)
    plain = SpielModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a norm is not what tie_word_embeddings ties
        merged = plain.merge_and_unload()
    assert merged.config.tie_word_embeddings is True


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_head_trained_untied_loads_onto_the_tied_base_and_merges_untied(tmp_path, saved):
    """The route the tied-weights error suggests: untie, train the head, load it back."""
    untied = tiny_llama(tie_word_embeddings=True)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    model = get_spiel_model(untied, SpielConfig(density=0.05, modules_to_save=saved))
    optimizer = model.create_optimizer(lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    loaded = SpielModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "adapter")
    assert torch.equal(logits(loaded), expected)  # the copy runs; the embedding is the original
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


def test_a_module_holding_another_adapters_deltas_is_refused():
    model = get_spiel_model(tiny_llama(), SpielConfig(density=0.05))
    with pytest.raises(ValueError, match="either targeted or trained in full"):
        model.add_adapter("other", SpielConfig(density=0.05, modules_to_save=["self_attn"]))
    assert list(model.peft_config) == ["default"] and not model.modules_to_save_wrappers()


# -- saving and loading ----------------------------------------------------------------------------
def test_save_load_round_trip_and_merge(tmp_path):
    model = get_spiel_model(classifier(), SpielConfig(density=0.05, task_type="SEQ_CLS"))
    train(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert meta["format_version"] == 2 and meta["modules_to_save"] == {"score": ["weight"]}
    stored = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)["modules_to_save/score/weight"]
    assert torch.equal(stored, model.base_model.score.modules_to_save["default"].weight)

    loaded = SpielModel.from_pretrained(classifier(), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference: the copy is frozen too
    merged = loaded.merge_and_unload()
    assert type(merged.score) is torch.nn.Linear and not merged.score.weight.requires_grad
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-6)


def test_auto_class_rebuilds_the_classifier_with_its_labels(tmp_path):
    from transformers import LlamaForCausalLM

    from spielft import AutoSpielModelForSequenceClassification

    # A causal-LM checkpoint (2 labels by default), made a 3-label classifier at load time.
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_SIZES, vocab_size=128)).save_pretrained(tmp_path / "base")
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    model = get_spiel_model(
        LlamaForSequenceClassification.from_pretrained(
            tmp_path / "base", num_labels=3, id2label=labels, pad_token_id=0
        ),
        SpielConfig(density=0.05, task_type="SEQ_CLS"),
    )
    train(model)
    model.save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert meta["task_model_config"]["num_labels"] == 3 and meta["task_model_config"]["pad_token_id"] == 0
    loaded = AutoSpielModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert loaded.config.id2label == labels and loaded.config.pad_token_id == 0
    assert torch.equal(logits(loaded), logits(model))  # a batch of 4: needs the pad token
    config = LlamaConfig.from_pretrained(tmp_path / "base")  # a config of its own: 2 labels
    with_config = AutoSpielModelForSequenceClassification.from_pretrained(tmp_path / "adapter", config=config)
    assert with_config.config.id2label == labels and config.num_labels == 2  # a copy was changed
    assert torch.equal(logits(with_config), logits(model))


def test_a_format_1_adapter_still_loads(tmp_path):
    model = get_spiel_model(tiny_llama(), SpielConfig(density=0.05))
    model.save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    meta["format_version"] = 1  # as written before modules_to_save and task_type existed
    for field in ("modules_to_save", "task_type"):
        del meta["config"][field]
    save_file(load_file(path), path, metadata={"spielft": json.dumps(meta)})
    assert torch.equal(logits(SpielModel.from_pretrained(tiny_llama(), tmp_path)), logits(model))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: t.pop("modules_to_save/score/weight"), "tensor 'weight' is missing"),
        (lambda t, m: t.__setitem__("modules_to_save/score/weight", torch.zeros(2, 64)),
         r"'weight' is torch.float32 \(2, 64\), the base model has torch.float32 \(3, 64\)"),
        (lambda t, m: m["modules_to_save"].__setitem__("score", ["weight", "bias"]),
         r"state keys \['bias', 'weight'\]"),
        (lambda t, m: m.__setitem__("modules_to_save", {"head": ["weight"]}), "no such module"),
        (lambda t, m: m.__setitem__("modules_to_save", ["score"]), "must map module names"),
        (lambda t, m: m.__setitem__("modules_to_save", {"": ["weight"]}), "not a module name"),
        (lambda t, m: m.__setitem__("modules_to_save", {"score.original_module": ["weight"]}),
         "not a module name"),
    ],
)
def test_bad_saved_modules_are_named_and_nothing_is_loaded(tmp_path, edit, message):
    get_spiel_model(classifier(), SpielConfig(density=0.05, task_type="SEQ_CLS")).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    tensors = load_file(path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    edit(tensors, meta)
    save_file(tensors, path, metadata={"spielft": json.dumps(meta)})
    base = classifier()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match=message):
        SpielModel.from_pretrained(base, tmp_path)
    assert [n for n, _ in base.named_modules()] == names


# -- several adapters ------------------------------------------------------------------------------
def test_several_adapters_each_with_their_own_copy(tmp_path):
    model = get_spiel_model(classifier(), SpielConfig(density=0.05, task_type="SEQ_CLS"))
    train(model)
    first = logits(model)
    model.add_adapter("second", SpielConfig(density=0.05, task_type="SEQ_CLS", seed=1))
    with pytest.warns(UserWarning, match="stays frozen"):  # "plain" trains no head: it is told
        model.add_adapter("plain", SpielConfig(density=0.05, seed=2, target_modules=["q_proj"]))
    wrapper = model.base_model.score
    assert set(wrapper.modules_to_save) == {"default", "second"}

    model.set_adapter("second")
    assert wrapper.modules_to_save["second"].weight.requires_grad
    assert not wrapper.modules_to_save["default"].weight.requires_grad
    train(model)
    assert not torch.equal(wrapper.modules_to_save["second"].weight, wrapper.modules_to_save["default"].weight)

    with pytest.raises(ValueError, match="activate at most one of them"):
        model.set_adapter(["default", "second"])
    assert model.active_adapters == ["second"]  # unchanged by the refusal
    deltas_on_head = tmp_path / "deltas_on_head"
    with pytest.warns(UserWarning, match="stays frozen"):
        get_spiel_model(classifier(), SpielConfig(density=0.05, target_modules=["score"])).save_pretrained(
            deltas_on_head
        )
    with pytest.raises(ValueError, match="another adapter of this model trains that module in full"):
        model.load_adapter(deltas_on_head, "deltas")
    with pytest.raises(ValueError, match="combines sparse deltas only"):
        model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "sum")
    with pytest.raises(ValueError, match="can keep only one"):
        model.merge_and_unload(adapter_names=["default", "second"])

    model.set_adapter(["default", "plain"])  # one copy among them: fine, and deltas add up
    assert wrapper.active_adapter == "default"
    model.set_adapter("plain")
    assert wrapper.module_in_use() is wrapper.original_module  # "plain" trains no head

    model.set_adapter("default")
    assert torch.equal(logits(model), first)
    model.delete_adapter("default")
    model.delete_adapter("second")
    assert isinstance(model.base_model.score, torch.nn.Linear)  # no copy left: unwrapped


def test_unload_keeps_the_active_copy_as_peft_does():
    model = get_spiel_model(classifier(), SpielConfig(density=0.05, task_type="SEQ_CLS"))
    train(model)
    copy = model.base_model.score.modules_to_save["default"]
    plain = model.unload()
    assert plain.score is copy and not copy.weight.requires_grad


# -- the Trainer -----------------------------------------------------------------------------------
def test_load_adapter_in_place_restores_the_copy_and_keeps_its_parameter(tmp_path):
    model = get_spiel_model(classifier(), SpielConfig(density=0.05, task_type="SEQ_CLS"))
    train(model)
    model.save_pretrained(tmp_path)
    copy = model.base_model.score.modules_to_save["default"]
    saved, param = copy.weight.detach().clone(), copy.weight
    with torch.no_grad():
        copy.weight.zero_()
    load_adapter_in_place(model, tmp_path)
    assert copy.weight is param and torch.equal(copy.weight, saved)

    with pytest.warns(UserWarning, match="stays frozen"):  # deltas on the head, no copy
        other = get_spiel_model(classifier(), SpielConfig(density=0.05, target_modules=["score", "q_proj"]))
    with pytest.raises(ValueError, match="does not match"):
        load_adapter_in_place(other, tmp_path)


def test_spiel_trainer_trains_a_classifier_and_saves_its_head(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    data = Dataset.from_dict({"input_ids": IDS.tolist() * 4, "labels": LABELS.tolist() * 4})
    model = get_spiel_model(classifier(), SpielConfig(density=0.05, task_type="SEQ_CLS", regrowth="ma"))
    original = model.base_model.score.original_module.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
    )
    trainer = SpielTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    head = model.base_model.score.modules_to_save["default"].weight
    assert any(p is head for group in trainer.optimizer.param_groups for p in group["params"])
    assert not torch.equal(head, original)
    stored = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)["modules_to_save/score/weight"]
    assert torch.equal(stored, head)
