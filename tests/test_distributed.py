"""SpIEL under DDP on the CPU (gloo, two processes), and the refusal of sharded engines.

The multi-process scenarios run in tests/distributed_worker.py, launched once per fixture
(torchrun for the plain training loop, `accelerate launch` for SpielTrainer); the
single-process references run here, on the same global batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
from spielft.distributed import UnsupportedParallelismError, fingerprint
from spielft.optim import SparseAdamW

WORKER = str(Path(__file__).with_name("distributed_worker.py"))

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(make_cmd, out: Path, timeout: int = 240) -> None:
    """Run a 2-process launcher command, once more on a fresh port if the first try fails.

    The free port can be taken between our probe and the launcher's bind, and the launchers do
    not always say so; a retried failure is reported as a warning with its output, and a
    second failure fails the test with both.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    first = None
    for _ in range(2):
        proc = subprocess.run(
            make_cmd(_free_port()), env=env, capture_output=True, text=True, timeout=timeout
        )
        report = f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        if proc.returncode == 0:
            if first is not None:
                warnings.warn(f"the first launch failed, the retry passed. {first}", stacklevel=2)
            return
        if first is not None:
            pytest.fail(f"{first}\n--- retry ---\n{report}")
        first = report


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")

    def cmd(port):
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port), WORKER, str(out),
        ]  # fmt: skip

    _launch(cmd, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_trainer")

    def cmd(port):
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", WORKER, "trainer", str(out),
        ]  # fmt: skip

    _launch(cmd, out)
    return [torch.load(out / f"trainer-rank{r}.pt", weights_only=False) for r in (0, 1)]


def _assert_same_as_reference(ranks, reference, n_updates):
    assert len(reference["updates"]) == n_updates
    for rank in ranks:
        assert "crash" not in rank
    r0, r1 = ranks
    for u, expected in enumerate(reference["updates"]):
        for name, indices in expected.items():
            # identical on every rank after every update, and what one process picks
            assert torch.equal(r0["updates"][u][name], r1["updates"][u][name]), (u, name)
            assert torch.equal(r0["updates"][u][name], indices), (u, name)
    # the selection really moved (the comparison is not between unchanged sets)
    first, last = reference["updates"][0], reference["updates"][-1]
    assert any(not torch.equal(first[n], last[n]) for n in first)
    for name, (indices, values) in reference["final"].items():
        for rank in ranks:
            got_indices, got_values = rank["final"][name]
            assert torch.equal(got_indices, indices)
            torch.testing.assert_close(got_values, values, rtol=1e-5, atol=1e-6)
        assert values.abs().max() > 1e-3  # trained, not all zeros


@needs_gloo
def test_ddp_ag_selection_agrees_across_ranks_and_matches_single_process(ddp_results):
    """AG, DDP (find_unused_parameters=False), 2 micro-batches per step, seeded Adam moments.

    The captured dense gradients are local; the candidate ranking and the sums are averaged
    over ranks, so the result equals one process on the global batch (with SUM instead of a
    mean the seeded moments, hence the values, would differ; without the ranking all-reduce
    the candidates would).
    """
    reference = worker.train("ag", micro=2, ag_seed_optimizer_state=True)
    _assert_same_as_reference([r["ag"] for r in ddp_results], reference, n_updates=3)


@needs_gloo
def test_ddp_ma_selection_agrees_across_ranks_and_matches_single_process(ddp_results):
    """MA, DDP with find_unused_parameters=True (what Trainer picks) and no buffer broadcast,
    with the final norm trained in full (modules_to_save) next to the deltas."""
    reference = worker.train("ma", micro=1, modules_to_save=["model.norm"])
    _assert_same_as_reference([r["ma"] for r in ddp_results], reference, n_updates=3)
    assert list(reference["saved"]) == ["model.norm.weight"]
    assert not torch.equal(reference["saved"]["model.norm.weight"], torch.ones(64))  # it trained
    for rank in ddp_results:
        torch.testing.assert_close(rank["ma"]["saved"], reference["saved"], rtol=1e-5, atol=1e-6)


@needs_gloo
def test_divergent_indices_fail_loudly_on_every_rank(ddp_results):
    for rank in ddp_results:
        assert rank["corrupt"].startswith("RuntimeError: SpIEL selection diverged across ranks")
        assert "step 3" in rank["corrupt"]
        assert "model.layers.0.self_attn.q_proj" in rank["corrupt"]
        assert rank["final_all_reduce"] == 3.0  # no rank left hanging in a collective


@needs_gloo
def test_mismatched_ag_statistics_fail_before_being_mixed(ddp_results):
    for rank in ddp_results:
        assert rank["uneven"].startswith("RuntimeError: SpIEL selection statistics differ across ranks")


@needs_gloo
def test_different_initial_indices_are_refused_at_start(ddp_results):
    for rank in ddp_results:
        assert rank["seed"].startswith(
            "RuntimeError: SpIEL indices differ across ranks at start-up"
        )


@needs_gloo
def test_real_fsdp_wrapping_is_refused_on_every_rank(ddp_results):
    for rank in ddp_results:
        assert set(rank["fsdp"]) == {"fsdp1", "fsdp1_orig_params", "fsdp2"}
        for message in rank["fsdp"].values():
            assert message.startswith("UnsupportedParallelismError: spielft does not support FSDP")
            assert "DDP" in message and "torchrun" in message
    r0, r1 = (rank["one_rank_fsdp"] for rank in ddp_results)
    assert r0.startswith("UnsupportedParallelismError: spielft does not support FSDP")
    assert r1.startswith("UnsupportedParallelismError: spielft refuses to train: another rank")


