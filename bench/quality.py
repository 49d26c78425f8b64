"""Quality at equal trainable parameters: SpIEL-AG/-MA against peft LoRA, SHiRA and full fine-tuning.

Instruction-tunes the embedded SmolLM2-135M-Instruct with every method on the same data, in the
same order, for the same steps, batch and schedule (same seed, same ``spielft train`` Trainer
settings), with SpIEL's budget matched to LoRA rank r's parameter count (SHiRA has that count by
construction; full fine-tuning trains everything). Per method and budget:

1. a learning-rate sweep (``--lr-grid``; defaults scaled from the SpIEL paper's grids), each run
   scored by its loss on a validation split cut from the training data (``train_val_split``);
2. the best learning rate is trained with every seed of ``--seeds`` (the sweep run is the first
   seed's run) and measured on the test set: loss on the answers (``--test-loss-examples``) and
   exact match with greedy decoding (``--test-em-examples``): mean and spread over seeds, training
   time and peak RSS of each run, and its validation-loss curve;
3. the base model without fine-tuning is a row of its own.

    python bench/quality.py --data gsm8k                  # the whole benchmark (~2 h)
    python bench/quality.py --data gsm8k --ranks 16       # one budget (~1 h)
    python bench/quality.py --data gsm8k --resume         # continue an interrupted run
    python bench/quality.py --data demo                   # the built-in date task
    python bench/quality.py --data demo --quick           # smoke run (a few minutes)
    python bench/quality.py --data gsm8k --report-only    # table, plot and markdown again

``--data gsm8k`` reads ``../shared/data/gsm8k/{train,test}.jsonl`` (question/answer; answers
scored by their last number; 200 new tokens); ``--data demo`` is spielft's date task (ISO dates,
16 new tokens). Each run is a child process (``spielft train``'s pieces: ``wrap_for_method``,
``build_trainer``; SHiRA through peft with the same Trainer), so its peak RSS is its own. Every
finished training and evaluation is appended to ``bench/results/quality_<data>.json`` at once, so
an interrupted benchmark keeps them and ``--resume`` skips them. At the end: a markdown table
(printed and in ``bench/results/quality_<data>.md`` with the command) and the validation-loss
curves of the final runs in ``bench/results/quality_<data>_curves.png``. Weights and logs of the
runs go to ``runs/quality_<data>/`` (weights deleted once evaluated unless ``--keep-weights``).

The default plan is the whole benchmark, and it fits in about two hours on this project's 2-core
CPU (measured: 1h57m, ``bench/results/quality_gsm8k.md``): 5 methods, two budgets (LoRA rank
16's count, 4,884,480 trainable parameters or 4.6% of the targeted weights, and rank 64's,
19,537,920 or 18.4%; full fine-tuning has one), a 2-point learning-rate sweep in every cell (18
trainings: best rates move with the budget), a second seed of each best (9 more), and 19 test
evaluations (base + 9 cells x 2 seeds). A training is 24 optimizer steps at batch 2 (48 examples
of a 1000-example pool), SpIEL reselecting every 8 steps (updates at 8 and 16, dropping 13% and
7% of each matrix's indices; ``--full-first-reselection`` makes the first drop all of them, the
reference's schedule), with 3 validation losses on 16 examples. A test evaluation is the loss on
the answers of 200 test examples and exact match of greedy decoding (200 new tokens) on 200, on
the merged model in ``--eval-dtype`` (bfloat16: 2-2.5x faster than float32 on CPUs with
AVX512-BF16 for +0.001 of loss, ``bench/results/quality_gsm8k_base_bf16_eval.md``; the older
tables used float32). What the two hours cost: batch 2 instead of 4, 2-point grids instead of 3,
bf16 evaluation. Earlier plans (batch 4, ``--batch-size 4``) took 3h39m. SpIEL runs use the
library's defaults: raw scores for AG, input-normalised ones for MA. After each run the script
prints an ETA from the runs it has measured. 24 steps are far from convergence: read the table
as early-training quality at equal parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"
METHODS = ("spiel-ag", "spiel-ma", "lora", "shira", "full")
LABELS = {"base": "base (no fine-tuning)", "spiel-ag": "SpIEL-AG", "spiel-ma": "SpIEL-MA",
          "lora": "LoRA", "shira": "SHiRA", "full": "full fine-tuning"}
# The paper's grids, scaled to short runs (SpIEL-MA uses SM3: larger steps). Two points each: the
# best rates of the earlier batch-4 runs at r=16 and r=64 (bench/results/quality_gsm8k_lr_edge.md
# and the README's ablations, where SpIEL's were bracketed by worse rates on both sides).
DEFAULT_GRID = {
    "spiel-ag": [3e-3, 1e-3], "spiel-ma": [1.5e-2, 5e-3],
    "lora": [3e-3, 1e-3], "shira": [3e-3, 1e-3], "full": [1e-4, 3e-5],
}
DATA = {  # extractor, max new tokens, max length
    "gsm8k": {"extractor": "last_number", "max_new_tokens": 200, "max_length": 384},
    "demo": {"extractor": "iso_date", "max_new_tokens": 16, "max_length": 256},
}
DEFAULTS = {"ranks": [16, 64], "seeds": [0, 1], "train_examples": 1000, "val_examples": 16,
            "max_steps": 24, "batch_size": 2, "eval_points": 3, "test_loss_examples": 200,
            "test_em_examples": 200, "reselection_steps": 8}
QUICK = {"ranks": [16], "seeds": [0], "train_examples": 64, "val_examples": 8, "max_steps": 6,
         "batch_size": 4, "eval_points": 2, "test_loss_examples": 16, "test_em_examples": 8,
         "reselection_steps": 2}
SPLIT_SEED = 0  # the validation split is the same for every run and seed
# Settings that change results: --resume refuses a results file made with other values.
RESULT_SETTINGS = ("data", "train_examples", "val_examples", "max_steps", "batch_size",
                   "max_length", "eval_points", "test_loss_examples", "test_em_examples",
                   "max_new_tokens", "extractor", "reselection_steps", "full_first_reselection",
                   "first_reselection_step", "eval_dtype", "spiel_args",
                   "ma_normalized_by_default")


# -- data (the same in every process) ------------------------------------------------------------


def load_data(s: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(training pool, validation split, test records) as normalised records."""
    from spielft.data import load_records, train_val_split
    from spielft.demo_data import demo_dataset

    if s["data"] == "demo":
        records, test = load_records(demo_dataset("train")), load_records(demo_dataset("test"))
    else:
        fields = ("question", "answer")
        folder = Path(s["gsm8k_dir"])
        records = load_records(folder / "train.jsonl", fields=fields)
        test = load_records(folder / "test.jsonl", fields=fields)
    train, val = train_val_split(records, s["val_examples"], seed=SPLIT_SEED)
    return train[: s["train_examples"]], val, test


