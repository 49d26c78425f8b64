"""SpielTrainer / SpielCallback: training, schedule stepping, adapter-only checkpoints, resume.

Tiny Llama models built from a config, fixed token data, CPU only, nothing downloaded.
"""

import json
import logging
import os
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers.trainer
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, TrainingArguments
from transformers import logging as hf_logging

import spielft.trainer
from spielft import SM3, SparseAdamW, SpielConfig, SpielModel, get_spiel_model
from spielft.model import ADAPTER_WEIGHTS_NAME
from spielft.trainer import (
    SELECTOR_STATE_NAME,
    SELECTOR_TENSORS_NAME,
    SpielCallback,
    SpielTrainer,
    SpielTrainerMixin,
    create_spiel_optimizer,
    create_spiel_optimizer_and_scheduler,
)
from tiny_models import tiny_llama

MAX_STEPS = 12
RESELECTION = 4  # updates at steps 4 (full reselection) and 8; not at 12 (= total_steps)
SAVE_AT = 7  # inside the AG accumulation window of the update at step 8 (steps 7 and 8)


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    # Tiny matrices: threads only cost time, and oversubscribe the shared cores badly.
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)


def _tiny_spiel(regrowth="ag", **overrides):
    fields = dict(
        density=0.05,
        regrowth=regrowth,
        reselection_steps=RESELECTION,
        accumulation_steps=2,
    )
    fields.update(overrides)
    return get_spiel_model(tiny_llama(), SpielConfig(**fields))


