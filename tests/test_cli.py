"""The ``spielft`` command line end to end on a tiny local model and tiny JSONL files."""

import json
import math
import os
import stat
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_tokenizer
from spielft.cli import main
from spielft.layer import is_whole_lines

ANSWERS = {"red": "blue", "one": "two", "cat": "dog", "sun": "moon"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"question": f"Say the pair of {k}.", "answer": v} for k, v in ANSWERS.items()] * 6
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _train(tmp_path, model_dir, data, *extra):
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--fields", "question,answer",
                 "--output", str(out), "--max-steps", "6", "--batch-size", "4", "--eval-steps", "3",
                 "--val-size", "4", "--eval-examples", "4", "--max-new-tokens", "4",
                 "--reselection-steps", "2", "--accumulation-steps", "1", "--lr", "1e-2", *extra])
    assert code == 0
    return out


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma", "lora"])
def test_train_writes_adapter_metrics_and_pictures(tmp_path, tiny_model_dir, tiny_data, method):
    out = _train(tmp_path, tiny_model_dir, tiny_data, "--method", method)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == 6
    assert metrics["train_records"] == 20 and metrics["eval_records"] == 4
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert 0.0 <= metrics["after"]["exact_match"] <= 1.0
    assert any("eval_loss" in row for row in metrics["log_history"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    for picture in ["loss_curves.png"] + (["delta_distribution.png"] if method != "lora" else []):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if method.startswith("spiel"):
        saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert metrics["trainable_params"] == sum(m["num_deltas"] for m in saved["modules"].values())


@pytest.mark.parametrize("method", ["spiel-ma", "lora"])
def test_modules_to_save_train_in_full_and_are_saved(tmp_path, tiny_model_dir, tiny_data, method):
    out = _train(tmp_path, tiny_model_dir, tiny_data, "--method", method, "--modules-to-save", "norm")
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    # Only the final norm, for LoRA too (peft alone would also take every `..._layernorm`).
    norm = [t for k, t in tensors.items() if "norm" in k]
    assert len(norm) == 1 and not torch.equal(norm[0], torch.ones_like(norm[0]))  # it trained


def test_structure_trains_whole_lines(tmp_path, tiny_model_dir, tiny_data):
    out = _train(tmp_path, tiny_model_dir, tiny_data, "--method", "spiel-ma", "--structure", "rows",
                 "--density", "0.2", "--no-generate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["structure"] == "rows"
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for name, info in saved["modules"].items():
        assert is_whole_lines(tensors[f"{name}.indices"], tuple(info["shape"]), 0)


def test_keep_deltas_applied_trains_the_same_adapter(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    from spielft import SpielModel

    blocks = []
    opened = SpielModel.applied_deltas
    monkeypatch.setattr(SpielModel, "applied_deltas", lambda self: blocks.append(1) or opened(self))
    plain = _train(tmp_path / "plain", tiny_model_dir, tiny_data, "--method", "spiel-ma", "--no-generate")
    assert blocks == []
    applied = _train(tmp_path / "applied", tiny_model_dir, tiny_data, "--method", "spiel-ma", "--no-generate",
                     "--keep-deltas-applied")
    assert blocks == [1]  # training ran inside one block
    a, b = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (plain, applied))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_push_to_hub_uploads_the_adapter_after_training(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    import huggingface_hub

    from fake_hub import FakeHub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    out = _train(tmp_path, tiny_model_dir, tiny_data, "--method", "spiel-ma", "--no-generate",
                 "--push-to-hub", "me/run")
    pushed = hub.root / "me/run"
    assert (pushed / "adapter_model.safetensors").read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    files = {f.name for f in pushed.iterdir()}
    assert {"adapter_config.json", "README.md"} <= files and "training_args.bin" in os.listdir(out / "adapter")
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)  # no pickle leaves
    assert "library_name: spielft" in (pushed / "README.md").read_text()
    assert hub.commits[0][1]["commit_message"] == "spielft train --method spiel-ma"
    assert "pushed adapter/ to https://hub/me/run/commit/1" in capsys.readouterr().out

    # A failed upload loses nothing and says how to retry.
    def refuse(*args, **kwargs):
        raise PermissionError("403: no write access")

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: SimpleNamespace(create_repo=refuse))
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields", "question,answer",
                 "--output", str(tmp_path / "again"), "--max-steps", "2", "--batch-size", "4", "--val-size", "4",
                 "--eval-examples", "4", "--no-generate", "--push-to-hub", "me/run"])
    assert code == 1
    err = capsys.readouterr().err
    assert "403: no write access" in err and f"hf upload me/run {tmp_path / 'again' / 'adapter'}" in err
    assert (tmp_path / "again" / "adapter" / "adapter_model.safetensors").is_file()
    # Resuming the finished run trains nothing and retries the upload.
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields", "question,answer",
                 "--output", str(tmp_path / "again"), "--max-steps", "2", "--batch-size", "4", "--val-size", "4",
                 "--eval-examples", "4", "--no-generate", "--push-to-hub", "me/again", "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (hub.root / "me/again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "again" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_config_file_eval_merge_and_generate(tmp_path, tiny_model_dir, tiny_data, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("method: spiel-ag\ndensity: 0.2\nmax_steps: 6\nlr: 0.01\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--model", str(tiny_model_dir), "--data", str(tiny_data),
                 "--fields", "question,answer", "--output", str(out), "--batch-size", "4",
                 "--val-size", "4", "--eval-examples", "4", "--max-new-tokens", "4", "--no-generate"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["density"] == 0.2 and metrics["steps"] == 6

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                 "--data", str(tiny_data), "--fields", "question,answer", "--max-examples", "4",
                 "--max-new-tokens", "4", "--output", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["examples"] == evaluated["loss_examples"] == 4 and "exact_match" in evaluated

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                 "--output", str(merged)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~umask  # not tempfile's private 0700
    plain = AutoModelForCausalLM.from_pretrained(merged)
    from spielft import SpielModel

    adapted = SpielModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, adapted(input_ids=ids).logits)
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                 "--output", str(merged)]) == 2  # refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                 "--prompt", "Say the pair of red.", "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer != ""
    # Without --model, the base model the adapter records (here the tiny one, not the default).
    assert main(["generate", "--adapter", str(out / "adapter"),
                 "--prompt", "Say the pair of red.", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == answer
    assert f"using the adapter's base model {tiny_model_dir}" in captured.err
    from spielft import AutoSpielModelForCausalLM

    auto = AutoSpielModelForCausalLM.from_pretrained(out / "adapter")
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, adapted(input_ids=ids).logits)


def test_a_relative_model_path_is_recorded_so_the_adapter_finds_it_from_anywhere(
        tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir.name, "--data", str(tiny_data), "--fields", "question,answer",
                 "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--val-size", "4",
                 "--eval-examples", "4", "--no-generate"]) == 0
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert f"using the adapter's base model {recorded}" in capsys.readouterr().err


