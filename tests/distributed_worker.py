"""Worker for tests/test_distributed.py: SpIEL under DDP (gloo, CPU), launched by torchrun.

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port PORT \\
        tests/distributed_worker.py OUT_DIR

Runs every scenario in one launch (process start-up dominates on a 2-core machine) and writes
``OUT_DIR/rank{R}.pt``: per scenario, the indices after every update and the final deltas, or
the error each rank raised. `train` with ``world_size=1`` and no process group is the
single-process reference that the test runs on the same global batches.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

import tiny_models  # tests/, the script's folder (sys.path[0] under torchrun)
from spielft import SpielConfig, get_spiel_model

GLOBAL_BATCH = 4  # sequences per micro-batch, over all ranks
SEQ_LEN = 12
STEPS = 10  # optimizer steps: updates at 3, 6 and 9 (reselection_steps=3)


def tiny_llama() -> LlamaForCausalLM:
    """The shared tiny Llama (seed 0) over the 64 token ids of `batches`, in train mode."""
    return tiny_models.tiny_llama(
        vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False
    ).train()


def spiel_config(regrowth: str, **overrides: Any) -> SpielConfig:
    fields: dict[str, Any] = dict(
        density=0.05,
        regrowth=regrowth,
        reselection_steps=3,
        accumulation_steps=2,
        initial_reselection_rate=0.5,
        full_first_reselection=True,
        seed=7,
    )
    fields.update(overrides)
    return SpielConfig(**fields)


def batches(steps: int, micro: int, seed: int = 123) -> list[list[torch.Tensor]]:
    """Global micro-batches (GLOBAL_BATCH x SEQ_LEN token ids), the same for every caller."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randint(64, (GLOBAL_BATCH, SEQ_LEN), generator=gen) for _ in range(micro)]
        for _ in range(steps)
    ]


def snapshot(spiel) -> dict[str, torch.Tensor]:
    return {n: d.indices.long().clone() for n, d in spiel.sparse_deltas().items()}


def train(
    regrowth: str,
    rank: int = 0,
    world_size: int = 1,
    micro: int = 1,
    ddp_kwargs: dict | None = None,
    before_step=None,
    lr: float = 1e-2,
    **config: Any,
) -> dict[str, Any]:
    """Train a tiny Llama with SpIEL on this rank's share of `batches` (DDP if ``ddp_kwargs``).

    The loss is the token mean of the rank's micro-batch divided by ``micro``, so the
    DDP-averaged gradient is exactly the single-process gradient of the global batch.
    """
    spiel = get_spiel_model(tiny_llama(), spiel_config(regrowth, **config))
    model = spiel
    if ddp_kwargs is not None:
        model = torch.nn.parallel.DistributedDataParallel(spiel, **ddp_kwargs)
    optimizer = spiel.create_optimizer(lr=lr)
    selector = spiel.create_selector(optimizer, total_steps=STEPS)
    share = GLOBAL_BATCH // world_size
    record: dict[str, Any] = {"updates": [], "stats": [], "losses": []}
    for step, step_batches in enumerate(batches(STEPS, micro)):
        for m, global_ids in enumerate(step_batches):
            ids = global_ids[rank * share : (rank + 1) * share]
            sync = ddp_kwargs is None or m == micro - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = model(input_ids=ids, labels=ids).loss / micro
                loss.backward()
            record["losses"].append(loss.item())
        optimizer.step()
        if before_step is not None:
            before_step(step + 1, spiel, selector)
        stats = selector.step()
        optimizer.zero_grad(set_to_none=True)
        if stats is not None:
            record["updates"].append(snapshot(spiel))
            record["stats"].append(stats)
    record["final"] = {
        n: (d.indices.long().clone(), d.values.detach().clone())
        for n, d in spiel.sparse_deltas().items()
    }
    record["saved"] = {  # modules trained in full (modules_to_save): their copies' weights
        f"{n}.{k}": v.detach().clone()
        for n, w in spiel.modules_to_save_wrappers().items()
        for k, v in w.modules_to_save[spiel.active_adapter].state_dict().items()
    }
    selector.close()
    return record