def _token_dataset(n=32, length=16):
    """Arithmetic sequences (step 7 mod 128): learnable, fixed, with an extra unused column."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 128, (n,), generator=g)
    ids = [((s + 7 * torch.arange(length)) % 128).tolist() for s in starts]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "source": ["synthetic"] * n})


def _training_fields(output_dir: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """The training-argument fields shared by `_args` and `_sft`, updated with ``overrides``."""
    fields = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return fields


def _args(output_dir, **overrides):
    return TrainingArguments(**_training_fields(output_dir, **overrides))


def _snapshot(model):
    return {
        n: (d.indices.clone(), d.values.detach().clone()) for n, d in model.sparse_deltas().items()
    }


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _updates(trainer):
    return {h["step"]: h for h in trainer.state.log_history if "spiel/indices_changed" in h}


class _CountingCallback(SpielCallback):
    def __init__(self, model=None):
        super().__init__(model)
        self.optimizer_steps, self.micro_batches = [], 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps.append(state.global_step)
        return super().on_optimizer_step(args, state, control, **kwargs)

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1
        return super().on_substep_end(args, state, control, **kwargs)


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_spiel_trainer_trains_and_steps_selector_once_per_optimizer_step(tmp_path, regrowth):
    model = _tiny_spiel(regrowth, full_first_reselection=True)
    before = _snapshot(model)
    budget = sum(d.values.numel() for d in model.sparse_deltas().values())
    counter = _CountingCallback()
    trainer = SpielTrainer(
        model=model,
        args=_args(tmp_path, weight_decay=0.01, adam_beta2=0.99),
        train_dataset=_token_dataset(),
        callbacks=[counter],
        sm3_momentum=0.5,
    )
    assert trainer.spiel_callback is counter  # the user's callback is used, not a second one
    trainer.train()

    opt = trainer.selector.optimizer
    if regrowth == "ag":
        assert isinstance(opt, SparseAdamW)
        assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    else:
        assert isinstance(opt, SM3)
        assert opt.param_groups[0]["momentum"] == 0.5
    assert opt.param_groups[0]["weight_decay"] == 0.01

    # Once per optimizer step (12), not per micro-batch (24 with gradient_accumulation_steps=2).
    assert counter.optimizer_steps == list(range(MAX_STEPS))
    assert counter.micro_batches == MAX_STEPS  # the first micro-batch of each step
    assert trainer.selector.step_count == trainer.state.global_step == MAX_STEPS
    assert trainer.selector.num_updates == 2
    updates = _updates(trainer)
    assert sorted(updates) == [4, 8]
    assert updates[4]["spiel/reselection_rate"] == 1.0  # full first reselection
    # A full reselection regrows the whole budget; positions it picks again keep their deltas
    # and do not count as changed (a random start overlaps the gradient's choice a little).
    assert budget / 2 < updates[4]["spiel/indices_changed"] <= budget
    assert updates[8]["spiel/reselection_rate"] == pytest.approx(0.2 * (1 - 8 / MAX_STEPS))
    assert 0 < updates[8]["spiel/indices_changed"] < budget

    after = _snapshot(model)
    assert any(not torch.equal(before[n][0], after[n][0]) for n in before)  # indices moved
    losses = _losses(trainer)
    assert losses[MAX_STEPS] < losses[1] - 0.1
    # No dense-gradient capture left armed after training.
    assert all(d.grad_capture is None for d in model.sparse_deltas().values())


class _BaseWeightProbe(SpielCallback):
    """Records, at each step end, whether the targeted base weights hold the deltas; can fail."""

    def __init__(self, pretrained, fail_at=None):
        super().__init__()
        self.pretrained, self.fail_at, self.applied = pretrained, fail_at, []

    def on_step_end(self, args, state, control, **kwargs):
        layers = self.model.spiel_layers()
        self.applied.append(any(not torch.equal(layers[n].weight, w)
                                for n, w in self.pretrained.items()))
        if state.global_step == self.fail_at:
            raise KeyError("stop")
        return super().on_step_end(args, state, control, **kwargs)


@pytest.mark.parametrize(("keep_applied", "fail_at"), [(False, None), (True, None), (True, 3)])
def test_spiel_trainer_keeps_deltas_applied_only_when_asked_and_restores_the_base(
    tmp_path, keep_applied, fail_at
):
    def train(keep):
        model = _tiny_spiel("ma")
        pretrained = {n: layer.weight.clone() for n, layer in model.spiel_layers().items()}
        probe = _BaseWeightProbe(pretrained, fail_at)
        trainer = SpielTrainer(model=model, args=_args(tmp_path), train_dataset=_token_dataset(),
                               callbacks=[probe], keep_deltas_applied=keep)
        if fail_at is None:
            trainer.train()
        else:
            with pytest.raises(KeyError):
                trainer.train()
        for name, layer in model.spiel_layers().items():
            assert torch.equal(layer.weight, pretrained[name]), name
        return probe.applied, _losses(trainer)

    applied, losses = train(keep_applied)
    assert len(applied) == (fail_at or MAX_STEPS)
    if keep_applied:
        # W holds W + delta between steps (from step 2: the deltas start at 0), same results.
        assert all(applied[1:])
        assert losses == train(False)[1]
    else:
        assert not any(applied)


def test_spiel_trainer_evaluates_with_loss(tmp_path):
    model = _tiny_spiel("ag")
    data = _token_dataset(n=8)
    trainer = SpielTrainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=data, eval_dataset=data
    )
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(4.85, abs=0.1)  # ~ ln(128) before training


def test_create_spiel_optimizer_maps_training_arguments(tmp_path):
    args = _args(
        tmp_path,
        learning_rate=5e-3,
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        warmup_steps=3,
        lr_scheduler_type="linear",
        optim_args="momentum=0.7",
    )
    opt, sched = create_spiel_optimizer_and_scheduler(_tiny_spiel("ag"), args, 10)
    group = opt.param_groups[0]
    assert isinstance(opt, SparseAdamW)
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.1)
    assert sched.get_last_lr()[0] == 0.0  # linear warmup from 0
    for _ in range(3):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(5e-3)

    ma = _tiny_spiel("ma")
    assert create_spiel_optimizer(ma, args).param_groups[0]["momentum"] == 0.7
    assert create_spiel_optimizer(ma, args, sm3_momentum=0.0).param_groups[0]["momentum"] == 0.0
    with pytest.raises(TypeError, match="SpielModel"):
        create_spiel_optimizer(torch.nn.Linear(2, 2), args)


# -- checkpoints and resume ------------------------------------------------------------------------
def _train(tmp_path, regrowth, resume=None, **overrides):
    model = _tiny_spiel(regrowth, **overrides)
    trainer = SpielTrainer(
        model=model,
        args=_args(tmp_path, save_strategy="steps", save_steps=SAVE_AT),
        train_dataset=_token_dataset(),
        sm3_momentum=0.9,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize(
    "regrowth, structure", [("ag", "unstructured"), ("ma", "unstructured"), ("ma", "rows")]
)
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, regrowth, structure):
    config = dict(normalize_regrowth_by_input=True, structure=structure)
    if structure == "rows":  # enough rows per matrix that each update regrows some
        config["density"] = 0.2
    full_model, full = _train(tmp_path, regrowth, **config)
    checkpoint = tmp_path / f"checkpoint-{SAVE_AT}"
    saved = json.loads((checkpoint / SELECTOR_STATE_NAME).read_text())["state"]
    assert saved["step_count"] == SAVE_AT and saved["num_updates"] == 1
    # Saved mid-window: step 7's statistics are in the checkpoint (AG: gradient sums and input
    # mean squares; MA: the input mean squares of its input-normalised scores, or its lines'
    # energies and the state of the generator of their random projections).
    assert saved["accumulators"]
    count = "count" if structure == "rows" else "input_count"
    assert all(acc[count] == 2 for acc in saved["accumulators"].values())  # 2 micro-batches

    # A fresh model (new random indices) and trainer pick up from the checkpoint.
    resumed_model, resumed = _train(tmp_path / "resumed", regrowth, resume=str(checkpoint), **config)
    assert resumed.selector.step_count == MAX_STEPS
    assert resumed.selector.num_updates == 2  # one before the checkpoint, one after
    new_updates = {s: h for s, h in _updates(resumed).items() if s > SAVE_AT}
    assert sorted(new_updates) == [8]
    assert new_updates[8] == pytest.approx(
        {**_updates(full)[8], "spiel/update_seconds": new_updates[8]["spiel/update_seconds"]}
    )  # same rate (no second full reselection), same number of changed indices

    full_state, resumed_state = _snapshot(full_model), _snapshot(resumed_model)
    for name, (indices, values) in full_state.items():
        assert torch.equal(resumed_state[name][0], indices), name
        torch.testing.assert_close(resumed_state[name][1], values, rtol=1e-5, atol=1e-6)
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    for step in range(SAVE_AT + 1, MAX_STEPS + 1):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)


def test_resume_restores_a_module_trained_in_full(tmp_path):
    full_model, full = _train(tmp_path, "ag", modules_to_save=["norm"])
    resumed_model, resumed = _train(
        tmp_path / "resumed", "ag", resume=str(tmp_path / f"checkpoint-{SAVE_AT}"),
        modules_to_save=["norm"],
    )
    # The copy's values and its Adam moments (in optimizer.pt) both came back: same training.
    full_norm, resumed_norm = (
        m.base_model.get_submodule("model.norm").modules_to_save["default"].weight
        for m in (full_model, resumed_model)
    )
    assert not torch.equal(full_norm, torch.ones_like(full_norm))  # it trained
    torch.testing.assert_close(resumed_norm, full_norm, rtol=1e-5, atol=1e-6)
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    for step in range(SAVE_AT + 1, MAX_STEPS + 1):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)


def test_checkpoints_hold_adapter_and_selector_state_only(tmp_path):
    model, trainer = _train(tmp_path, "ag")
    checkpoint = tmp_path / f"checkpoint-{SAVE_AT}"
    files = set(os.listdir(checkpoint))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        SELECTOR_STATE_NAME,
        SELECTOR_TENSORS_NAME,
        "optimizer.pt",
        "trainer_state.json",
    } <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    assert not any(
        f.startswith("spiel") and f.endswith((".pt", ".pth", ".bin", ".pkl")) for f in files
    )
    # Only sparse deltas in the weights file: indices and values, `budget` of each.
    budget = sum(d.values.numel() for d in model.sparse_deltas().values())
    with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        assert all(k.endswith((".indices", ".values")) for k in keys)
        assert sum(fh.get_slice(k).get_shape()[0] for k in keys if k.endswith(".values")) == budget
    # The selector state: plain JSON integers plus safetensors tensors.
    meta = json.loads((checkpoint / SELECTOR_STATE_NAME).read_text())
    assert isinstance(meta["state"]["step_count"], int)
    acc = next(iter(meta["state"]["accumulators"].values()))
    with safe_open(str(checkpoint / SELECTOR_TENSORS_NAME), framework="pt") as fh:
        assert fh.get_tensor(acc["grad_sum"]["__tensor__"]).dtype == torch.float32

    # save_model() writes the adapter, loadable onto a fresh base model.
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert "model.safetensors" not in os.listdir(out)
    reloaded = SpielModel.from_pretrained(LlamaForCausalLM(model.config), out)
    for name, delta in model.sparse_deltas().items():
        other = reloaded.sparse_deltas()[name]
        assert torch.equal(other.indices, delta.indices)
        assert torch.equal(other.values, delta.values.detach())


class _FakeHub:
    """Stands in for huggingface_hub's HfApi: records what each upload would send."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_name, **kwargs):
        return SimpleNamespace(repo_id=f"me/{repo_name}")

    def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
        self.uploads.append((path_in_repo, sorted(os.listdir(folder_path))))
        done = futures.Future()
        done.set_result(None)
        return done