def test_an_adapter_trained_on_a_model_not_here_falls_back_to_the_default_and_says_so(tmp_path, capsys):
    from spielft.cli.common import base_for_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for base, expected, note in [("/nowhere/my-model", None, "trained on /nowhere/my-model, which is not a folder"),
                                 ("/home/u/.cache/spielft/SmolLM2-135M-Instruct", None, ""),
                                 (str(tmp_path), str(tmp_path), "using the adapter's base model")]:
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        assert base_for_adapter(str(adapter)) == expected
        err = capsys.readouterr().err
        assert note in err if note else err == ""


def test_resume_continues_from_checkpoint(tmp_path, tiny_model_dir, tiny_data):
    out = _train(tmp_path, tiny_model_dir, tiny_data)
    assert (out / "checkpoint-6").is_dir()
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields",
                 "question,answer", "--output", str(out), "--max-steps", "9", "--batch-size", "4",
                 "--val-size", "4", "--eval-examples", "4", "--no-generate", "--resume",
                 "--reselection-steps", "2", "--accumulation-steps", "1", "--lr", "1e-2"])
    assert code == 0
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    steps = [row["step"] for row in history if "loss" in row]
    # The history holds the first run's logs and then steps 7..9: continued, not restarted.
    assert len(steps) == len(set(steps)) and max(steps) == 9
    assert json.loads((out / "metrics.json").read_text())["steps"] == 9


def test_resume_of_a_finished_run_does_nothing(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = _train(tmp_path, tiny_model_dir, tiny_data)
    before = (out / "metrics.json").read_bytes()
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields",
                 "question,answer", "--output", str(out), "--max-steps", "6", "--batch-size", "4",
                 "--val-size", "4", "--eval-examples", "4", "--no-generate", "--resume"])
    assert code == 0
    assert "the run is finished, nothing to train" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == before
    assert not (out / "checkpoint-7").exists()


