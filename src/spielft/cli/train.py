"""``spielft train``: instruction-tune a model with SpIEL (or LoRA / full fine-tuning to compare).

With no arguments it sparse-fine-tunes the embedded SmolLM2-135M-Instruct on the built-in demo
task and prints the held-out metrics before and after. Every flag can also come from a YAML
file (``--config run.yaml``, keys named like the flags with underscores); flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import get_int_from_env
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from ..config import SpielConfig
from ..data import (
    HELD_OUT_SPLITS,
    CausalLMCollator,
    load_records,
    tokenize_records,
    train_val_split,
)
from ..demo_data import demo_dataset
from ..distributed import destroy_process_groups
from ..evaluation import get_extractor
from ..hub import check_repo_id, model_card, push_saved
from ..model import (
    SpielModel,
    adapter_base_model,
    find_modules_to_save,
    find_target_modules,
    get_spiel_model,
)
from ..trainer import SpielTrainer
from .common import (
    DEMO,
    add_model_arguments,
    default_extractor,
    default_max_new_tokens,
    load_model,
    parse_fields,
    write_json,
)
from .evaluate import evaluate
from .plots import plot_delta_distribution, plot_loss_curves

HELP = "Instruction-tune a model with SpIEL (default: the embedded model on the demo task)."
METHODS = ("spiel-ag", "spiel-ma", "lora", "full")
# A Llama block's linear layers: what the default targets select on Llama-style models (the
# benchmarks name them explicitly, e.g. for peft's SHiRA).
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Outputs of a run; --overwrite removes these (and nothing else) from --output.
RUN_OUTPUTS = ("adapter", "model", "metrics.json", "predictions.json", "loss_curves.png",
               "delta_distribution.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with any of these options")
    add_model_arguments(parser, adapter=False)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=DEMO, help="JSONL/JSON/CSV file or datasets folder (default: the built-in demo task)")
    data.add_argument("--fields", default=None, help="PROMPT,COMPLETION fields for other formats (e.g. question,answer)")
    data.add_argument("--eval-data", default=None, help="held-out file (default: a split of --data, or the demo test split)")
    data.add_argument("--eval-split", default=None,
                      help="split of a datasets folder given as --eval-data (default: test, else validation)")
    data.add_argument("--val-size", type=float, default=None,
                      help="held-out share (or count, if >= 1) cut from --data when there is no --eval-data, "
                           "at most --eval-examples (default: 0.05)")
    data.add_argument("--max-train-examples", type=int, default=None)
    data.add_argument("--eval-examples", type=int, default=100, help="held-out examples for the before/after metrics")
    data.add_argument("--max-length", type=int, default=256)
    data.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    data.add_argument("--train-on-prompt", action="store_true", help="also put the loss on prompt tokens")
    data.add_argument("--extractor", default=None,
                      help="answer extractor: exact, last_number, iso_date, regex:PATTERN (default: "
                           "iso_date on the demo task, else last_number; text answers are compared whole)")
    data.add_argument("--max-new-tokens", type=int, default=None)
    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="spiel-ag")
    method.add_argument("--density", type=float, default=0.01, help="SpIEL: share of the targeted weights")
    method.add_argument("--num-tunable-weights", type=int, default=None, help="SpIEL: absolute budget (overrides --density)")
    method.add_argument("--match-lora-rank", type=int, default=None, help="SpIEL: budget = LoRA rank R's parameter count")
    method.add_argument("--lora-rank", type=int, default=16)
    method.add_argument("--reselection-steps", type=int, default=20)
    method.add_argument("--first-reselection-step", type=int, default=None,
                        help="SpIEL: step of the first update (default: --reselection-steps)")
    method.add_argument("--accumulation-steps", type=int, default=5)
    method.add_argument("--initial-reselection-rate", type=float, default=0.2)
    method.add_argument("--full-first-reselection", action=argparse.BooleanOptionalAction, default=False,
                        help="SpIEL: the first update drops the whole random start, not only the scheduled share")
    method.add_argument("--normalize-regrowth-by-input", action=argparse.BooleanOptionalAction, default=None,
                        help="SpIEL: divide regrowth scores by the input feature's RMS (default: on for spiel-ma, off for spiel-ag)")
    method.add_argument("--ag-seed-optimizer-state", action=argparse.BooleanOptionalAction, default=False,
                        help="spiel-ag: start regrown deltas' Adam moments from their accumulated gradients, not zeros")
    method.add_argument("--weight-grad-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="SpIEL: dtype of the GEMM behind the weight gradient (auto: bfloat16 for a bf16 "
                             "model, else float32; bfloat16 on a float32 model: that GEMM 2x faster on "
                             "some CPUs, slower on others; spielft warns where it measures no gain)")
    method.add_argument("--structure", choices=["unstructured", "rows", "columns"], default="unstructured",
                        help="SpIEL: train any entries (the paper's method), or only whole rows (output "
                             "features) or columns (input features) of each matrix: faster steps at "
                             "LoRA-like budgets, a coarser method (see README)")
    method.add_argument("--keep-deltas-applied", action="store_true",
                        help="SpIEL: keep the deltas written into the base weights while training "
                             "(faster steps at high density, 8 more bytes per delta, 4 with --structure "
                             "rows/columns; the same results)")
    method.add_argument("--target-modules", nargs="*", default=None,
                        help="module-name suffixes, e.g. q_proj v_proj (default, or all-linear: every "
                             "linear layer but the output head)")
    method.add_argument("--modules-to-save", nargs="+", default=None, metavar="NAME",
                        help="spiel-*/lora: modules trained in full next to the adapter and saved "
                             "with it (names or suffixes, e.g. norm), as peft's modules_to_save")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--lr", type=float, default=None, help="default: 1e-3 (spiel-ag), 5e-3 (spiel-ma, SM3), 5e-4 (lora), 2e-5 (full)")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--epochs", type=float, default=None, help="default: 1")
    optim.add_argument("--max-steps", type=int, default=None,
                       help="overrides --epochs (default: 120 on the demo task unless --epochs is given)")
    optim.add_argument("--batch-size", type=int, default=8)
    optim.add_argument("--grad-accum", type=int, default=1)
    optim.add_argument("--warmup-steps", type=int, default=None, help="default: 3%% of the steps")
    optim.add_argument("--gradient-checkpointing", action="store_true")
    optim.add_argument("--seed", type=int, default=42)
    run = parser.add_argument_group("run")
    run.add_argument("--output", default="runs/spielft", help="output folder")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in a non-empty --output (an earlier run's outputs and checkpoints are removed)")
    run.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from the latest (or the given) checkpoint")
    run.add_argument("--eval-steps", type=int, default=None, help="held-out loss every N steps (default: 10 evaluations)")
    run.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: at each evaluation)")
    run.add_argument("--no-generate", action="store_true", help="skip exact-match generation before/after")
    run.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                     help="after training, upload the adapter (or the model, with --method full) to this "
                          "Hugging Face Hub repo (created if needed; HF_TOKEN or a saved login)")


# -- the pieces ----------------------------------------------------------------------------------------


def read_data(args) -> tuple[list[dict], list[dict]]:
    """Training and held-out records, validated: read before the model loads, so that a
    malformed file fails in seconds."""
    fields = parse_fields(args.fields)
    if args.data == DEMO:
        train_records = load_records(demo_dataset("train", args.max_train_examples))
        held_out = load_records(demo_dataset("test"))
    else:
        train_records = load_records(args.data, fields=fields)
        if args.eval_data:
            held_out = load_records(args.eval_data, fields=fields,
                                    split=args.eval_split or HELD_OUT_SPLITS)
        else:
            # Only the first --eval-examples held-out records are ever used: hold out no more.
            val_size = 0.05 if args.val_size is None else args.val_size
            count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(train_records)))
            train_records, held_out = train_val_split(train_records, min(count, args.eval_examples),
                                                      seed=args.seed)
        if args.max_train_examples:
            train_records = train_records[: args.max_train_examples]
    if not train_records or not held_out:
        raise ValueError("need at least one training and one held-out record")
    return train_records, held_out[: args.eval_examples]


def prepare_data(args, tokenizer, records: tuple[list[dict], list[dict]] | None = None
                 ) -> tuple[Any, Any, list[dict], dict[str, Any]]:
    """Train and eval datasets (tokenized), eval records for generation, and a summary."""
    train_records, eval_records = records if records is not None else read_data(args)
    train_set, train_stats = tokenize_records(train_records, tokenizer, max_length=args.max_length,
                                              train_on_prompt=args.train_on_prompt, packing=args.packing)
    eval_set, _ = tokenize_records(eval_records, tokenizer, max_length=args.max_length)
    summary = {"train_records": len(train_records), "eval_records": len(eval_records),
               "train_sequences": train_stats.num_sequences, "truncated": train_stats.num_truncated,
               "dropped": train_stats.num_dropped}
    return train_set, eval_set, eval_records, summary


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing, by the name this transformers gives it (it
    renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_parameter_count(model: torch.nn.Module, rank: int, config: SpielConfig) -> int:
    """LoRA rank ``rank``'s trainable parameters on the modules ``config`` targets."""
    saved = find_modules_to_save(model, config) if config.modules_to_save or config.task_type else None
    return sum(rank * sum(m.weight.shape) for m in find_target_modules(model, config, saved).values())