# -- scenarios (each rank runs them all, in the same order) --------------------------------------
def _corrupt_rank1(step, spiel, selector):
    """Before the first update, give rank 1 a different index set in one matrix."""
    if step == 3 and dist.get_rank() == 1:
        delta = next(iter(spiel.sparse_deltas().values()))
        k, numel = delta.indices.numel(), delta.numel_dense
        other = torch.randperm(numel, generator=torch.Generator().manual_seed(99))[:k].sort()
        delta.indices = other.values.to(delta.indices.dtype)


def _extra_micro_batch_rank1(step, spiel, selector):
    """In the AG window before the first update, rank 1 runs one more backward."""
    if step == 3 and dist.get_rank() == 1:
        ids = batches(1, 1, seed=5)[0][0][:2]
        spiel(input_ids=ids, labels=ids).loss.backward()


def _fsdp_refusals(rank: int) -> dict[str, str]:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from spielft.layer import SparseDelta

    errors = {}
    cpu = torch.device("cpu")
    wrappers = {
        # each delta's `values` flattened into an FSDP unit of its own
        "fsdp1": lambda m: FullyShardedDataParallel(
            m, device_id=cpu, auto_wrap_policy=ModuleWrapPolicy({SparseDelta})
        ),
        # one root unit, original parameters kept (as views into each rank's shard)
        "fsdp1_orig_params": lambda m: FullyShardedDataParallel(
            m, device_id=cpu, use_orig_params=True
        ),
        "fsdp2": lambda m: fully_shard(m) or m,
    }
    for key, wrap in wrappers.items():
        spiel = get_spiel_model(tiny_llama(), spiel_config("ag"))
        optimizer = spiel.create_optimizer(lr=1e-2)
        wrap(spiel)
        try:
            spiel.create_selector(optimizer, total_steps=STEPS)
            errors[key] = "no error"
        except Exception as err:
            errors[key] = f"{type(err).__name__}: {err}"
    return errors