def test_a_checkpoint_pushed_to_the_hub_holds_the_selector_state(tmp_path, monkeypatch):
    """The Trainer pushes a checkpoint before on_save runs: the selector state must be there."""
    hub = _FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    writes = []
    save = spielft.trainer.save_selector_state
    monkeypatch.setattr(
        spielft.trainer, "save_selector_state", lambda *a, **k: writes.append(a[1]) or save(*a, **k)
    )
    trainer = SpielTrainer(
        model=_tiny_spiel("ag"),
        args=_args(
            tmp_path, save_strategy="steps", save_steps=SAVE_AT, max_steps=SAVE_AT,
            push_to_hub=True, hub_strategy="checkpoint", hub_model_id="spiel-test",
        ),
        train_dataset=_token_dataset(),
    )
    trainer.train()
    pushed = dict(hub.uploads)["last-checkpoint"]
    assert {SELECTOR_STATE_NAME, SELECTOR_TENSORS_NAME, ADAPTER_WEIGHTS_NAME} <= set(pushed)
    assert ADAPTER_WEIGHTS_NAME in dict(hub.uploads)[None]  # the repo's top level, peft or not
    checkpoint = tmp_path / f"checkpoint-{SAVE_AT}"
    assert writes == [str(checkpoint)]  # once: on_save found it already written
    state = json.loads((checkpoint / SELECTOR_STATE_NAME).read_text())
    assert state["state"]["step_count"] == SAVE_AT
    # A second train() builds a new selector: its state is written again, not taken as done.
    trainer.train()
    assert writes == [str(checkpoint)] * 2
    # The final push uploads the model as it is now, not the checkpoint's (transformers calls
    # on_push_begin, which copies the checkpoint's adapter, before save_model there).
    with torch.no_grad():
        for delta in trainer.spiel_model.sparse_deltas().values():
            delta.values.add_(1.0)
    monkeypatch.setattr(trainer, "create_model_card", lambda **kwargs: None)
    trainer.push_to_hub()
    final = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    for name, delta in trainer.spiel_model.sparse_deltas().items():
        assert torch.equal(final[f"{name}.values"], delta.values.detach())


