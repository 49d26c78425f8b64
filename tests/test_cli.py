"""The ``spielft`` command line end to end on a tiny local model and tiny JSONL files."""

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_tokenizer
from spielft.cli import main

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
    assert evaluated["examples"] == 4 and "exact_match" in evaluated

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
    assert capsys.readouterr().out.strip() != ""


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


def test_overwrite_removes_the_earlier_runs_checkpoints(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    (out / "checkpoint-120").mkdir(parents=True)  # an earlier, longer run's
    (out / "checkpoint-120" / "adapter_model.safetensors").write_bytes(b"old")
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--fields",
                 "question,answer", "--output", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--val-size", "4", "--eval-examples", "4", "--no-generate", "--overwrite",
                 "--save-steps", "1"])
    assert code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n')
    out = tmp_path / "run"
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

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(port), "-m", "spielft.cli", "train", "--model",
           str(tiny_model_dir), "--data", str(tiny_data), "--fields", "question,answer", "--output",
           str(out), "--max-steps", "4", "--batch-size", "2", "--val-size", "4", "--eval-examples", "4",
           "--reselection-steps", "2", "--accumulation-steps", "1", "--no-generate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
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
                              "--no-full-first-reselection"])
    config = recipe.wrap_for_method(args, model).peft_config["default"]
    assert (config.regrowth, config.reselection_steps) == ("ma", 8)
    assert config.full_first_reselection is False
    default = parser.parse_args(["--method", "spiel-ag"])
    assert recipe.wrap_for_method(default, make_tiny_llama(tiny_tokenizer)).peft_config[
        "default"].full_first_reselection is True