def _by_length(records: list[dict]) -> list[dict]:
    """Similar lengths batched together: less padding (losses are order-free)."""
    return sorted(records, key=lambda r: len(json.dumps(r["messages"])))


# -- child processes -------------------------------------------------------------------------------


def _recipe_args(s: dict, method: str, lr: float, seed: int, output: Path) -> argparse.Namespace:
    """``spielft train``'s own options (so its defaults apply), parsed from flags."""
    from spielft.cli import train as recipe

    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    argv = ["--method", "lora" if method in ("shira", "base") else method, "--lr", repr(lr),
            "--seed", str(seed), "--max-steps", str(s["max_steps"]),
            "--batch-size", str(s["batch_size"]), "--max-length", str(s["max_length"]),
            "--eval-steps", str(max(1, s["max_steps"] // s["eval_points"])),
            "--output", str(output), "--overwrite", "--no-generate"]
    if method.startswith("spiel"):
        argv += ["--match-lora-rank", str(s["rank"])]
        if s.get("reselection_steps"):
            argv += ["--reselection-steps", str(s["reselection_steps"])]
        if s.get("full_first_reselection"):
            argv += ["--full-first-reselection"]
        if s.get("first_reselection_step"):
            argv += ["--first-reselection-step", str(s["first_reselection_step"])]
        argv += shlex.split(s.get("spiel_args") or "")
    elif method in ("lora", "shira"):
        argv += ["--lora-rank", str(s["rank"])]
    return parser.parse_args(argv)


def _setup_child(s: dict) -> None:
    import torch

    if s.get("threads"):
        torch.set_num_threads(s["threads"])


def _trainer(s: dict, args, model, tokenizer, train_set, val_set):
    from transformers.trainer_utils import SaveStrategy

    from spielft.cli import train as recipe

    trainer = recipe.build_trainer(args, model, tokenizer, train_set, val_set,
                                   recipe.planned_steps(args, len(train_set)))
    trainer.args.save_strategy = SaveStrategy.NO  # no checkpoints: the weights are saved once
    return trainer


def worker_train(s: dict) -> dict:
    _setup_child(s)
    import torch

    from spielft.cli import train as recipe
    from spielft.cli.common import load_model
    from spielft.data import tokenize_records

    run_dir = Path(s["run_dir"])
    args = _recipe_args(s, s["method"], s["lr"], s["seed"], run_dir)
    torch.manual_seed(s["seed"])
    model, tokenizer = load_model(None)
    train_records, val_records, _ = load_data(s)
    train_set, stats = tokenize_records(train_records, tokenizer, max_length=s["max_length"])
    val_set, _ = tokenize_records(_by_length(val_records), tokenizer, max_length=s["max_length"])
    if s["method"] == "shira":  # not a CLI method: peft, with the recipe's targets and Trainer
        from peft import ShiraConfig, get_peft_model

        # random_seed makes the random mask reproducible: peft rebuilds it when loading.
        model = get_peft_model(model, ShiraConfig(r=s["rank"], target_modules=recipe.BLOCK_LINEARS,
                                                  random_seed=s["seed"], task_type="CAUSAL_LM"))
    else:
        model = recipe.wrap_for_method(args, model)
    trainer = _trainer(s, args, model, tokenizer, train_set, val_set)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    evals = [r for r in history if "eval_loss" in r]
    eval_seconds = sum(r.get("eval_runtime", 0.0) for r in evals)  # those inside the training
    if not evals or evals[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the validation loss at the end is what the sweep compares
        evals = [r for r in history if "eval_loss" in r]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.save_model(str(run_dir / "weights"))
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "steps": trainer.state.global_step, "val_loss": evals[-1]["eval_loss"],
            "train_loss": result.training_loss, "train_seconds": wall - eval_seconds,
            "train_wall_seconds": wall, "tokens_seen": trainer.state.num_input_tokens_seen,
            "peak_rss_mib": peak_rss, "train_sequences": stats.num_sequences,
            "truncated": stats.num_truncated, "log_history": history}


def worker_test(s: dict) -> dict:
    _setup_child(s)
    import torch

    from spielft.cli.common import apply_adapter, load_model
    from spielft.cli.evaluate import evaluate
    from spielft.data import tokenize_records
    from spielft.evaluation import evaluate_exact_match

    weights = s.get("weights")
    if s["method"] == "full":
        model, tokenizer = load_model(weights)
    else:
        model, tokenizer = load_model(None)
        model = apply_adapter(model, weights)  # spielft or peft (LoRA, SHiRA); None: the base
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    _, val_records, test_records = load_data(s)
    out: dict[str, Any] = {}
    if s.get("with_val"):  # the base model's validation loss: step 0 of every curve
        args = _recipe_args(s, "full", 1e-5, s["seed"], Path(s["run_dir"]))
        val_set, _ = tokenize_records(_by_length(val_records), tokenizer, max_length=s["max_length"])
        trainer = _trainer(s, args, model, tokenizer, val_set, val_set)
        out["val_loss"] = trainer.evaluate()["eval_loss"]  # float32, like the trainings' ones
    # Merged in float32, then cast (--eval-dtype bfloat16 is faster on CPUs with AVX512-BF16 or
    # AMX); every method is scored as the same plain model.
    model.to(getattr(torch, s["eval_dtype"]))
    start = time.perf_counter()
    loss = evaluate(model, tokenizer, _by_length(test_records[: s["test_loss_examples"]]),
                    extractor=s["extractor"], max_new_tokens=s["max_new_tokens"],
                    max_length=s["max_length"], batch_size=s["loss_batch_size"], generate=False)
    mid = time.perf_counter()
    em = evaluate_exact_match(model, tokenizer, test_records[: s["test_em_examples"]],
                              extractor=s["extractor"], max_new_tokens=s["max_new_tokens"],
                              batch_size=s["gen_batch_size"])
    end = time.perf_counter()
    Path(s["run_dir"], "predictions.json").write_text(json.dumps(em.records, indent=1) + "\n")
    out.update(test_loss=loss["loss"], loss_examples=loss["examples"], exact_match=em.accuracy,
               em_examples=len(em.records), loss_seconds=mid - start, em_seconds=end - mid,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def worker_main(kind: str, spec_path: str) -> int:
    s = json.loads(Path(spec_path).read_text())
    result = worker_train(s) if kind == "train" else worker_test(s)
    _write_json(Path(s["run_dir"]) / f"{kind}_result.json", result)
    return 0


# -- the benchmark ---------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _stored_settings(settings: dict) -> dict:
    """A results file's settings as today's flags would spell them: files written before a
    setting existed ran with that setting's default of the time."""
    out = dict(settings)
    if "full_first_reselection" not in out:  # then the default, unless the ablation flag was on
        out["full_first_reselection"] = None if out.pop("no_full_first_reselection", None) else True
    out.setdefault("eval_dtype", "float32")
    out.setdefault("spiel_args", None)
    out.setdefault("ma_normalized_by_default", False)  # before MA's default became normalised
    return out


def _spiel_settings(settings: dict) -> str:
    """How the SpIEL runs selected, for the report."""
    s = _stored_settings(settings)
    first = (f"first update at step {s['first_reselection_step']}"
             if s.get("first_reselection_step") else "first update after one cycle")
    parts = [f"SpIEL: reselection every {s.get('reselection_steps') or 20} steps, {first}"
             + (" dropping every index" if s["full_first_reselection"] else ""),
             "MA's regrowth scores input-normalised unless the flags say otherwise"
             if s["ma_normalized_by_default"] else "raw regrowth scores unless the flags say otherwise"]
    if s["spiel_args"]:
        parts.append(f"extra flags `{s['spiel_args']}`")
    return "; ".join(parts) + ". "


def _budget(method: str, rank: int) -> str:
    return "all" if method == "full" else f"r{rank}"


def _key(kind: str, method: str, rank: int, lr: float, seed: int) -> str:
    return f"{kind}/{method}/{_budget(method, rank)}/lr={lr:g}/seed={seed}"


class Bench:
    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.path = Path(cfg.output)
        self.runs_dir = Path(cfg.runs_dir)
        self.settings = {k: getattr(cfg, k) for k in RESULT_SETTINGS}
        self.failures: list[str] = []
        self.started = time.perf_counter()
        command = shlex.join(["python", "bench/quality.py", *sys.argv[1:]])
        if self.path.exists() and not cfg.overwrite:
            self.state = json.loads(self.path.read_text())
            if not (cfg.resume or cfg.report_only):
                raise SystemExit(f"{self.path} exists ({len(self.state['runs'])} finished runs): pass "
                                 "--resume to continue it, --overwrite to start afresh, or --output")
            stored = _stored_settings(self.state["settings"])
            diff = {k: (stored.get(k), v) for k, v in self.settings.items() if stored.get(k) != v}
            if diff and not cfg.report_only:
                hint = ("; SpIEL-MA's regrowth default changed since (raw scores then), so its "
                        "runs would not match: start another --output"
                        if "ma_normalized_by_default" in diff else "")
                raise SystemExit(f"--resume: {self.path} was made with other settings "
                                 f"(stored, now): {diff}; use the same flags, or another "
                                 f"--output{hint}")
            if cfg.report_only:  # report what was run, whatever the flags now
                for name, value in self.state.get("plan", {}).items():
                    setattr(cfg, name, value)
            else:
                self.state["commands"].append(command)
        else:
            if cfg.report_only:
                raise SystemExit(f"--report-only: no {self.path}")
            self.state = {"commands": [command], "settings": self.settings,
                          "model": "SmolLM2-135M-Instruct (embedded)",
                          "machine": {"cpus": os.cpu_count(), "threads": cfg.threads,
                                      "platform": platform.platform()},
                          "runs": []}
        if not cfg.report_only:
            self.state["plan"] = {k: getattr(cfg, k) for k in ("methods", "ranks", "seeds", "lr_grid")}
        self.index = {r["key"]: r for r in self.state["runs"]}

    # bookkeeping

    def save(self, record: dict) -> None:
        self.state["runs"] = [r for r in self.state["runs"] if r["key"] != record["key"]] + [record]
        self.index[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, self.state)

    def plan(self) -> tuple[int, int]:
        """(trainings, test evaluations) that the whole benchmark needs."""
        trainings, tests = 0, 0 if self.cfg.no_base else 1
        for method, rank in self.cells():
            trainings += len(self.grid(method, rank, planning=True)) + len(self.cfg.seeds) - 1
            tests += len(self.cfg.seeds)
        return trainings, 0 if self.cfg.sweep_only else tests

    def cells(self) -> list[tuple[str, int]]:
        """(method, rank) pairs; full fine-tuning has no rank and runs once."""
        return [(m, r) for i, r in enumerate(self.cfg.ranks) for m in self.cfg.methods
                if m != "full" or i == 0]

    def grid(self, method: str, rank: int, planning: bool = False) -> list[float]:
        """Learning rates to try: the sweep (at every budget unless ``--reuse-best-lr``)."""
        first = self.cfg.ranks[0]
        if not self.cfg.reuse_best_lr or method == "full" or rank == first:
            return self.cfg.lr_grid[method]
        best = None if planning else self.best_lr(method, first)
        return [best] if best is not None else self.cfg.lr_grid[method][:1]

    def spec(self, **extra: Any) -> dict:
        c = self.cfg
        return {**self.settings, "gsm8k_dir": str(c.gsm8k_dir), "threads": c.threads,
                "loss_batch_size": c.loss_batch_size, "gen_batch_size": c.gen_batch_size, **extra}

    def child(self, kind: str, key: str, run_dir: Path, spec: dict) -> dict | None:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = run_dir / f"{kind}_spec.json", run_dir / f"{kind}_result.json"
        _write_json(spec_path, spec)
        result_path.unlink(missing_ok=True)
        log = run_dir / f"{kind}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.cfg.threads:
            env["OMP_NUM_THREADS"] = str(self.cfg.threads)
        print(f"  {key} ... (log: {log})", flush=True)
        start = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                                 str(spec_path)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                check=False).returncode
        if rc != 0 or not result_path.exists():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            print(f"  FAILED {key} (exit {rc}); last lines of {log}:\n{tail}", flush=True)
            self.failures.append(key)
            return None
        result = json.loads(result_path.read_text())
        result["wall_seconds"] = time.perf_counter() - start
        return result

    def eta(self) -> str:
        runs = self.state["runs"]
        done = {k: [r["wall_seconds"] for r in runs if r["kind"] == k] for k in ("train", "test")}
        trainings, tests = self.plan()
        left_train = max(0, trainings - len(done["train"]))
        left_test = max(0, tests - len(done["test"]))
        text = f"{len(done['train'])}/{trainings} trainings, {len(done['test'])}/{tests} test evaluations"
        if (left_train and not done["train"]) or (left_test and not done["test"]):
            return text
        seconds = (left_train * (statistics.fmean(done["train"]) if done["train"] else 0)
                   + left_test * (statistics.fmean(done["test"]) if done["test"] else 0))
        return f"{text}; ~{_duration(seconds)} left"

    # the steps

    def run_dir(self, method: str, rank: int, lr: float, seed: int) -> Path:
        return self.runs_dir / f"{method}_{_budget(method, rank)}_lr{lr:g}_s{seed}"

    def train(self, method: str, rank: int, lr: float, seed: int, *, need_weights: bool) -> dict | None:
        key = _key("train", method, rank, lr, seed)
        run_dir = self.run_dir(method, rank, lr, seed)
        done = self.index.get(key)
        if done and (not need_weights or (run_dir / "weights").is_dir()):
            return done
        result = self.child("train", key, run_dir, self.spec(
            method=method, rank=rank, lr=lr, seed=seed, run_dir=str(run_dir)))
        if result is None:
            return None
        record = {"key": key, "kind": "train", "method": method, "budget": _budget(method, rank),
                  "rank": None if method == "full" else rank, "lr": lr, "seed": seed,
                  "run_dir": str(run_dir), **result}
        self.save(record)
        print(f"  -> val loss {record['val_loss']:.4f}, {record['trainable_params']:,} params, "
              f"{_duration(record['train_seconds'])} training, {record['peak_rss_mib']:.0f} MiB; "
              f"{self.eta()}", flush=True)
        return record

    def test(self, method: str, rank: int, lr: float, seed: int) -> dict | None:
        key = _key("test", method, rank, lr, seed) if method != "base" else "test/base"
        if key in self.index:
            return self.index[key]
        if method == "base":
            run_dir, weights = self.runs_dir / "base", None
        else:
            trained = self.train(method, rank, lr, seed, need_weights=True)
            if trained is None:
                return None
            run_dir = self.run_dir(method, rank, lr, seed)
            weights = str(run_dir / "weights")
        result = self.child("test", key, run_dir, self.spec(
            method=method, rank=rank, lr=lr, seed=seed, run_dir=str(run_dir), weights=weights,
            with_val=method == "base"))
        if result is None:
            return None
        record = {"key": key, "kind": "test", "method": method,
                  "budget": "-" if method == "base" else _budget(method, rank),
                  "rank": rank if method not in ("base", "full") else None,
                  "lr": None if method == "base" else lr, "seed": seed, **result}
        self.save(record)
        if weights and not self.cfg.keep_weights:
            shutil.rmtree(weights, ignore_errors=True)
        print(f"  -> test loss {record['test_loss']:.4f}, exact match "
              f"{100 * record['exact_match']:.1f}% ({record['em_examples']}); {self.eta()}", flush=True)
        return record

    def best_lr(self, method: str, rank: int) -> float | None:
        scores = {}
        for lr in self.grid(method, rank):
            rec = self.index.get(_key("train", method, rank, lr, self.cfg.seeds[0]))
            if rec is not None:
                loss = rec["val_loss"]
                scores[lr] = loss if loss is not None and math.isfinite(loss) else math.inf
        if not scores:
            return None
        return min(scores, key=lambda lr: (scores[lr], -lr))

    def run(self) -> None:
        cfg = self.cfg
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, self.state)  # the command and plan, before the first run
        trainings, tests = self.plan()
        print(f"plan: {trainings} trainings ({len(self.cells())} method/budget cells, lr sweep with "
              f"seed {cfg.seeds[0]}, then seeds {cfg.seeds[1:]}), {tests} test evaluations; "
              f"results: {self.path}", flush=True)
        if not cfg.sweep_only and not cfg.no_base:
            print(f"[{LABELS['base']}]", flush=True)
            self.test("base", 0, 0.0, cfg.seeds[0])
        for method, rank in self.cells():
            print(f"[{LABELS[method]}, {_budget(method, rank)}]", flush=True)
            grid = self.grid(method, rank)
            for lr in grid:
                self.train(method, rank, lr, cfg.seeds[0], need_weights=False)
            best = self.best_lr(method, rank)
            if best is None:
                continue
            edge = " (at the edge of the grid: consider widening --lr-grid)" if len(grid) > 1 and \
                best in (min(grid), max(grid)) else ""
            print(f"  best lr {best:g}{edge}", flush=True)
            if not cfg.keep_weights:
                for lr in grid:
                    if lr != best:
                        shutil.rmtree(self.run_dir(method, rank, lr, cfg.seeds[0]) / "weights",
                                      ignore_errors=True)
            for seed in cfg.seeds:
                if cfg.sweep_only:
                    self.train(method, rank, best, seed, need_weights=False)
                else:
                    self.test(method, rank, best, seed)
        total = sum(r["wall_seconds"] for r in self.state["runs"])
        print(f"done: {_duration(time.perf_counter() - self.started)} in this invocation, "
              f"{_duration(total)} of runs in all", flush=True)
        if self.failures:
            print(f"failed (rerun with --resume): {self.failures}", flush=True)

    # the report

    def rows(self) -> list[dict]:
        rows = []
        base = self.index.get("test/base")
        if base:
            rows.append({"method": "base", "budget": "-", "params": 0, "lr": None, "tests": [base],
                         "trains": []})
        for method, rank in self.cells():
            best = self.best_lr(method, rank)
            if best is None:
                continue
            tests = [self.index[k] for s in self.cfg.seeds
                     if (k := _key("test", method, rank, best, s)) in self.index]
            trains = [self.index[k] for s in self.cfg.seeds
                      if (k := _key("train", method, rank, best, s)) in self.index]
            rows.append({"method": method, "budget": _budget(method, rank),
                         "params": trains[0]["trainable_params"] if trains else None, "lr": best,
                         "tests": tests, "trains": trains})
        return rows

    def table(self) -> str:
        lines = ["| method | budget | trainable params | best lr | test loss | exact match | "
                 "seeds | train time | peak RSS |", "|---|---|---:|---:|---|---|---:|---:|---:|"]
        for row in self.rows():
            tests, trains = row["tests"], row["trains"]
            loss = _mean_sd([t["test_loss"] for t in tests], "{:.4f}")
            em = _mean_sd([100 * t["exact_match"] for t in tests], "{:.1f}", "%")
            time_ = _duration(statistics.fmean(t["train_seconds"] for t in trains)) if trains else "-"
            rss = f"{max(t['peak_rss_mib'] for t in trains):,.0f} MiB" if trains else "-"
            params = "-" if row["params"] is None else f"{row['params']:,}"
            lr = "-" if row["lr"] is None else f"{row['lr']:g}"
            lines.append(f"| {LABELS[row['method']]} | {row['budget']} | {params} | {lr} | {loss} | "
                         f"{em} | {len(tests)} | {time_} | {rss} |")
        return "\n".join(lines)

    def sweep_table(self) -> str:
        lines = ["| method | budget | lr | validation loss |", "|---|---|---:|---:|"]
        for method, rank in self.cells():
            best = self.best_lr(method, rank)
            for lr in self.grid(method, rank):
                rec = self.index.get(_key("train", method, rank, lr, self.cfg.seeds[0]))
                val = "-" if rec is None else f"{rec['val_loss']:.4f}" + (" (best)" if lr == best else "")
                lines.append(f"| {LABELS[method]} | {_budget(method, rank)} | {lr:g} | {val} |")
        return "\n".join(lines)

    def plot(self, path: Path) -> bool:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        base = self.index.get("test/base", {}).get("val_loss")
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        colors = dict(zip(METHODS, ("tab:red", "tab:orange", "tab:blue", "tab:green", "tab:gray"),
                          strict=True))
        styles = ["-", "--", ":", "-."]
        drawn = False
        for row in self.rows():
            if row["method"] == "base" or not row["trains"]:
                continue
            curves = []
            for t in row["trains"]:
                points = {r["step"]: r["eval_loss"] for r in t["log_history"] if "eval_loss" in r}
                if base is not None:
                    points.setdefault(0, base)
                curves.append(points)
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.fmean(c[s] for c in curves) for s in steps]
            rank_i = self.cfg.ranks.index(row["trains"][0]["rank"]) if row["trains"][0]["rank"] else 0
            label = f"{LABELS[row['method']]} {row['budget']} (lr {row['lr']:g}, {len(curves)} seeds)"
            ax.plot(steps, mean, styles[rank_i % len(styles)], marker="o", markersize=3,
                    color=colors[row["method"]], label=label)
            if len(curves) > 1:
                ax.fill_between(steps, [min(c[s] for c in curves) for s in steps],
                                [max(c[s] for c in curves) for s in steps],
                                color=colors[row["method"]], alpha=0.15)
            drawn = True
        if not drawn:
            plt.close(fig)
            return False
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (per answer token)")
        ax.set_title(f"SmolLM2-135M-Instruct on {self.state['settings']['data']}: best lr per method "
                     "(band: min-max over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return True

    def report(self) -> None:
        table = self.table()
        print("\n" + table)
        stem = self.path.with_suffix("")
        png = stem.parent / f"{stem.name}_curves.png"
        has_plot = self.plot(png)
        s, m = self.state["settings"], self.state["machine"]
        total = sum(r["wall_seconds"] for r in self.state["runs"])
        text = [f"# Quality at equal trainable parameters: {s['data']}", "",
                "Command(s), from the repository root:", "", "```bash",
                *self.state["commands"], "```", "",
                f"Model: {self.state['model']}. Machine: {m['cpus']} CPUs, "
                f"threads per run: {m['threads'] or 'all'}, {m['platform']}. "
                f"Total run time: {_duration(total)}.", "",
                f"Settings: {s['max_steps']} steps at batch {s['batch_size']} (max length "
                f"{s['max_length']}) from a pool of {s['train_examples']} training examples, the "
                f"same order for every method (same seed); learning rate chosen by the loss on "
                f"{s['val_examples']} validation examples cut from the training data; test loss on "
                f"the answers of {s['test_loss_examples']} test examples, exact match "
                f"({s['extractor']}) of greedy decoding ({s['max_new_tokens']} new tokens) on "
                f"{s['test_em_examples']}, on the merged model in "
                f"{_stored_settings(s)['eval_dtype']}. {_spiel_settings(s)}Mean ± sd over seeds "
                f"{self.cfg.seeds}; train time excludes the validation evaluations; peak RSS of "
                "the training process.", "",
                table, "", "Learning-rate sweep (first seed):", "", self.sweep_table(), ""]
        if has_plot:
            text += [f"![validation-loss curves]({png.name})", ""]
        md = stem.with_suffix(".md")
        md.write_text("\n".join(text))
        print(f"\nwrote {self.path}, {md}" + (f", {png}" if has_plot else ""))


def _mean_sd(values: list[float], fmt: str, unit: str = "") -> str:
    if not values:
        return "-"
    mean = fmt.format(statistics.fmean(values)) + unit
    if len(values) < 2:
        return mean
    return f"{mean} ± {fmt.format(statistics.stdev(values))}{unit}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -- the command line ------------------------------------------------------------------------------


def parse_grid(items: list[str], quick: bool = False) -> dict[str, list[float]]:
    """The default grids, with the methods given as METHOD=LR,LR replaced (--quick: the middle)."""
    grid = {m: [v[len(v) // 2]] if quick else list(v) for m, v in DEFAULT_GRID.items()}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--lr-grid takes METHOD=LR[,LR...] with METHOD in {METHODS}, got {item!r}")
        try:
            grid[method] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise SystemExit(f"--lr-grid {item!r}: not a list of numbers") from None
        if not grid[method] or min(grid[method]) <= 0:
            raise SystemExit(f"--lr-grid {item!r}: give at least one positive learning rate")
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(line for line in __doc__.split("\n")
                                                  if line.startswith("    python")))
    p.add_argument("--data", choices=tuple(DATA), default="gsm8k")
    p.add_argument("--gsm8k-dir", default=str(GSM8K_DIR), help="folder with train.jsonl and test.jsonl")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ranks", nargs="+", type=int, default=None,
                   help="LoRA/SHiRA ranks; SpIEL gets each rank's parameter count (default: 16 64)")
    p.add_argument("--lr-grid", nargs="*", default=[], metavar="METHOD=LR,LR",
                   help="learning rates to sweep, per method (defaults: "
                        + "; ".join(f"{m} {','.join(f'{v:g}' for v in g)}" for m, g in DEFAULT_GRID.items())
                        + "; --quick: the middle one)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds of the final runs; the sweep uses the first (default: 0 1)")
    budget = p.add_argument_group("budget (defaults: the ~2 h benchmark; --quick: a smoke run)")
    budget.add_argument("--train-examples", type=int, default=None, help="training pool (1000)")
    budget.add_argument("--val-examples", type=int, default=None,
                        help="validation examples cut from the training data (16)")
    budget.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (24)")
    budget.add_argument("--batch-size", type=int, default=None, help="(2)")
    budget.add_argument("--max-length", type=int, default=None, help="(gsm8k 384, demo 256)")
    budget.add_argument("--eval-points", type=int, default=None,
                        help="validation losses per run, the last at the end (3)")
    budget.add_argument("--test-loss-examples", type=int, default=None, help="(200)")
    budget.add_argument("--test-em-examples", type=int, default=None, help="(200)")
    budget.add_argument("--max-new-tokens", type=int, default=None, help="(gsm8k 200, demo 16)")
    budget.add_argument("--reselection-steps", type=int, default=None,
                        help="SpIEL: steps between reselections (8: three cycles in 24 steps; the recipe's is 20)")
    budget.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                             + ", one lr per method; explicit flags still win")
    budget.add_argument("--full-first-reselection", action="store_const", const=True, default=None,
                        help="SpIEL: the first update drops the whole random start (the reference "
                             "code's schedule; an ablation)")
    budget.add_argument("--first-reselection-step", type=int, default=None,
                        help="SpIEL: step of the first reselection (default: --reselection-steps)")
    budget.add_argument("--spiel-args", default=None, metavar="FLAGS",
                        help="more `spielft train` flags for the SpIEL runs, as one string (for "
                             "ablations, e.g. \"--initial-reselection-rate 0.4\")")
    budget.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="dtype of the test evaluations (the merged model is cast to it); "
                             "bfloat16 is 2-2.5x faster on CPUs with AVX512-BF16/AMX")
    budget.add_argument("--sweep-only", action="store_true",
                        help="train the sweep and the seeds, scored on validation only: no test "
                             "evaluations (for ablations)")
    budget.add_argument("--no-base", action="store_true",
                        help="skip the base model's test evaluation (when another results file "
                             "has it: more seeds of an ablation)")
    budget.add_argument("--reuse-best-lr", action="store_true",
                        help="sweep at the first rank only; larger budgets reuse each method's "
                             "best lr (cheaper, but best rates move with the budget)")
    run = p.add_argument_group("run")
    run.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all)")
    run.add_argument("--loss-batch-size", type=int, default=8)
    run.add_argument("--gen-batch-size", type=int, default=100)
    run.add_argument("--output", default=None,
                     help="results JSON (default: bench/results/quality_<data>[_quick].json); the "
                          ".md and _curves.png go beside it")
    run.add_argument("--runs-dir", default=None, help="weights and logs (default: runs/quality_<data>[_quick])")
    run.add_argument("--resume", action="store_true", help="continue the results file, skipping finished runs")
    run.add_argument("--overwrite", action="store_true", help="start the results file afresh")
    run.add_argument("--keep-weights", action="store_true", help="keep every run's weights")
    run.add_argument("--report-only", action="store_true", help="only print and write the report")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    data = DATA[args.data]
    args.extractor = data["extractor"]
    if args.max_length is None:
        args.max_length = data["max_length"]
    if args.max_new_tokens is None:
        args.max_new_tokens = data["max_new_tokens"] if not args.quick else min(data["max_new_tokens"], 64)
    args.lr_grid = parse_grid(args.lr_grid, args.quick)
    from spielft import SpielConfig  # a library default that changes SpIEL-MA's results

    args.ma_normalized_by_default = SpielConfig(regrowth="ma").normalize_regrowth_by_input
    args.seeds = list(dict.fromkeys(args.seeds))
    suffix = "_quick" if args.quick else ""
    if args.output is None:
        args.output = str(RESULTS / f"quality_{args.data}{suffix}.json")
    if args.runs_dir is None:
        args.runs_dir = str(ROOT / "runs" / f"quality_{args.data}{suffix}")
    for name in ("train_examples", "val_examples", "max_steps", "batch_size", "eval_points",
                 "test_loss_examples", "test_em_examples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.data == "gsm8k" and not (Path(args.gsm8k_dir) / "train.jsonl").is_file():
        raise SystemExit(f"no {Path(args.gsm8k_dir) / 'train.jsonl'}: pass --gsm8k-dir")
    return args


def main() -> int:
    args = build_parser().parse_args()
    if args.worker:
        return worker_main(*args.worker)
    cfg = resolve(args)
    bench = Bench(cfg)
    try:
        if not cfg.report_only:
            bench.run()
    finally:
        if bench.state["runs"]:
            bench.report()
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