@needs_gloo
def test_spiel_trainer_under_accelerate_ddp_matches_single_process(trainer_results, tmp_path):
    """`accelerate launch` + SpielTrainer (AG, gradient accumulation 2), then a resume from a
    checkpoint written inside an accumulation window (per-rank gradient sums); and
    `Trainer(fsdp=True)` refused when train() starts."""
    reference = worker.trainer_run(str(tmp_path), per_device_batch=4)
    assert reference["model_type"] == "SpielModel"
    # The full first reselection regrows the 3686-weight budget (less what it picks again).
    assert 3686 / 2 < reference["changed"][0] <= 3686 and reference["changed"][1] == 454
    for rank in trainer_results:
        assert "crash" not in rank, rank.get("crash")
        assert rank["model_type"] == "DistributedDataParallel"
        assert rank["num_updates"] == 2 and rank["changed"] == reference["changed"]
        assert {"spiel_selector_state-rank0.safetensors", "spiel_selector_state-rank1.safetensors",
                "adapter_model.safetensors"} <= set(rank["checkpoint"])  # fmt: skip
        assert rank["fsdp_trainer"].startswith(
            "UnsupportedParallelismError: spielft does not support FSDP"
        )
    for name, (indices, values) in reference["final"].items():
        for rank in trainer_results:
            for run in (rank, rank["resumed"]):
                assert torch.equal(run["final"][name][0], indices), name
                torch.testing.assert_close(run["final"][name][1], values, rtol=1e-5, atol=1e-6)


# -- single process: refusals and the fingerprint ----------------------------------------------------
@pytest.fixture
def spiel():
    return worker.get_spiel_model(worker.tiny_llama(), worker.spiel_config("ag"))


@pytest.mark.parametrize(
    ("variable", "engine"),
    [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")],
)
def test_accelerate_sharded_configs_are_refused(spiel, monkeypatch, variable, engine):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(UnsupportedParallelismError, match=f"does not support {engine}") as err:
        spiel.create_selector(spiel.create_optimizer(), total_steps=10)
    assert "accelerate config" in str(err.value) and "quantized" in str(err.value)


def test_accelerate_state_deepspeed_is_refused(spiel, monkeypatch):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    monkeypatch.setitem(
        AcceleratorState._shared_state, "distributed_type", DistributedType.DEEPSPEED
    )
    with pytest.raises(UnsupportedParallelismError, match="distributed_type is DEEPSPEED"):
        spiel.create_selector(spiel.create_optimizer(), total_steps=10)


def test_optimizer_over_flattened_parameters_is_refused(spiel):
    """What DeepSpeed ZeRO does to the optimizer: its parameters become a flat fp32 copy."""
    flat = torch.nn.Parameter(
        torch.cat([d.values.detach() for d in spiel.sparse_deltas().values()])
    )
    with pytest.raises(UnsupportedParallelismError, match="does not hold the `values` parameter"):
        spiel.create_selector(SparseAdamW([flat]), total_steps=10)
    spiel.create_selector(spiel.create_optimizer(), total_steps=10)  # the normal case passes


def test_fingerprint_tells_index_sets_apart():
    a = torch.tensor([3, 10, 2**40 + 7])
    assert torch.equal(fingerprint(a), fingerprint(a.clone().to(torch.int64)))
    assert torch.equal(fingerprint(torch.tensor([3, 10], dtype=torch.int32)), fingerprint(a[:2]))
    # same count and same sum of positions: a linear hash would collide
    assert not torch.equal(fingerprint(torch.tensor([4, 9, 2**40 + 7])), fingerprint(a))
    assert not torch.equal(fingerprint(a[:2]), fingerprint(a))


def _single_process_group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_destroy_process_groups_tears_down_the_default_group(tmp_path):
    from spielft.distributed import destroy_process_groups

    destroy_process_groups()  # nothing to tear down: a no-op
    _single_process_group(tmp_path)
    assert dist.is_initialized()
    destroy_process_groups()
    assert not dist.is_initialized()


def test_train_recipe_destroys_the_process_group_even_when_it_fails(tmp_path, monkeypatch):
    # The Trainer leaves the group up; a group alive at interpreter exit can abort a finished
    # torchrun/accelerate run with a failed exit status.
    from spielft.cli import train as recipe

    def failing_train(args):  # the Trainer creates the group, then training fails
        _single_process_group(tmp_path)
        raise RuntimeError("training failed")

    monkeypatch.setattr(recipe, "_train", failing_train)
    with pytest.raises(RuntimeError, match="training failed"):
        recipe.run(None)
    assert not dist.is_initialized()


def test_train_recipe_leaves_a_group_it_did_not_create(tmp_path, monkeypatch):
    from spielft.cli import train as recipe
    from spielft.distributed import destroy_process_groups

    monkeypatch.setattr(recipe, "_train", lambda args: 0)
    _single_process_group(tmp_path)
    try:
        assert recipe.run(None) == 0
        assert dist.is_initialized()  # the caller's group: theirs to destroy
    finally:
        destroy_process_groups()