def test_resume_keeps_float32_optimizer_state_for_bf16_deltas(tmp_path):
    _train(tmp_path, "ag", delta_dtype="bfloat16")
    model, trainer = _train(
        tmp_path / "resumed",
        "ag",
        resume=str(tmp_path / f"checkpoint-{SAVE_AT}"),
        delta_dtype="bfloat16",
    )
    opt = trainer.selector.optimizer
    delta = next(iter(model.sparse_deltas().values()))
    assert delta.values.dtype == torch.bfloat16
    # torch's Optimizer.load_state_dict would have cast the moments to bfloat16.
    assert opt.state[delta.values]["exp_avg"].dtype == torch.float32
    assert opt.state[delta.values]["exp_avg_sq"].dtype == torch.float32


def test_resume_without_selector_state_continues_schedule_from_step(tmp_path, caplog):
    _train(tmp_path, "ma")
    checkpoint = tmp_path / f"checkpoint-{SAVE_AT}"
    os.remove(checkpoint / SELECTOR_STATE_NAME)
    with caplog.at_level(logging.WARNING, logger="spielft.trainer"):
        _, resumed = _train(tmp_path / "resumed", "ma", resume=str(checkpoint))
    assert "without spiel_selector_state.json" in caplog.text
    assert resumed.selector.num_updates == 2
    assert _updates(resumed)[8]["spiel/reselection_rate"] < 1.0  # no second full reselection