def test_overwrite_removes_the_earlier_runs_outputs(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    (out / "checkpoint-120").mkdir(parents=True)  # an earlier, longer run's
    (out / "checkpoint-120" / "adapter_model.safetensors").write_bytes(b"old")
    (out / "adapter").mkdir()  # an earlier spiel run's, which this full run would not replace
    (out / "delta_distribution.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")  # not a run output: stays
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields",
                 "question,answer", "--output", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--val-size", "4", "--eval-examples", "4", "--no-generate", "--overwrite",
                 "--save-steps", "1", "--method", "full"])
    assert code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "adapter").exists() and not (out / "delta_distribution.png").exists()
    assert (out / "model").is_dir() and (out / "notes.txt").read_text() == "mine"


def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, tiny_model_dir, capsys,
                                                           monkeypatch):
    from spielft.cli import train as recipe

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n')
    out = tmp_path / "run"
    with monkeypatch.context() as patch:  # the data file is read before the model loads
        patch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(bad), "--fields",
                     "question,answer", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert not out.exists() or not any(out.iterdir())
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("previous run")
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "previous run"
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


def test_train_on_a_4bit_base(tmp_path, tiny_model_dir, tiny_data):
    out = _train(tmp_path, tiny_model_dir, tiny_data, "--quantize", "nf4", "--no-generate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["args"]["quantize"] == "nf4"
    # The adapter reloads onto a 4-bit base and can be merged by dequantizing.
    from spielft.cli.common import apply_adapter, load_model

    model, _ = load_model(str(tiny_model_dir), quantize="nf4")
    adapted = apply_adapter(model, str(out / "adapter"))
    assert type(adapted.base_model.model.layers[0].mlp.up_proj).__name__ == "SpielLinear4bit"


def test_train_refuses_full_fine_tuning_of_a_quantized_base(tmp_path, tiny_model_dir, tiny_data, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields",
                 "question,answer", "--output", str(tmp_path / "run"), "--method", "full",
                 "--quantize", "nf4"])
    assert code == 2 and "cannot train a quantized base" in capsys.readouterr().err


