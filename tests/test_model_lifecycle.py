"""Adapter lifecycle: save/load, merge/unmerge/disable, several adapters, composition, bad files."""

import contextlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import spielft.model as spiel_model_module
from spielft import SpielConfig, SpielModel, get_spiel_model
from spielft.layer import is_whole_lines
from spielft.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).to(dtype)


IDS = torch.arange(24).view(2, 12) % 64


def randomize(model, adapter=None, scale=0.05, seed=1):
    """Give an adapter non-zero deltas, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in model.sparse_deltas(adapter).values():
            delta.values.copy_(torch.randn(delta.values.shape, generator=gen) * scale)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(dtype=torch.float32, **config):
    model = get_spiel_model(tiny_llama(dtype), SpielConfig(density=0.05, **config))
    randomize(model)
    return model


def test_round_trip_gives_identical_logits(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert meta["adapter_type"] == "spielft" and meta["format_version"] == 2
    assert meta["config"]["density"] == 0.05
    assert sum(m["num_deltas"] for m in meta["modules"].values()) == model.get_nb_trainable_parameters()[0]
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if k.endswith(".indices"))

    loaded = SpielModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference by default
    trainable = SpielModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_saved_files_get_the_usual_umask_mode_not_tempfiles_private_one(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        trained().save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_adapters_loaded_for_inference_stay_frozen_through_later_adapter_calls(tmp_path):
    trained().save_pretrained(tmp_path / "a")
    model = SpielModel.from_pretrained(tiny_llama(), tmp_path / "a", is_trainable=False)
    model.load_adapter(tmp_path / "a", "other")
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")
    model.set_adapter(["default", "other"])
    assert model.get_nb_trainable_parameters()[0] == 0
    model.set_adapter("sum")  # a new adapter built here is trainable when it leads
    assert model.get_nb_trainable_parameters()[0] > 0


def test_file_costs_values_plus_four_bytes_per_index(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    k = model.get_nb_trainable_parameters()[0]
    header_allowance = 16_384  # JSON header: tensor names, offsets, our metadata
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).stat().st_size <= k * (4 + 4) + header_allowance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_equals_unmerged_and_unmerge_restores(dtype):
    model = trained(dtype)
    before = {n: p.clone() for n, p in model.base_model.named_parameters()}
    unmerged = logits(model)
    model.merge()
    # Forward and merge round W + delta the same way, so logits match exactly in every dtype.
    assert torch.equal(logits(model), unmerged)
    model.unmerge()
    for n, p in model.base_model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("applied", [False, True])
def test_merging_between_forward_and_backward_is_refused(applied):
    """The backward would otherwise add the merged deltas a second time to W."""
    model = trained()
    block = model.applied_deltas() if applied else contextlib.nullcontext()
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    with block:
        loss = model(inputs_embeds=embeds).logits.square().mean()
        model.merge()
        with pytest.raises(RuntimeError, match="merged or unmerged between this forward pass and its backward"):
            loss.backward()
        model.unmerge()
    # Merging before the forward and unmerging after the backward is fine, and exact.
    ref = trained()
    ref_embeds = embeds.detach().clone().requires_grad_()
    ref(inputs_embeds=ref_embeds).logits.square().mean().backward()
    model.zero_grad()
    embeds.grad = None
    model(inputs_embeds=embeds).logits.square().mean().backward()
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, rtol=0, atol=0)


def test_merge_and_unload_returns_plain_model():
    model = trained()
    expected = logits(model)
    plain = model.merge_and_unload()
    assert type(plain) is LlamaForCausalLM
    assert not any("spiel" in n for n, _ in plain.named_modules())
    assert torch.equal(logits(plain), expected)


def test_peft_merge_names_and_merge_and_unload_options():
    model = trained()
    expected = logits(model)
    assert model.get_base_model() is model.base_model
    model.merge_adapter()
    assert torch.equal(logits(model), expected)
    model.unmerge_adapter()
    assert torch.equal(logits(model), expected)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model.merge_and_unload(adapter_names=["nope"])
    # safe_merge: broken deltas are caught and nothing is merged.
    base = {n: p.clone() for n, p in model.base_model.named_parameters() if "spiel" not in n}
    next(iter(model.sparse_deltas().values())).values.data[0] = float("nan")
    with pytest.raises(ValueError, match=r"safe_merge: merging .* NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    assert all(torch.equal(p, base[n]) for n, p in model.base_model.named_parameters() if n in base)
    assert not any(layer.merged_adapters for layer in model.spiel_layers().values())
    next(iter(model.sparse_deltas().values())).values.data[0] = 0.0
    expected = logits(model)
    plain = model.merge_and_unload(safe_merge=True, progressbar=True, adapter_names=["default"])
    assert torch.equal(logits(plain), expected)


def test_a_second_wrapper_cannot_overwrite_the_first_ones_adapter():
    base = tiny_llama()
    first = get_spiel_model(base, SpielConfig(density=0.05))
    randomize(first)
    expected = logits(first)
    with pytest.raises(ValueError, match="already carries a spielft adapter 'default'"):
        get_spiel_model(base, SpielConfig(density=0.05, seed=1))
    assert torch.equal(logits(first), expected)
    second = get_spiel_model(base, SpielConfig(density=0.05, seed=1), adapter_name="other")
    assert set(second.spiel_layers()) == set(first.spiel_layers())


def test_disable_adapter_runs_the_base_model():
    base_logits = logits(tiny_llama())
    model = trained()
    assert not torch.equal(logits(model), base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    assert not torch.equal(logits(model), base_logits)


def test_the_lifecycle_inside_applied_deltas_sees_the_pretrained_weights():
    # Inside the block a forward leaves W + delta in the base weights; every lifecycle call
    # must still act on the pretrained W.
    base_logits = logits(tiny_llama())
    pretrained = dict(tiny_llama().named_parameters())
    model = trained()
    adapted = logits(model)
    model.add_adapter("other", SpielConfig(density=0.05, seed=7))
    randomize(model, "other", seed=2)
    model.set_adapter("other")
    other = logits(model)
    model.set_adapter("default")

    def base_weights_are_pretrained():
        return all(torch.equal(p, pretrained[n.replace(".base_layer", "")])
                   for n, p in model.base_model.named_parameters() if "spiel_deltas" not in n)

    with model.applied_deltas():
        assert not base_weights_are_pretrained()  # written when the block opens
        assert torch.equal(logits(model), adapted)
        assert not base_weights_are_pretrained()  # and they stay written in
        with model.disable_adapter():
            assert torch.equal(logits(model), base_logits)
        model.set_adapter("other")
        assert torch.equal(logits(model), other)
        model.set_adapter(["default", "other"])
        both = logits(model)
        model.set_adapter("default")
        assert torch.equal(logits(model), adapted)
        model.merge()
        assert torch.equal(logits(model), adapted)
        model.unmerge()
        assert base_weights_are_pretrained()
        assert torch.equal(logits(model), adapted)
        model.restore_base_weights()
        assert base_weights_are_pretrained()
    assert base_weights_are_pretrained()
    model.set_adapter(["default", "other"])
    assert torch.equal(logits(model), both)
    model.set_adapter("default")
    with model.applied_deltas():
        logits(model)
        plain = model.unload()
    assert torch.equal(logits(plain), base_logits)


def test_generate_applies_the_deltas_once_and_leaves_the_base_as_it_was():
    model = trained()
    pretrained = {n: layer.weight.clone() for n, layer in model.spiel_layers().items()}
    out = model.generate(input_ids=IDS[:, :4], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        step = IDS[:, :4]
        for _ in range(5):  # greedy decoding by hand, each forward patching W per use
            step = torch.cat([step, model(input_ids=step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step)
    for name, layer in model.spiel_layers().items():
        assert torch.equal(layer.weight, pretrained[name]), name


def test_disable_adapter_and_set_adapter_unmerge_a_merged_model_first():
    base_logits = logits(tiny_llama())
    model = trained()
    adapted = logits(model)
    model.merge()
    with pytest.warns(UserWarning, match="unmerging"), model.disable_adapter():
        assert torch.equal(logits(model), base_logits)  # not W + delta
    assert torch.equal(logits(model), adapted)  # unmerged, the deltas run in the forward again
    model.merge()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("default")
    assert not any(layer.merged_adapters for layer in model.spiel_layers().values())
    assert torch.equal(logits(model), adapted)


def test_unmerge_restores_the_positions_merged_even_if_indices_moved():
    model = trained()
    before = {n: p.clone() for n, p in model.base_model.named_parameters()}
    model.merge()
    for delta in model.sparse_deltas().values():  # as a selector update would
        k = delta.values.numel()
        moved = torch.randperm(delta.numel_dense, generator=torch.Generator().manual_seed(3))[:k]
        delta.reassign(moved.sort().values, torch.full((k,), -1))
    model.unmerge()
    for n, p in model.base_model.named_parameters():
        if "spiel_deltas" not in n:  # the pretrained weights
            assert torch.equal(p, before[n]), n


def test_a_merged_model_cast_to_bf16_unmerges_to_the_cast_pretrained_weights():
    model = trained()
    expected = {n: p.to(torch.bfloat16) for n, p in model.base_model.named_parameters()}
    model.merge()
    model.to(torch.bfloat16)  # the merge backups stay float32
    model.unmerge()
    assert not any(layer.merged_adapters for layer in model.spiel_layers().values())
    for n, p in model.base_model.named_parameters():
        if "spiel_deltas" not in n:
            assert torch.equal(p, expected[n]), n
    model.set_adapter("default")  # not stuck half merged


def _dense_deltas(model, adapter):
    return {n: d.to_dense(torch.float32) for n, d in model.sparse_deltas(adapter).items()}


def test_save_every_adapter_in_peft_layout(tmp_path):
    model = trained()
    model.add_adapter("task", SpielConfig(density=0.05, seed=3))
    randomize(model, "task", seed=4)
    model.save_pretrained(tmp_path)  # as peft: every adapter when none is selected
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).is_file()
    assert (tmp_path / "task" / ADAPTER_WEIGHTS_NAME).is_file()
    again = SpielModel.from_pretrained(tiny_llama(), tmp_path)
    again.load_adapter(tmp_path / "task", "task")
    for name in ("default", "task"):
        for module, delta in model.sparse_deltas(name).items():
            loaded = again.sparse_deltas(name)[module]
            assert torch.equal(loaded.indices, delta.indices)
            assert torch.equal(loaded.values, delta.values)


def test_save_selected_adapters_and_options(tmp_path):
    model = trained()
    model.add_adapter("task", SpielConfig(density=0.05, seed=3))
    randomize(model, "task", seed=4)
    model.save_pretrained(tmp_path / "sel", selected_adapters=["task"])
    assert sorted(p.relative_to(tmp_path / "sel").as_posix() for p in (tmp_path / "sel").rglob("*.*")) == [
        f"task/{ADAPTER_CONFIG_NAME}", f"task/{ADAPTER_WEIGHTS_NAME}"
    ]
    # Not the main process (DDP): nothing written, as peft.
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(ValueError, match="not both"):
        model.save_pretrained(tmp_path / "both", adapter_name="task", selected_adapters=["task"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "file")
    assert not (tmp_path / "pickle").exists() and not (tmp_path / "both").exists()


@pytest.mark.parametrize("name", ["", " ", "a/b", "../up", "/abs", "a.b", "a\\b", 3])
def test_adapter_names_must_be_plain_names(tmp_path, name):
    model = trained()
    with pytest.raises(ValueError, match="is not a plain name"):
        model.add_adapter(name, SpielConfig(density=0.05))
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


def test_loading_a_folder_of_named_adapters_points_to_the_subfolder(tmp_path):
    model = SpielModel.from_pretrained(tiny_llama(), _saved_folder(tmp_path / "one"), adapter_name="a")
    model.save_pretrained(tmp_path / "out")  # "a" is not "default": peft puts it in out/a
    with pytest.raises(FileNotFoundError, match=r"subfolders.*out/a"):
        SpielModel.from_pretrained(tiny_llama(), tmp_path / "out")
    again = SpielModel.from_pretrained(tiny_llama(), tmp_path / "out" / "a")
    assert torch.equal(logits(again), logits(model))


def _saved_folder(path):
    trained().save_pretrained(path)
    return path


def test_several_adapters_add_up_and_can_be_deleted(tmp_path):
    first = trained()
    first.save_pretrained(tmp_path / "a")
    second = get_spiel_model(tiny_llama(), SpielConfig(density=0.05, seed=7))
    randomize(second, seed=2)
    second.save_pretrained(tmp_path / "b")

    model = SpielModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", "b")
    model.set_adapter(["a", "b"])
    both = logits(model)
    # Reference: the sum of both deltas merged densely into a fresh base model.
    ref = tiny_llama()
    da, db = _dense_deltas(model, "a"), _dense_deltas(model, "b")
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name in da:
                module.weight += da[name] + db[name]
    torch.testing.assert_close(both, logits(ref))
    model.set_adapter("b")
    assert torch.equal(logits(model), logits(second))
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"]
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("a")


def test_weighted_composition_is_exact_task_arithmetic(tmp_path):
    model = trained()
    model.add_adapter("task", SpielConfig(density=0.05, seed=3))
    randomize(model, "task", seed=4)
    model.add_weighted_adapter(["default", "task"], [1.0, -0.5], "combo")
    d0, d1, dc = (_dense_deltas(model, a) for a in ("default", "task", "combo"))
    for name in d0:
        torch.testing.assert_close(dc[name], d0[name] - 0.5 * d1[name])
        union = (d0[name] != 0) | (d1[name] != 0)
        assert model.sparse_deltas("combo")[name].values.numel() == int(union.sum())
    model.save_pretrained(tmp_path, adapter_name="combo")
    reloaded = SpielModel.from_pretrained(tiny_llama(), tmp_path)
    model.set_adapter("combo")
    assert torch.equal(logits(reloaded), logits(model))


# -- invalid files -------------------------------------------------------------------------------


def _saved(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    return load_file(path), json.loads(meta["spielft"])


def _rewrite(tmp_path, tensors, meta):
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS_NAME, metadata={"spielft": json.dumps(meta)})


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t, m: m["modules"].__setitem__("model.layers.9.mlp.up_proj", m["modules"].pop(Q))
         or t.__setitem__("model.layers.9.mlp.up_proj.indices", t.pop(f"{Q}.indices"))
         or t.__setitem__("model.layers.9.mlp.up_proj.values", t.pop(f"{Q}.values")),
         "module 'model.layers.9.mlp.up_proj': the base model has no such module"),
        (lambda t, m: t[f"{Q}.indices"].__setitem__(0, 64 * 64), f"module '{Q}': indices out of range"),
        (lambda t, m: t[f"{Q}.indices"].__setitem__(1, t[f"{Q}.indices"][0]), f"module '{Q}': duplicated indices"),
        (lambda t, m: m["modules"][Q].__setitem__("shape", [32, 64]), f"module '{Q}': adapter was trained for shape"),
        (lambda t, m: t.__setitem__(f"{Q}.indices", t[f"{Q}.indices"].float()), "indices must be a 1-D int32/int64"),
        (lambda t, m: t.__setitem__(f"{Q}.values", t[f"{Q}.values"][:-1]), "values must be floating point with one per index"),
        (lambda t, m: m.__setitem__("format_version", 99), "unknown format version 99"),
        (lambda t, m: m.pop("modules"), "safetensors: the spielft metadata lacks ['modules']"),
        (lambda t, m: m.pop("config"), "the spielft metadata lacks ['config']"),
        (lambda t, m: m["modules"].clear(), "the spielft metadata lists no modules"),
        (lambda t, m: m["modules"][Q].pop("num_deltas"),
         f"module '{Q}': the metadata needs a 'shape' list and a 'num_deltas'"),
        (lambda t, m: m["config"].__setitem__("regrowth", "xx"),
         "invalid adapter config: SpielConfig.regrowth"),
    ],
)
def test_invalid_adapter_files_fail_with_specific_errors(tmp_path, corrupt, message):
    tensors, meta = _saved(tmp_path)
    corrupt(tensors, meta)
    _rewrite(tmp_path, tensors, meta)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        SpielModel.from_pretrained(tiny_llama(), tmp_path)


def test_metadata_that_is_not_json_names_the_file(tmp_path):
    tensors, _ = _saved(tmp_path)
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS_NAME, metadata={"spielft": '{"modules": '})
    message = f"{ADAPTER_WEIGHTS_NAME}: the spielft metadata is not valid JSON"
    with pytest.raises(ValueError, match=message):
        SpielModel.from_pretrained(tiny_llama(), tmp_path)


def test_saving_an_unknown_adapter_names_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\] .* available: \['default'\]"):
        trained().save_pretrained(tmp_path, adapter_name="nope")
    assert not list(tmp_path.iterdir())


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x80\x04 definitely a pickle, not safetensors")
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        SpielModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing is not a folder, nor a Hugging Face Hub repo id"):
        SpielModel.from_pretrained(tiny_llama(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a spielft adapter folder"):
        SpielModel.from_pretrained(tiny_llama(), tmp_path / "empty")


def test_interrupted_save_leaves_previous_adapter_readable(tmp_path, monkeypatch):
    old = trained()
    old.save_pretrained(tmp_path)
    expected = logits(old)
    new = trained()
    randomize(new, seed=9)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(spiel_model_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert torch.equal(logits(SpielModel.from_pretrained(tiny_llama(), tmp_path)), expected)


# -- whole lines (SpielConfig.structure) ----------------------------------------------------------


@pytest.mark.parametrize("structure, axis", [("rows", 0), ("columns", 1)])
def test_a_structured_adapter_is_whole_lines_and_round_trips(tmp_path, structure, axis):
    model = trained(structure=structure)
    budget = round(0.05 * sum(d.numel_dense for d in model.sparse_deltas().values()))
    total = 0
    for delta in model.sparse_deltas().values():
        assert delta.line_axis == axis  # nn.Linear: rows are stored rows (output features)
        assert is_whole_lines(delta.indices, delta.shape, axis)
        assert 1 <= delta.lines().numel() <= delta.shape[axis]
        total += delta.values.numel()
    assert abs(total - budget) <= sum(max(d.shape) for d in model.sparse_deltas().values())
    model.save_pretrained(tmp_path)
    loaded = SpielModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].structure == structure
    assert all(d.line_axis == axis for d in loaded.sparse_deltas().values())
    assert torch.equal(logits(loaded), logits(model))


def test_a_structured_adapter_whose_indices_are_not_lines_is_refused_whole(tmp_path):
    tensors, meta = _saved(tmp_path)  # an unstructured adapter...
    meta["config"]["structure"] = "rows"  # ...that claims whole rows
    _rewrite(tmp_path, tensors, meta)
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"module '.*': the config says structure='rows', but the"):
        SpielModel.from_pretrained(base, tmp_path)
    assert not any("Spiel" in type(m).__name__ for m in base.modules())  # nothing wrapped


def test_weighted_sum_of_rows_is_rows_and_of_rows_and_columns_is_unstructured():
    model = trained(structure="rows")
    model.add_adapter("more_rows", SpielConfig(density=0.05, structure="rows", seed=3))
    model.add_adapter("columns", SpielConfig(density=0.05, structure="columns", seed=4))
    model.add_weighted_adapter(["default", "more_rows"], [1.0, 1.0], "rows_sum")
    model.add_weighted_adapter(["default", "columns"], [1.0, 1.0], "mixed")
    assert model.peft_config["rows_sum"].structure == "rows"
    assert all(d.line_axis == 0 for d in model.sparse_deltas("rows_sum").values())
    assert model.peft_config["mixed"].structure == "unstructured"
    # Active together, rows and columns are combined and computed as plain entries.
    model.set_adapter(["default", "columns"])
    together = logits(model)
    model.set_adapter("mixed")
    torch.testing.assert_close(logits(model), together)