# -- trl SFTTrainer --------------------------------------------------------------------------------
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t2"
    )


def _text_dataset(n=32, length=15):
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 125, (n,), generator=g).tolist()
    texts = [" ".join(f"t{3 + (s + 7 * i) % 125}" for i in range(length)) for s in starts]
    return Dataset.from_dict({"text": texts})


def _sft(tmp_path, spiel, trainer_cls=None, callback=None, **overrides):
    from trl import SFTConfig, SFTTrainer

    fields = dict(bf16=False, save_strategy="steps", save_steps=SAVE_AT)
    fields.update(overrides)
    args = SFTConfig(**_training_fields(tmp_path, **fields))
    return (trainer_cls or SFTTrainer)(
        model=spiel.base_model,
        args=args,
        train_dataset=_text_dataset(),
        processing_class=_word_tokenizer(),
        optimizers=(create_spiel_optimizer(spiel, args), None),
        callbacks=[callback or SpielCallback(spiel)],
    )


def test_sft_trainer_with_spiel_callback_trains_saves_and_resumes(tmp_path):
    spiel = _tiny_spiel("ag")
    before = _snapshot(spiel)
    counter = _CountingCallback(spiel)
    trainer = _sft(tmp_path, spiel, callback=counter)
    trainer.train()
    assert counter.optimizer_steps == list(range(MAX_STEPS))
    assert counter.selector.step_count == MAX_STEPS and counter.selector.num_updates == 2
    assert sorted(_updates(trainer)) == [4, 8]
    losses = _losses(trainer)
    assert losses[MAX_STEPS] < losses[1] - 0.1
    after = _snapshot(spiel)
    assert any(not torch.equal(before[n][0], after[n][0]) for n in before)
    files = os.listdir(tmp_path / f"checkpoint-{SAVE_AT}")
    assert {SELECTOR_STATE_NAME, SELECTOR_TENSORS_NAME, "adapter_model.safetensors"} <= set(files)

    # train(resume_from_checkpoint=True): the callback finds checkpoint-7 in output_dir.
    spiel2 = _tiny_spiel("ag")
    callback2 = SpielCallback(spiel2)
    resumed = _sft(tmp_path, spiel2, callback=callback2)
    resumed.train(resume_from_checkpoint=True)
    assert callback2.selector.num_updates == 2
    for name, (indices, values) in after.items():
        assert torch.equal(spiel2.sparse_deltas()[name].indices, indices), name
        torch.testing.assert_close(spiel2.sparse_deltas()[name].values.detach(), values)