def test_train_under_torchrun_two_processes(tmp_path, tiny_model_dir, tiny_data):
    import os
    import socket
    import subprocess
    import sys
    import warnings

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures = []
    for attempt in range(2):  # once more on a fresh port: the probed one can be taken meanwhile
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = tmp_path / f"ddp{attempt}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "spielft.cli", "train", "--model",
               str(tiny_model_dir), "--data", str(tiny_data), "--fields", "question,answer", "--output",
               str(out), "--max-steps", "4", "--batch-size", "2", "--val-size", "4", "--eval-examples",
               "4", "--reselection-steps", "2", "--accumulation-steps", "1", "--no-generate"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        if proc.returncode == 0:
            break
        failures.append(proc.stderr[-4000:])
    assert proc.returncode == 0, "\n--- retry ---\n".join(failures)
    if failures:
        warnings.warn(f"the first launch failed, the retry passed: {failures[0]}", stacklevel=1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 2  # really data-parallel
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert proc.stdout.count("after:") == 1  # only the main process evaluates and writes


def test_train_options_reach_the_spiel_config(tiny_tokenizer):
    import argparse

    from spielft.cli import train as recipe

    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    model = make_tiny_llama(tiny_tokenizer)
    args = parser.parse_args(["--method", "spiel-ma", "--reselection-steps", "8",
                              "--first-reselection-step", "2", "--full-first-reselection"])
    config = recipe.wrap_for_method(args, model).peft_config["default"]
    assert (config.regrowth, config.reselection_steps, config.first_reselection_step) == ("ma", 8, 2)
    assert config.full_first_reselection is True
    assert config.normalize_regrowth_by_input is True  # MA's default
    default = parser.parse_args(["--method", "spiel-ag"])
    ag = recipe.wrap_for_method(default, make_tiny_llama(tiny_tokenizer)).peft_config["default"]
    assert (ag.full_first_reselection, ag.normalize_regrowth_by_input) == (False, False)
    assert ag.ag_seed_optimizer_state is False
    seeded = parser.parse_args(["--method", "spiel-ag", "--ag-seed-optimizer-state"])
    assert recipe.wrap_for_method(seeded, make_tiny_llama(tiny_tokenizer)).peft_config[
        "default"].ag_seed_optimizer_state is True
    assert ag.weight_grad_dtype == "auto"
    bf16 = parser.parse_args(["--method", "spiel-ma", "--weight-grad-dtype", "bfloat16"])
    assert recipe.wrap_for_method(bf16, make_tiny_llama(tiny_tokenizer)).peft_config[
        "default"].weight_grad_dtype == "bfloat16"
    raw_ma = parser.parse_args(["--method", "spiel-ma", "--no-normalize-regrowth-by-input"])
    assert recipe.wrap_for_method(raw_ma, make_tiny_llama(tiny_tokenizer)).peft_config[
        "default"].normalize_regrowth_by_input is False


def test_planned_steps_counts_the_processes(monkeypatch):
    import argparse

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from spielft.cli import train as recipe

    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    args = parser.parse_args(["--batch-size", "4", "--epochs", "2"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert recipe.planned_steps(args, 100) == 50  # 25 batches, twice
    for world, accum in [(2, 1), (3, 1), (4, 2)]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args.grad_accum = accum
        # What each rank's dataloader holds under accelerate, and the Trainer's steps from it.
        shard = BatchSamplerShard(BatchSampler(range(100), 4, drop_last=False), num_processes=world,
                                  process_index=world - 1)
        assert recipe.planned_steps(args, 100) == 2 * math.ceil(len(shard) / accum)
    assert recipe.planned_steps(args, 100) == 8  # 25 batches -> 7 a rank -> 4 steps, twice
    args.max_steps = 30
    assert recipe.planned_steps(args, 100) == 30  # an explicit count stays


def test_config_file_values_are_checked_like_the_flags(tmp_path, capsys):
    from spielft.cli import apply_config_file, build_parser

    config = tmp_path / "run.yaml"
    for text, expected in [("method: foo\n", ["method", "'foo'", "spiel-ag"]),
                           ("dtype: float64\n", ["dtype", "'float64'", "bfloat16"]),
                           ("max_steps: 0.5\n", ["max_steps", "expected int", "0.5"]),
                           ("lr: fast\n", ["lr", "expected float", "'fast'"]),
                           ("packing: 3\n", ["packing", "true or false"]),
                           ("full_first_reselection: yes please\n",
                            ["full_first_reselection", "true or false"]),
                           ("help: true\n", ["unknown option(s) ['help']"])]:
        config.write_text(text)
        assert main(["train", "--config", str(config)]) == 2, text
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(part in err for part in expected), err
    # Values are converted as the flags' are: YAML reads 1e-3 as a string.
    config.write_text("lr: 1e-3\nmax_steps: 7\nquantize: null\ntarget_modules: q_proj\nresume: true\n"
                      "full_first_reselection: true\n")
    parser, commands = build_parser()
    argv = ["train", "--config", str(config), "--max-steps", "9"]
    args = apply_config_file(parser, commands["train"], argv, parser.parse_args(argv))
    assert (args.lr, args.max_steps, args.quantize) == (1e-3, 9, None)  # the flag still wins
    assert args.target_modules == ["q_proj"] and args.resume == "latest"
    assert args.full_first_reselection is True
    # An empty key keeps the default; ``resume: false`` is the flag left out.
    config.write_text("output:\ndata:\nresume: false\n")
    argv = ["train", "--config", str(config)]
    args = apply_config_file(parser, commands["train"], argv, parser.parse_args(argv))
    assert (args.output, args.data, args.resume) == ("runs/spielft", "demo", None)


@pytest.mark.parametrize("flags, message", [
    (["--method", "full", "--quantize", "nf4"], "cannot train a quantized base"),
    (["--lr", "0"], "--lr must be positive"),
    (["--density", "0"], "SpielConfig.density"),
    (["--method", "spiel-ma", "--reselection-steps", "0"], "SpielConfig.reselection_steps"),
    (["--initial-reselection-rate", "2"], "SpielConfig.initial_reselection_rate"),
    (["--first-reselection-step", "0"], "SpielConfig.first_reselection_step"),
    (["--match-lora-rank", "0"], "--match-lora-rank must be a positive integer"),
    (["--method", "lora", "--lora-rank", "0"], "--lora-rank must be a positive integer"),
    (["--method", "lora", "--keep-deltas-applied"], "--keep-deltas-applied is for spiel-ag/spiel-ma"),
    (["--keep-deltas-applied", "--quantize", "nf4"], "--keep-deltas-applied does nothing on a quantized base"),
    (["--push-to-hub", "not a repo!"], "'not a repo!' is not a Hugging Face Hub repo id"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--eval-examples", "0"], "--eval-examples must be at least 1"),
    (["--extractor", "bogus"], "Unknown answer extractor 'bogus'"),
    (["--eval-data", "held_out.jsonl"], "--eval-data is for --data FILE"),
    (["--val-size", "10"], "--val-size is for --data FILE"),
    (["--method", "full", "--modules-to-save", "norm"], "--modules-to-save is for spiel-ag/spiel-ma/lora"),
    (["--method", "lora", "--structure", "rows"], "--structure is for spiel-ag/spiel-ma"),
])
def test_bad_method_arguments_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, flags, message):
    from spielft.cli import train as recipe

    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", "--output", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_eval_output_folder_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from spielft.cli import evaluate as recipe

    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["eval", "--output", str(tmp_path / "missing" / "eval.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_match_lora_rank_still_counts_the_budget_on_the_model(tiny_tokenizer):
    import argparse

    from spielft.cli import train as recipe

    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    args = parser.parse_args(["--match-lora-rank", "2", "--density", "0.5"])
    model = make_tiny_llama(tiny_tokenizer)
    # The default targets: every linear layer of the blocks (lm_head is the output head).
    expected = sum(2 * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if n.rsplit(".", 1)[-1] in recipe.BLOCK_LINEARS)
    config = recipe.wrap_for_method(args, model, recipe.validate_args(args)).peft_config["default"]
    assert config.num_tunable_weights == expected


def test_default_targets_are_every_linear_but_the_head(tiny_tokenizer):
    import argparse

    from spielft.cli import train as recipe

    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    for flags in ([], ["--target-modules", "all-linear"]):
        args = parser.parse_args(flags)
        assert recipe.validate_args(args).target_modules is None
        model = recipe.wrap_for_method(args, make_tiny_llama(tiny_tokenizer), recipe.validate_args(args))
        names = {n.rsplit(".", 1)[-1] for n in model.spiel_layers()}
        assert names == set(recipe.BLOCK_LINEARS)
    lora = parser.parse_args(["--method", "lora"])
    assert recipe.validate_args(lora).target_modules == "all-linear"


def test_atomic_output_dir_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, monkeypatch):
    from spielft.cli.common import atomic_output_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or backup folder left

    real_replace = os.replace

    def failing_move_in(src, dst):  # the crash between moving the old folder aside and the new in
        if os.fspath(dst) == os.fspath(target) and not os.fspath(src).endswith(".old"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_move_in)
    with pytest.raises(OSError, match="disk gone"), atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "newer.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # put back
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from spielft.cli import merge as merge_recipe
    from spielft.cli import train as recipe
    from spielft.cli.common import atomic_output_dir

    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file, not a folder"), atomic_output_dir(target, True):
        pytest.fail("the block ran")

    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for extra in [[], ["--overwrite"], ["--resume"]]:
        assert main(["train", "--output", str(target), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err

    class Merged:
        def merge_and_unload(self):
            return self

        def save_pretrained(self, *args, **kwargs):
            pytest.fail("the merged model was written")

    monkeypatch.setattr(merge_recipe, "load_model", lambda *a, **k: (Merged(), Merged()))
    monkeypatch.setattr(merge_recipe, "apply_adapter", lambda model, adapter: model)
    assert main(["merge", "--adapter", "a", "--output", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
    assert target.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_generate_on_stdin_is_a_multi_turn_chat(tiny_model_dir, monkeypatch, capsys):
    import io

    from transformers import LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    calls = []  # (the text the model was given, its answer)
    real_generate = LlamaForCausalLM.generate

    def recording_generate(self, *args, **kwargs):
        output = real_generate(self, *args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        calls.append((tokenizer.decode(kwargs["input_ids"][0]),
                      tokenizer.decode(output[0, width:], skip_special_tokens=True).strip()))
        return output

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("Say the pair of red.\n\nAnd of one?\n"))
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    assert len(calls) == 2  # the blank line is no turn
    (first_input, first_answer), (second_input, _) = calls
    assert "And of one?" not in first_input
    first_turn = (f"<|im_start|>user\nSay the pair of red.<|im_end|>\n"
                  f"<|im_start|>assistant\n{first_answer}<|im_end|>\n")
    assert first_turn + "<|im_start|>user\nAnd of one?<|im_end|>\n<|im_start|>assistant\n" in second_input
    capsys.readouterr()

    # --prompt stays one-shot: each prompt alone, no conversation
    calls.clear()
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "3",
                 "--prompt", "Say the pair of red."]) == 0
    assert len(calls) == 1 and calls[0][0].count("<|im_start|>") == 2  # the user's turn, the answer's


def test_gradient_checkpointing_flag_enables_it_without_deprecated_calls(tiny_tokenizer):
    import warnings

    from spielft import SpielConfig, get_spiel_model
    from spielft.cli import train as recipe

    spiel = get_spiel_model(make_tiny_llama(tiny_tokenizer), SpielConfig(density=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        recipe.enable_checkpointing(spiel)
    assert spiel.base_model.model.gradient_checkpointing
