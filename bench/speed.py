"""Step time and memory of SpIEL against the floor, peft LoRA/SHiRA and full fine-tuning.

All methods train the same model on the same random batches, interleaved step by step so that
the machine's drift hits all of them alike, each in its own worker process (in one shared
process LoRA's step time moved by up to 40% against the floor depending on which other methods
shared it; ``--one-process`` for the old way). Each step is forward + backward + optimizer step
(+ the selector for SpIEL). SpIEL-AG is timed over whole reselection cycles, so its
accumulation windows (dense weight gradients) and updates are included in its average.

    python bench/speed.py                         # SmolLM2-135M-Instruct, batch 4 x 256
    python bench/speed.py --model synthetic --hidden 1024 --densities 0.001 0.01 0.05
    python bench/speed.py --memory spiel-ma       # peak RSS of one method, in its own process

``spiel-ag-bf16`` and ``spiel-ma-bf16`` are SpIEL with ``weight_grad_dtype="bfloat16"``: the
GEMM behind the weight gradient in bfloat16, everything else as in ``spiel-ag``/``spiel-ma``.
``spiel-ag-rows``, ``spiel-ma-columns`` etc. train whole rows or columns of each matrix
(``SpielConfig.structure``), at the same budget rounded to whole lines (``spiel-ma-columns-bf16``
with the bfloat16 weight gradient too). An ``-applied`` suffix (e.g. ``spiel-ma-applied``, not in the default set) trains inside
``SpielModel.applied_deltas()`` (``SpielTrainer(keep_deltas_applied=True)``), where the deltas
stay written into W between steps instead of being written and restored in every forward and
backward.

Each method's kernel (system) seconds and minor page faults per step are recorded too: with
glibc's malloc a step's large tensors come from fresh pages that the kernel faults in, which
on a 2-core EPYC was a third of the floor's step and compresses every ratio to it. To time
with an allocator that keeps its pages, as a GPU's caching allocator does (Debian's
libjemalloc2):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python bench/speed.py ...

Results go to bench/results/*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spielft import SpielConfig, get_spiel_model

RESULTS = Path(__file__).parent / "results"
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["floor", "lora", "shira", "full", "spiel-ag", "spiel-ma", "spiel-ag-bf16", "spiel-ma-bf16"]
STRUCTURED = [f"spiel-{r}-{s}{b}" for b in ("", "-bf16") for s in ("rows", "columns") for r in ("ag", "ma")]
CHOICES = METHODS + STRUCTURED + [
    f"{m}-applied" for m in METHODS + STRUCTURED if m.startswith("spiel")
]


# -- models and methods ----------------------------------------------------------------------------


def load_base(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    if args.model == "synthetic":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256), vocab_size=8192,
        )
        return LlamaForCausalLM(cfg)
    from spielft.default_model import load_model_and_tokenizer

    quantization = None
    if getattr(args, "quantize", None):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quantize,
                                          bnb_4bit_compute_dtype=torch.float32)
    model, _ = load_model_and_tokenizer(None if args.model == "default" else args.model,
                                        quantization_config=quantization)
    return model


def lora_param_count(model: nn.Module, rank: int) -> int:
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_NAMES
    )


class Method:
    """One training configuration: a model, its optimizer and (for SpIEL) its selector."""

    def __init__(self, name: str, args: argparse.Namespace, budget: int | None, total_steps: int):
        self.name = name
        self.selector = None
        self.context = contextlib.ExitStack()  # what the method trains inside
        model = load_base(args)
        budget = budget or lora_param_count(model, args.rank)
        if name == "floor":
            for p in model.parameters():
                p.requires_grad_(False)
            self.optimizer = None
        elif name == "full":
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        elif name in ("lora", "shira"):
            import peft

            if name == "lora":
                cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                      target_modules=LINEAR_NAMES)
            else:
                cfg = peft.ShiraConfig(r=args.rank, target_modules=LINEAR_NAMES)
            model = peft.get_peft_model(model, cfg)
            self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        else:
            regrowth = name.split("-")[1]
            # "-bf16": the weight-gradient GEMM in bfloat16 (SpielConfig.weight_grad_dtype).
            grad_dtype = "bfloat16" if "-bf16" in name else "float32"
            # "-rows"/"-columns": whole lines (SpielConfig.structure).
            structure = next((s for s in ("rows", "columns") if f"-{s}" in name), "unstructured")
            model = get_spiel_model(model, SpielConfig(
                num_tunable_weights=budget, regrowth=regrowth, target_modules=LINEAR_NAMES,
                weight_grad_dtype=grad_dtype, structure=structure))
            self.optimizer = model.create_optimizer(lr=1e-4 if regrowth == "ag" else 1e-3)
            self.selector = model.create_selector(self.optimizer, total_steps=total_steps)
            if name.endswith("-applied"):
                self.context.enter_context(model.applied_deltas())
        self.model = model
        self.times: list[float] = []
        # Per step: CPU seconds spent in the kernel, and minor page faults. With glibc's malloc
        # a step's large tensors come from fresh pages, faulted in (and zeroed) by the kernel:
        # on a 2-core EPYC about a third of the floor's step; an allocator that keeps its pages
        # (jemalloc with no decay, as a GPU's caching allocator does) leaves almost none.
        self.kernel_seconds: list[float] = []
        self.page_faults: list[int] = []

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, batch: torch.Tensor) -> float:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        if self.name == "floor":
            embeds = self.model.get_input_embeddings()(batch).detach().requires_grad_(True)
            self.model(inputs_embeds=embeds, labels=batch).loss.backward()
        else:
            self.model(input_ids=batch, labels=batch).loss.backward()
            self.optimizer.step()
            if self.selector is not None:
                self.selector.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.times.append(elapsed)
        self.kernel_seconds.append(after.ru_stime - before.ru_stime)
        self.page_faults.append(after.ru_minflt - before.ru_minflt)
        return elapsed

    def summary(self) -> dict[str, Any]:
        """Leave the method's training context; its step times and training-state figures."""
        self.context.close()
        return {"times": self.times, "kernel_seconds": self.kernel_seconds,
                "page_faults": self.page_faults, "trainable_params": self.trainable(),
                "state_bytes_per_param": self.state_bytes_per_param()}

    def state_bytes_per_param(self) -> float:
        """Bytes of training state (values, indices, grads, optimizer state) per trainable param."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return 0.0
        n = sum(p.numel() for p in params)
        total = sum(p.numel() * p.element_size() * 2 for p in params)  # value + gradient
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                total += sum(t.numel() * t.element_size() for t in state.values()
                             if torch.is_tensor(t) and t.ndim > 0)
        total += sum(b.numel() * b.element_size() for name, b in self.model.named_buffers()
                     if name.endswith("spiel_deltas.default.indices") or "shira_indices" in name)
        if self.name == "shira":  # SHiRA keeps its indices in a python dict, not a buffer
            for module in self.model.modules():
                for idx in getattr(module, "shira_indices", {}).values():
                    total += idx.numel() * idx.element_size()
        return total / n


class IsolatedMethod:
    """A `Method` in a process of its own, stepped from this one in the same interleaved order.

    In one shared process peft LoRA's step moved between 1.33x and 1.87x the floor from run to
    run (most with many models in the process; the allocator's shared state is the likeliest
    cause) while SpIEL's stayed put. Here each method has its own process and heap; the
    machine's drift still hits all alike, as only one process runs at a time.
    """

    def __init__(self, name: str, args: argparse.Namespace, budget: int | None, total_steps: int):
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_method, daemon=True,
                                        args=(child, name, args, budget, total_steps))
        self._process.start()
        child.close()
        self._reply()  # built and ready
        self.times: list[float] = []

    def _reply(self) -> Any:
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name} failed in its worker process:\n{value}")
        return value

    def step(self, batch: torch.Tensor) -> float:
        self._conn.send(("step", batch))
        elapsed = self._reply()
        self.times.append(elapsed)
        return elapsed

    def summary(self) -> dict[str, Any]:
        self._conn.send(("summary", None))
        summary = self._reply()
        self._process.join()
        return summary


def _serve_method(conn: Any, name: str, args: argparse.Namespace, budget: int | None,
                  total_steps: int) -> None:
    """Worker loop of an `IsolatedMethod`: build the method, then step it on request."""
    try:
        method = Method(name, args, budget, total_steps)
        conn.send(("ok", None))
        while True:
            command, batch = conn.recv()
            if command == "summary":
                conn.send(("ok", method.summary()))
                return
            conn.send(("ok", method.step(batch)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


# -- timing ----------------------------------------------------------------------------------------


def time_methods(args: argparse.Namespace, density_budget: int | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    probe = load_base(args)
    budget = density_budget or lora_param_count(probe, args.rank)
    vocab = probe.config.vocab_size
    del probe
    cycle = 20  # SpielConfig.reselection_steps
    rounds = args.warmup + max(args.steps, cycle)
    kind = Method if args.one_process else IsolatedMethod
    methods = [kind(name, args, budget, total_steps=10 * rounds) for name in args.methods]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(4)]
    for r in range(rounds):
        for m in methods:  # interleaved: every method sees the same batch in the same round
            m.step(batches[r % len(batches)])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{m.name} {m.times[-1]:.2f}s" for m in methods),
              flush=True)
    out: dict[str, Any] = {"budget": budget, "methods": {}}
    for m in methods:
        summary = m.summary()
        timed = summary["times"][args.warmup:]
        # AG: mean over a whole cycle (windows and updates included); others: median.
        value = (statistics.fmean(timed[:cycle]) if m.name.startswith("spiel-ag") and len(timed) >= cycle
                 else statistics.median(timed))
        out["methods"][m.name] = {"step_seconds": value, "trainable_params": summary["trainable_params"],
                                  "state_bytes_per_param": summary["state_bytes_per_param"],
                                  "all_step_seconds": timed,
                                  "kernel_seconds_median": statistics.median(
                                      summary["kernel_seconds"][args.warmup:]),
                                  "page_faults_median": statistics.median(
                                      summary["page_faults"][args.warmup:])}
    ref = out["methods"]
    for row in ref.values():
        if "lora" in ref:
            row["ratio_to_lora"] = row["step_seconds"] / ref["lora"]["step_seconds"]
        if "floor" in ref:
            row["ratio_to_floor"] = row["step_seconds"] / ref["floor"]["step_seconds"]
    return out


def peak_memory(args: argparse.Namespace, method: str) -> float:
    """Peak RSS (MiB) of a few training steps of ``method`` in a fresh process."""
    cmd = [sys.executable, __file__, "--memory", method, "--model", args.model, "--hidden",
           str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch), "--seq",
           str(args.seq), "--rank", str(args.rank)]
    if args.budget:
        cmd += ["--budget", str(args.budget)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's own peak RSS. Not ru_maxrss: on Linux that includes the RSS the parent
    had when it forked us, so children of a big parent all report the parent's size."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args: argparse.Namespace) -> None:
    """A few training steps of one method; prints a JSON summary, then the peak RSS in MiB."""
    m = Method(args.memory, args, args.budget, total_steps=1000)
    # Use a short cycle so the steps below include an AG window and an update.
    if m.selector is not None:
        m.selector.config.reselection_steps = 3
        m.selector.config.accumulation_steps = 2
        m.selector._arm()
    vocab = m.model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        m.step(batch)
    rss = peak_rss_mib()
    m.context.close()
    print(json.dumps({"method": args.memory, "quantize": getattr(args, "quantize", None),
                      "trainable_params": m.trainable(), "peak_rss_mib": rss,
                      "state_bytes_per_param": m.state_bytes_per_param(),
                      "median_step_seconds": statistics.median(m.times[1:])}))
    print(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="'default', 'synthetic' or a path")
    parser.add_argument("--hidden", type=int, default=1024, help="synthetic model width")
    parser.add_argument("--layers", type=int, default=4, help="synthetic model depth")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=64, help="LoRA/SHiRA rank; SpIEL matches its count")
    parser.add_argument("--densities", type=float, nargs="*", default=[],
                        help="also time SpIEL at these densities of the targeted weights")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=CHOICES)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process RSS runs")
    parser.add_argument("--one-process", action="store_true",
                        help="time every method in this process (the benchmark before 2026-12-01) instead "
                             "of each in its own worker process, stepped in the same interleaved order")
    parser.add_argument("--memory-only", metavar="RESULT_JSON", default=None,
                        help="only (re)measure peak RSS per method and update that result file")
    parser.add_argument("--memory", choices=CHOICES, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", choices=["nf4", "fp4"], default=None,
                        help="load the base in 4 bits (bitsandbytes) for the --memory runs")
    parser.add_argument("--output", default=None, help="result file (default: bench/results/...)")
    args = parser.parse_args()
    if args.memory:
        memory_child(args)
        return
    if args.memory_only:
        path = Path(args.memory_only)
        result = json.loads(path.read_text())
        for name, row in result["at_lora_budget"]["methods"].items():
            row["peak_rss_mib"] = peak_memory(args, name)
            print(f"{name}: peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        return
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        # Allocator and threading settings change both time and peak RSS: record them.
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith(("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD"))},
        "model": args.model if args.model != "synthetic" else f"synthetic-llama-h{args.hidden}-l{args.layers}",
        "batch": [args.batch, args.seq], "rank": args.rank,
        "processes": "one" if args.one_process else "one per method",
    }
    result["at_lora_budget"] = time_methods(args)
    if not args.no_memory:
        for name in args.methods:
            result["at_lora_budget"]["methods"][name]["peak_rss_mib"] = peak_memory(args, name)
    if args.densities:
        probe = load_base(args)
        targeted = sum(m.weight.numel() for n, m in probe.named_modules()
                       if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_NAMES)
        del probe
        result["by_density"] = {}
        for density in args.densities:
            timed = ["floor", "lora", "spiel-ag", "spiel-ma"]
            timed += [m for m in args.methods if m.startswith("spiel") and m not in timed]
            sub = argparse.Namespace(**{**vars(args), "methods": timed})
            result["by_density"][str(density)] = time_methods(sub, max(1, round(density * targeted)))
    RESULTS.mkdir(exist_ok=True)
    path = Path(args.output) if args.output else RESULTS / f"speed_{result['model'].replace('/', '_')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = result["at_lora_budget"]["methods"]
    print(f"\n{result['model']}, batch {args.batch}x{args.seq}, budget {result['at_lora_budget']['budget']:,}")
    print(f"{'method':10} {'step s':>8} {'x LoRA':>7} {'x floor':>8} {'B/param':>8} {'RSS MiB':>8}"
          f" {'kernel s':>8} {'faults':>8}")
    for name, row in rows.items():
        print(f"{name:10} {row['step_seconds']:8.2f} {row.get('ratio_to_lora', float('nan')):7.2f} "
              f"{row.get('ratio_to_floor', float('nan')):8.2f} {row['state_bytes_per_param']:8.1f} "
              f"{row.get('peak_rss_mib', float('nan')):8.0f} {row['kernel_seconds_median']:8.2f} "
              f"{row['page_faults_median']:8.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