def test_sft_trainer_with_mixin_writes_adapter_only_checkpoints(tmp_path):
    from trl import SFTTrainer

    class SpielSFTTrainer(SpielTrainerMixin, SFTTrainer):
        pass

    spiel = _tiny_spiel("ma")
    trainer = _sft(tmp_path, spiel, trainer_cls=SpielSFTTrainer, max_steps=SAVE_AT)
    assert trainer.spiel_model is spiel
    trainer.train()
    assert trainer.spiel_callback.selector.step_count == SAVE_AT
    files = set(os.listdir(tmp_path / f"checkpoint-{SAVE_AT}"))
    assert {"adapter_model.safetensors", SELECTOR_STATE_NAME} <= files
    assert "model.safetensors" not in files
    assert any("spiel/indices_changed" in h for h in trainer.state.log_history)


def test_sft_trainer_given_the_spiel_model_itself_fails_clearly(tmp_path):
    from trl import SFTConfig, SFTTrainer

    spiel = _tiny_spiel("ag")
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=spiel,
        args=args,
        train_dataset=_text_dataset(n=4),
        processing_class=_word_tokenizer(),
        optimizers=(create_spiel_optimizer(spiel, args), None),
        callbacks=[SpielCallback(spiel)],
    )
    with pytest.raises(TypeError, match=r"model=spiel\.base_model"):
        trainer.train()


def test_callback_rejects_a_non_spiel_optimizer(tmp_path):
    spiel = _tiny_spiel("ag")
    trainer = SpielTrainer(
        model=spiel,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_token_dataset(n=8),
        optimizers=(torch.optim.AdamW([p for p in spiel.parameters() if p.requires_grad]), None),
    )
    with pytest.raises(TypeError, match="create_spiel_optimizer"):
        trainer.train()


def test_selector_state_resumes_on_another_number_of_processes_outside_a_window(tmp_path):
    from spielft.trainer import load_selector_state, save_selector_state

    spiel = _tiny_spiel("ag")
    optimizer = spiel.create_optimizer(lr=1e-3)
    saved = spiel.create_selector(optimizer, total_steps=MAX_STEPS)
    saved.step_count, saved.num_updates = 5, 1  # between windows: nothing per rank
    saved.accumulators.clear()
    for rank in (0, 1):
        save_selector_state(saved, tmp_path / "outside", rank=rank, world_size=2)
    resumed = spiel.create_selector(optimizer, total_steps=MAX_STEPS)
    load_selector_state(resumed, tmp_path / "outside", rank=0, world_size=1)
    assert (resumed.step_count, resumed.num_updates) == (5, 1)

    ids = torch.arange(16).view(1, 16)
    saved.step_count = RESELECTION - 1  # the last step of the window before the update at 4
    saved._arm()
    spiel(input_ids=ids, labels=ids).loss.backward()  # fills the per-rank gradient sums
    assert saved.state_dict()["accumulators"]
    save_selector_state(saved, tmp_path / "inside", rank=0, world_size=2)
    with pytest.raises(ValueError, match="inside a statistics window"):
        load_selector_state(resumed, tmp_path / "inside", rank=0, world_size=1)