def target_modules(args) -> list[str] | None:
    """``--target-modules``, or None (every linear layer but the output head) for all-linear."""
    if not args.target_modules or args.target_modules == ["all-linear"]:
        return None
    return args.target_modules


def validate_args(args) -> Any:
    """Check what needs no model, and build the method's config: bad input fails in seconds.

    Returns the `SpielConfig` (spiel-*), the peft `LoraConfig` (lora) or ``None`` (full).
    """
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.method == "full" and args.quantize:
        raise ValueError("--method full cannot train a quantized base; drop --quantize or use spiel-ag/spiel-ma/lora")
    for flag in ("batch_size", "grad_accum", "eval_examples", "max_length", "max_train_examples",
                 "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if args.val_size is not None and args.val_size <= 0:
        raise ValueError(f"--val-size must be a positive share or count, got {args.val_size}")
    if args.data == DEMO:
        given = [f for f in ("fields", "eval_data", "eval_split", "val_size") if getattr(args, f) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is for --data FILE; the demo task has its own "
                             "fields and test split")
    elif args.eval_split is not None and not args.eval_data:
        raise ValueError("--eval-split picks the split of --eval-data; give --eval-data too")
    if args.extractor is not None:
        get_extractor(args.extractor)  # an unknown one fails now, not after the generations
    targets = target_modules(args)
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)
    if args.keep_deltas_applied and not args.method.startswith("spiel"):
        raise ValueError(f"--keep-deltas-applied is for spiel-ag/spiel-ma, not --method {args.method}")
    if args.keep_deltas_applied and args.quantize:
        raise ValueError("--keep-deltas-applied does nothing on a quantized base (its weights are "
                         "dequantized afresh at every use); drop one of the two")
    if args.structure != "unstructured" and not args.method.startswith("spiel"):
        raise ValueError(f"--structure is for spiel-ag/spiel-ma, not --method {args.method}")
    if args.modules_to_save and args.method == "full":
        raise ValueError("--modules-to-save is for spiel-ag/spiel-ma/lora: --method full trains every module")
    if args.method.startswith("spiel"):
        if args.match_lora_rank is not None and args.match_lora_rank < 1:
            raise ValueError(f"--match-lora-rank must be a positive integer, got {args.match_lora_rank}")
        # With --match-lora-rank the budget is counted on the model later: 1 stands in for it here.
        budget = 1 if args.match_lora_rank else args.num_tunable_weights
        return SpielConfig(density=args.density, num_tunable_weights=budget,
                           target_modules=targets, regrowth=args.method.split("-")[1],
                           reselection_steps=args.reselection_steps,
                           first_reselection_step=args.first_reselection_step,
                           accumulation_steps=min(args.accumulation_steps, args.reselection_steps),
                           initial_reselection_rate=args.initial_reselection_rate,
                           full_first_reselection=args.full_first_reselection,
                           normalize_regrowth_by_input=args.normalize_regrowth_by_input,
                           ag_seed_optimizer_state=args.ag_seed_optimizer_state,
                           weight_grad_dtype=args.weight_grad_dtype, structure=args.structure,
                           modules_to_save=args.modules_to_save, seed=args.seed)
    if args.method == "lora":
        from peft import LoraConfig

        if args.lora_rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {args.lora_rank}")
        return LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=targets or "all-linear", task_type="CAUSAL_LM",
                          modules_to_save=args.modules_to_save)
    return None