def _capture(fn) -> str:
    try:
        fn()
        return "no error"
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    try:
        # AG with 2 micro-batches per step (no_sync on the first), as DDP is normally used.
        results["ag"] = train(
            "ag",
            rank,
            world,
            micro=2,
            ddp_kwargs={"find_unused_parameters": False},
            ag_seed_optimizer_state=True,  # seeds = mean gradients: checks AVG, not SUM
        )
        # MA, with DDP's find_unused_parameters=True (what transformers.Trainer picks for a
        # SpielModel) and without DDP re-broadcasting rank 0's buffers (the indices) at each
        # forward: the ranks must agree on their own. The final norm trains in full next to
        # the deltas (modules_to_save): DDP averages its gradient like any parameter's.
        results["ma"] = train(
            "ma",
            rank,
            world,
            micro=1,
            ddp_kwargs={"find_unused_parameters": True, "broadcast_buffers": False},
            modules_to_save=["model.norm"],
        )
        # Divergent indices must raise on every rank at the update (no hang).
        results["corrupt"] = _capture(
            lambda: train(
                "ag",
                rank,
                world,
                ddp_kwargs={},
                before_step=_corrupt_rank1,
                full_first_reselection=False,
            )
        )
        # Different micro-batch counts in an AG window must raise before mixing statistics.
        results["uneven"] = _capture(
            lambda: train("ag", rank, world, before_step=_extra_micro_batch_rank1)
        )
        # Different initial index sets (different seeds) must raise when the selector starts.
        spiel = get_spiel_model(tiny_llama(), spiel_config("ag", seed=rank))
        results["seed"] = _capture(
            lambda: spiel.create_selector(spiel.create_optimizer(), total_steps=STEPS)
        )

        # One rank detecting a sharded engine: every rank raises (collective refusal).
        def one_rank_fsdp():
            spiel = get_spiel_model(tiny_llama(), spiel_config("ag"))
            if rank == 0:
                os.environ["ACCELERATE_USE_FSDP"] = "true"
            try:
                spiel.create_selector(spiel.create_optimizer(), total_steps=STEPS)
            finally:
                os.environ.pop("ACCELERATE_USE_FSDP", None)

        results["one_rank_fsdp"] = _capture(one_rank_fsdp)
        results["fsdp"] = _fsdp_refusals(rank)
        # The group is still usable after all the raised errors (nobody is stuck).
        probe = torch.tensor([rank + 1.0])
        dist.all_reduce(probe)
        results["final_all_reduce"] = probe.item()
    except Exception:
        results["crash"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# -- SpielTrainer (launched by `accelerate launch`) -----------------------------------------------
def trainer_run(out_dir: str, per_device_batch: int, resume: str | None = None) -> dict[str, Any]:
    """SpielTrainer, AG with gradient accumulation 2, on the same global batches in order.

    Under DDP each rank gets ``per_device_batch`` sequences of every global batch (accelerate
    shards the sequential batches), so with ``per_device_batch * world_size`` constant the run
    sees the same data as a single process.
    """
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    from spielft.trainer import SpielTrainer

    class SequentialSpielTrainer(SpielTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    gen = torch.Generator().manual_seed(321)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(64, (64, SEQ_LEN), generator=gen)
    ]
    spiel = get_spiel_model(tiny_llama(), spiel_config("ag", ag_seed_optimizer_state=True))
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_steps=5,  # step 5 is inside the accumulation window of the update at step 6
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SequentialSpielTrainer(model=spiel, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    selector = trainer.selector
    return {
        "final": {
            n: (d.indices.long().clone(), d.values.detach().clone())
            for n, d in spiel.sparse_deltas().items()
        },
        "num_updates": selector.num_updates,
        "changed": [
            h["spiel/indices_changed"]
            for h in trainer.state.log_history
            if "spiel/indices_changed" in h
        ],
        "model_type": type(trainer.model_wrapped).__name__,
        "checkpoint": sorted(os.listdir(os.path.join(out_dir, "checkpoint-5"))),
    }


def trainer_main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    results: dict[str, Any] = {}
    try:
        results = trainer_run(os.path.join(out_dir, "run"), per_device_batch=2)
        # Resume from the checkpoint written inside an AG window (per-rank gradient sums).
        checkpoint = os.path.join(out_dir, "run", "checkpoint-5")
        results["resumed"] = trainer_run(
            os.path.join(out_dir, "run"), per_device_batch=2, resume=checkpoint
        )
        # Trainer(fsdp=True) must be refused when train() starts, on every rank.
        results["fsdp_trainer"] = _capture(lambda: trainer_fsdp(os.path.join(out_dir, "fsdp")))
    except Exception:
        results["crash"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, os.path.join(out_dir, f"trainer-rank{rank}.pt"))
        # The Trainer leaves its process group up; gloo's threads must stop before the
        # interpreter does, or exit can abort ("terminate called without an active exception").
        if dist.is_initialized():
            dist.destroy_process_group()


def trainer_fsdp(out_dir: str) -> None:
    from transformers import TrainingArguments

    from spielft.trainer import SpielTrainer

    spiel = get_spiel_model(tiny_llama(), spiel_config("ag"))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(64, (8, SEQ_LEN))]
    try:
        args = TrainingArguments(
            output_dir=out_dir,
            fsdp=True,
            use_cpu=True,
            ddp_backend="gloo",
            max_steps=2,
            per_device_train_batch_size=2,
            report_to=[],
            disable_tqdm=True,
        )
        SpielTrainer(model=spiel, args=args, train_dataset=data).train()
    finally:
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by TrainingArguments(fsdp=...)


if __name__ == "__main__":
    if sys.argv[1] == "trainer":
        trainer_main(sys.argv[2])
    else:
        main(sys.argv[1])