# -- optimizer names, resume edge cases, wrappers ----------------------------------------------------
def test_create_spiel_optimizer_maps_8bit_names_and_warns_on_unsupported_ones(tmp_path, caplog):
    from spielft import SparseAdamW8bit

    spiel = _tiny_spiel("ag")
    cases = {
        "adamw_torch": (SparseAdamW, False),
        "adamw_bnb_8bit": (SparseAdamW8bit, False),
        "adamw_8bit": (SparseAdamW8bit, False),
        "paged_adamw_8bit": (SparseAdamW8bit, True),  # paging is not available: warned
        "adamw_torch_4bit": (SparseAdamW, True),
        "sgd": (SparseAdamW, True),
    }
    for name, (expected, warns) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spielft.trainer"):
            opt = create_spiel_optimizer(spiel, _args(tmp_path, optim=name))
        assert type(opt) is expected, name
        assert (name in caplog.text and type(opt).__name__ in caplog.text) == warns, name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spielft.trainer"):
        opt = create_spiel_optimizer(_tiny_spiel("ma"), _args(tmp_path, optim="adamw_bnb_8bit"))
    assert isinstance(opt, SM3) and "training with SM3" in caplog.text


def test_resume_without_selector_state_counts_updates_from_first_reselection_step(tmp_path):
    from types import SimpleNamespace

    spiel = _tiny_spiel("ag", first_reselection_step=2)  # updates at steps 2, 6 and 10
    callback = SpielCallback(spiel)
    for step, updates in [(1, 0), (2, 1), (7, 2), (10, 3), (MAX_STEPS, 3)]:
        callback.selector = spiel.create_selector(spiel.create_optimizer(), MAX_STEPS)
        callback.resume_from_checkpoint = str(tmp_path)  # no selector state in it
        state = SimpleNamespace(global_step=step, max_steps=MAX_STEPS)
        callback._restore(SimpleNamespace(), state, spiel, callback.selector.optimizer)
        assert (callback.selector.step_count, callback.selector.num_updates) == (step, updates)


def test_missing_per_rank_selector_tensors_file_is_named(tmp_path):
    from spielft.trainer import load_selector_state, save_selector_state

    spiel = _tiny_spiel("ag")
    selector = spiel.create_selector(spiel.create_optimizer(), total_steps=MAX_STEPS)
    selector.step_count = RESELECTION - 1  # inside the window of the update at step 4
    selector._arm()
    ids = torch.arange(16).view(1, 16)
    spiel(input_ids=ids, labels=ids).loss.backward()
    save_selector_state(selector, tmp_path, rank=0, world_size=2)  # rank 1: another machine
    with pytest.raises(ValueError, match=r"rank1\.safetensors is missing.*shared filesystem"):
        load_selector_state(selector, tmp_path, rank=1, world_size=2)


class _Wrapped:
    """What accelerate's AcceleratedOptimizer exposes: the optimizer and the fp16 scaler."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler
        self.param_groups = optimizer.param_groups


def test_callback_gives_the_selector_the_trainers_grad_scaler():
    from types import SimpleNamespace

    spiel = _tiny_spiel("ag")
    opt, scaler = spiel.create_optimizer(), torch.amp.GradScaler("cpu")
    callback = SpielCallback(spiel)
    state = SimpleNamespace(global_step=0, max_steps=MAX_STEPS)
    wrapped = _Wrapped(opt, scaler)
    callback.on_train_begin(SimpleNamespace(), state, None, model=spiel, optimizer=wrapped)
    assert callback.selector.optimizer is opt and callback.selector.grad_scaler is scaler


def test_callback_refuses_data_parallel():
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    spiel = _tiny_spiel("ag")
    callback = SpielCallback(spiel)
    state = SimpleNamespace(global_step=0, max_steps=MAX_STEPS)
    dp = SimpleNamespace(n_gpu=2, parallel_mode=ParallelMode.NOT_DISTRIBUTED)
    with pytest.raises(RuntimeError, match=r"nn\.DataParallel.*torchrun"):
        callback.on_train_begin(dp, state, None, model=spiel, optimizer=spiel.create_optimizer())
    ddp = SimpleNamespace(n_gpu=1, parallel_mode=ParallelMode.DISTRIBUTED)
    callback.on_train_begin(ddp, state, None, model=spiel, optimizer=spiel.create_optimizer())