def resolve_modules_to_save(args, model: torch.nn.Module, config: Any) -> Any:
    """``config`` with ``--modules-to-save`` resolved to full module names on ``model``, so that
    LoRA (whose peft matches names as plain string suffixes) trains the modules SpIEL does."""
    if not args.modules_to_save or config is None:
        return config
    names = find_modules_to_save(model, SpielConfig(modules_to_save=args.modules_to_save))
    return dataclasses.replace(config, modules_to_save=names)


def wrap_for_method(args, model: torch.nn.Module, config: Any = None) -> torch.nn.Module:
    """Wrap ``model`` for ``args.method`` (``config``: `validate_args`'s, built here if not given)."""
    if config is None:
        config = resolve_modules_to_save(args, model, validate_args(args))
    if args.method.startswith("spiel"):
        if args.match_lora_rank:
            budget = lora_parameter_count(model, args.match_lora_rank, config)
            config = dataclasses.replace(config, num_tunable_weights=budget)
        return get_spiel_model(model, config)
    if args.method == "lora":
        from peft import get_peft_model

        return get_peft_model(model, config)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def default_lr(method: str) -> float:
    return {"spiel-ag": 1e-3, "spiel-ma": 5e-3, "lora": 5e-4, "full": 2e-5}[method]


class ProgressBar(ProgressCallback):
    """The Trainer's progress bar, with loss and tokens/s shown on the bar instead of printed.

    Held-out evaluations show their loss on the bar too, instead of a bar of their own.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[float, int] | None = None
        self.postfix: dict[str, str] = {}

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return  # no bar of its own: the loss of the evaluation goes on the training bar

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:  # a training log: update loss and throughput since the last one
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            self.postfix["loss"] = f"{logs['loss']:.3f}"
            if self._last is not None and now > self._last[0]:
                self.postfix["tok/s"] = f"{(seen - self._last[1]) / (now - self._last[0]):.0f}"
            self._last = (now, seen)
        if "eval_loss" in logs:
            self.postfix["eval_loss"] = f"{logs['eval_loss']:.3f}"
        self.training_bar.set_postfix(self.postfix, refresh=True)


def build_trainer(args, model, tokenizer, train_set, eval_set, steps: int) -> Trainer:
    eval_steps = args.eval_steps or max(1, steps // 10)
    training_args = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr or default_lr(args.method), weight_decay=args.weight_decay,
        num_train_epochs=args.epochs or 1.0, max_steps=args.max_steps, lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else math.ceil(0.03 * steps),
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps",
        save_steps=args.save_steps or eval_steps, save_total_limit=2, logging_steps=max(1, min(10, eval_steps)),
        logging_first_step=True, seed=args.seed, data_seed=args.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, include_num_input_tokens_seen=True, remove_unused_columns=False,
        label_names=["labels"],
    )
    if args.gradient_checkpointing:  # non-reentrant: the same gradients, inputs need no grad
        enable_checkpointing(model)
    common = dict(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                  data_collator=CausalLMCollator.from_tokenizer(tokenizer), processing_class=tokenizer)
    if isinstance(model, SpielModel):
        trainer = SpielTrainer(**common, keep_deltas_applied=args.keep_deltas_applied)
    else:
        trainer = Trainer(**common)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())
    return trainer


def world_size() -> int:
    """Processes of the launch (torchrun, accelerate, MPI), read from the environment as accelerate
    does, without creating its distributed state (see `run`)."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def planned_steps(args, num_sequences: int) -> int:
    """Optimizer steps the Trainer will take, counted as it does: every rank gets an even share
    of the batches (accelerate's sharding), and a partial accumulation window is a step."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    batches_per_rank = math.ceil(math.ceil(num_sequences / args.batch_size) / world_size())
    per_epoch = math.ceil(batches_per_rank / args.grad_accum)
    return max(1, math.ceil(per_epoch * (args.epochs or 1.0)))


def check_output(args) -> None:
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file, not a folder: choose another --output")
    if out.exists() and any(out.iterdir()) and not args.resume and not args.overwrite:
        raise FileExistsError(f"{out} is not empty: pass --resume to continue that run, --overwrite to start afresh, or another --output")
    if args.resume and args.resume != "latest" and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint folder")
    if args.resume == "latest" and not any(out.glob("checkpoint-*")):
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {out} to resume from")


def remove_previous_outputs(out: Path) -> list[Path]:
    """Delete an earlier run's outputs from ``out`` (for ``--overwrite``); other files stay.

    Left in place, its checkpoints would outrank this run's (the Trainer's rotation keeps the
    highest step numbers, and ``--resume`` would pick them), and its adapter, metrics and
    pictures would pass for this run's if this one failed.
    """
    stale = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    stale += [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def checkpoint_step(args) -> tuple[Path, int] | None:
    """The checkpoint ``--resume`` continues from and its step (None when not resuming)."""
    if not args.resume:
        return None
    # The checkpoint the Trainer itself picks for resume_from_checkpoint=True.
    folder = Path(get_last_checkpoint(args.output) if args.resume == "latest" else args.resume)
    state = folder / "trainer_state.json"
    step = json.loads(state.read_text()).get("global_step", 0) if state.is_file() else 0
    return folder, int(step)


# -- the recipe ----------------------------------------------------------------------------------------


DEMO_STEPS = 120  # measured: 0% -> 96% exact match on the demo task, under 8 minutes on 2 cores


def run(args: argparse.Namespace) -> int:
    """Train; under torchrun/accelerate every rank trains, the main process evaluates and writes."""
    caller_group = dist.is_available() and dist.is_initialized()
    try:
        return _train(args)
    finally:
        if not caller_group:  # the Trainer's group, which it leaves up: see the docstring
            destroy_process_groups()


def _train(args: argparse.Namespace) -> int:
    # Not accelerate's PartialState here: created before the Trainer's, it would pin the
    # (CPU) run to a single process. torchrun and accelerate launch both set RANK.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if args.max_steps is None:
        args.max_steps = DEMO_STEPS if args.data == DEMO and args.epochs is None else -1
    check_output(args)
    method_config = validate_args(args)  # before any slow work: bad input fails in seconds
    records = read_data(args)  # a malformed data file too
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.quantize)
    method_config = resolve_modules_to_save(args, model, method_config)  # a wrong name fails now
    train_set, eval_set, eval_records, data_summary = prepare_data(args, tokenizer, records)
    steps = planned_steps(args, len(train_set))
    resumed = checkpoint_step(args)
    if resumed is not None and resumed[1] >= steps:
        if main_process:
            print(f"--resume: {resumed[0]} is at step {resumed[1]} of {steps}: the run is finished, "
                  f"nothing to train (raise --max-steps or --epochs to train further)")
            saved = Path(args.output) / ("model" if args.method == "full" else "adapter")
            if args.push_to_hub is not None and saved.is_dir():  # e.g. retrying a failed push
                return push_result(saved, args)
        return 0
    evaluation = dict(extractor=args.extractor or default_extractor(args.data),
                      max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.data),
                      max_length=args.max_length, batch_size=max(args.batch_size, 16),
                      generate=not args.no_generate)
    before = None
    if main_process:
        print(f"data: {data_summary['train_records']} training records -> "
              f"{data_summary['train_sequences']} sequences; {data_summary['eval_records']} held-out records")
        before = evaluate(model, tokenizer, eval_records, **evaluation)
        print("before: " + _describe(before))

    model = wrap_for_method(args, model, method_config)
    if main_process and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    if args.overwrite and not args.resume and main_process:  # only now: bad input loses nothing
        stale = remove_previous_outputs(Path(args.output))
        if stale:
            print(f"--overwrite: removed {', '.join(p.name for p in stale)} of an earlier run")
    trainer = build_trainer(args, model, tokenizer, train_set, eval_set, steps)
    start = time.perf_counter()
    resume = None if args.resume is None else (True if args.resume == "latest" else args.resume)
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start

    output = Path(args.output)
    trainer.save_model(str(output / ("model" if args.method == "full" else "adapter")))
    if not main_process:
        return 0
    after = evaluate(model, tokenizer, eval_records, **evaluation)
    print("after:  " + _describe(after))
    history = trainer.state.log_history
    metrics = {
        "method": args.method, "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "data": args.data, **data_summary,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": trainer.state.global_step, "world_size": trainer.args.world_size,
        "train_seconds": train_seconds,
        "train_loss": result.training_loss, "tokens_seen": trainer.state.num_input_tokens_seen,
        "before": _summary(before), "after": _summary(after), "args": vars(args),
        "log_history": history,
    }
    write_json(output / "metrics.json", metrics)
    write_json(output / "predictions.json",
               {"before": before.get("records", []), "after": after.get("records", [])})
    plot_loss_curves(history, output / "loss_curves.png", title=f"{args.method} on {Path(str(args.data)).name}")
    pictures = "loss_curves.png"
    if isinstance(model, SpielModel):
        plot_delta_distribution(model, output / "delta_distribution.png")
        pictures += ", delta_distribution.png"
    print(f"wrote {output}/: {'model' if args.method == 'full' else 'adapter'}/, metrics.json, "
          f"predictions.json, {pictures}")
    if args.push_to_hub is not None:
        return push_result(output / ("model" if args.method == "full" else "adapter"), args)
    return 0


PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl")  # never uploaded: a pickle can run code when loaded


def push_result(saved: Path, args) -> int:
    """Upload the saved adapter (spielft's with a model card) or model; the exit status.

    Training is done and saved by now: a failed upload says how to retry it, it loses nothing.
    The Trainer's pickled ``training_args.bin`` stays local.
    """
    def write(folder: Path) -> None:
        shutil.copytree(saved, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*PICKLES))
        if args.method.startswith("spiel"):
            (folder / "README.md").write_text(model_card(args.push_to_hub, adapter_base_model(saved)))

    try:
        info = push_saved(write, args.push_to_hub,
                          commit_message=f"spielft train --method {args.method}")
    except Exception as err:  # network, auth, permissions: the run itself is saved
        excludes = " ".join(f"--exclude '{p}'" for p in PICKLES)
        print(f"pushing {saved} to the Hub repo {args.push_to_hub} failed ({type(err).__name__}: {err}); "
              f"the run is saved: retry with `hf upload {args.push_to_hub} {saved} {excludes}`",
              file=sys.stderr)
        return 1
    print(f"pushed {saved.name}/ to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "records"}


def _describe(metrics: dict) -> str:
    text = f"held-out loss {metrics['loss']:.4f}"
    if "exact_match" in metrics:
        text += f", exact match {100 * metrics['exact_match']:.1f}% ({metrics['examples']} examples)"
    return text
