"""Data-parallel (DDP) support for SpIEL, and the refusal of sharded engines.

Under DDP (``torchrun``, ``accelerate launch`` with a multi-GPU/multi-CPU config, or a
`transformers.Trainer` started by either) every process holds the whole adapter: DDP averages
the deltas' ``values`` gradients, so values and optimizer state stay identical, and the
selector keeps the index sets identical:

* AG: the dense weight gradient that backward hands to the selector is the *local* micro-batch
  gradient. The first micro-batch's candidate ranking and, at each update, the accumulated
  sums are therefore averaged over ranks (on a dedicated process group, so these collectives
  never interleave with DDP's gradient buckets): exactly what one process would compute on the
  global batch when the loss is a mean.
* MA: SM3's row/column accumulators are fed by the DDP-averaged gradients: identical already.
* The input mean squares of the normalised regrowth scores (AG and MA) are local as well, and
  are averaged over ranks with the AG sums at each update (and for AG's first-micro-batch
  ranking).
* Initial indices come from ``SpielConfig.seed`` through a private ``torch.Generator``:
  identical on every rank.
* A fingerprint of every module's indices is compared across ranks when the selector starts
  and after each update; any difference raises on every rank (never a silent divergence).

FSDP, DeepSpeed (every ZeRO stage), Megatron-LM and tensor parallelism are refused at start-up
by `refuse_unsupported` (see its message for why and what to use instead).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layer import SparseDelta

__all__ = [
    "UnsupportedParallelismError",
    "agreement",
    "all_reduce_mean_",
    "destroy_process_groups",
    "fingerprint",
    "refuse_unsupported",
    "selection_group",
    "unsupported_reason",
]

_P = 2147483647  # 2**31 - 1: keeps every product below 2**63


class UnsupportedParallelismError(RuntimeError):
    """Raised at start-up when a sharding engine (FSDP, DeepSpeed, ...) wraps a SpIEL model."""


# -- process group ---------------------------------------------------------------------------------
_GROUP_CACHE: dict[str, Any] = {}


def selection_group() -> Any | None:
    """The process group the selector's collectives use, or None when running alone.

    A group of its own (created once per default group: ``new_group`` is collective, so every
    rank must reach this together, as it does when every rank builds its selector), so that the
    all-reduces issued from inside backward never queue behind, or between, DDP's buckets.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    default = dist.distributed_c10d._get_default_group()
    if _GROUP_CACHE.get("default") is not default:
        _GROUP_CACHE["default"] = default
        _GROUP_CACHE["group"] = dist.new_group()
    return _GROUP_CACHE["group"]


def destroy_process_groups() -> None:
    """Tear down the default process group (and with it the selector's), if there is one.

    For launchers' entry points: a gloo/NCCL group still up when the interpreter exits can
    abort the process ("terminate called without an active exception") after the work is done,
    turning a finished run into a failed exit status.
    """
    _GROUP_CACHE.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean_(tensor: Tensor, group: Any) -> Tensor:
    """In-place mean over the ranks of ``group`` (SUM then divide: gloo has no AVG)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.div_(dist.get_world_size(group))


def agreement(values: Tensor, group: Any) -> Tensor:
    """Elementwise: do all ranks hold the same ``values`` (1-D int64, >= 0)? One collective."""
    both = torch.cat([values, -values])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return both[:n] == -both[n:]  # max == min


def fingerprint(indices: Tensor) -> Tensor:
    """int64 [count, h1, h2] of a set of flat positions: equal sets give equal fingerprints.

    Two independent nonlinear sums modulo 2**31 - 1, so two different index sets collide
    with probability about 2**-62. O(k) elementwise work, no sort, no host synchronisation.
    """
    x = indices.long()
    a = (x % _P * 40503 + 12345) % _P
    b = (x % _P * 48271 + 977) % _P
    h1 = (a * a % _P).sum()
    h2 = ((b * b % _P) ^ a).sum()
    count = torch.tensor(x.numel(), dtype=torch.long, device=x.device)
    return torch.stack([count, h1, h2])


# -- sharded engines ---------------------------------------------------------------------------------
_ADVICE = (
    "SpIEL keeps each trainable delta (its sorted indices and values) and its optimizer state "
    "whole on every process - they are about 1% of the weights - and patches the frozen base "
    "weights in place at those indices. Use plain data parallelism instead: DDP, i.e. "
    "`torchrun --nproc-per-node N ...` or `accelerate launch` with an `accelerate config` of "
    "type multi-GPU (no FSDP, no DeepSpeed); with the Trainer, drop the `fsdp`/`deepspeed` "
    "arguments. To fit a base model too large for one device, load it quantized (bitsandbytes "
    "4/8-bit: spielft trains deltas on top of it) rather than sharding it."
)

_WHY = {
    "FSDP": (
        "FSDP flattens and shards parameters, so a delta's `values` is no longer one whole "
        "parameter matching its indices (the optimizer's per-slot state and drop-and-regrow "
        "need it whole), and it shards the base weights that the sparse op patches in place"
    ),
    "DeepSpeed": (
        "DeepSpeed ZeRO (every stage) wraps the optimizer and moves parameters into flattened "
        "fp32 partitions, so SparseAdamW/SM3 never see the deltas' `values` and cannot remap "
        "their state when indices change; ZeRO-3 also partitions the base weights"
    ),
    "Megatron-LM": "Megatron-LM splits the weight matrices that the sparse indices address",
    "tensor parallelism": (
        "DTensor parameters (FSDP2 `fully_shard` or tensor parallelism) split the matrices "
        "that the sparse indices address"
    ),
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _accelerate_distributed_type() -> str | None:
    """accelerate's ``distributed_type`` if its state exists (never creates it)."""
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    for state in (AcceleratorState, PartialState):
        value = state._shared_state.get("distributed_type")
        if value is not None:
            return str(getattr(value, "value", value))
    return None


def unsupported_reason(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    deltas: Mapping[str, SparseDelta] | None = None,
) -> tuple[str, str] | None:
    """(engine, what was detected) if ``model``/``optimizer`` run under an unsupported engine."""
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP", "ACCELERATE_USE_FSDP=true (an accelerate FSDP config)"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed", "ACCELERATE_USE_DEEPSPEED=true (an accelerate DeepSpeed config)"
    kind = _accelerate_distributed_type()
    engines = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}
    if kind in engines:
        return engines[kind], f"accelerate's distributed_type is {kind}"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FSDPModule = FullyShardedDataParallel = ()  # type: ignore[assignment]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    for name, module in model.named_modules():
        if isinstance(module, (FullyShardedDataParallel, FSDPModule)):
            return "FSDP", f"module {name or '<root>'!r} is a {type(module).__name__}"
        if type(module).__name__ == "DeepSpeedEngine":
            return "DeepSpeed", f"module {name or '<root>'!r} is a DeepSpeedEngine"
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            return "tensor parallelism", f"parameter {name!r} is a DTensor"
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            return "DeepSpeed", f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3"
    for name, delta in (deltas or {}).items():
        values = delta._parameters.get("values")
        if not isinstance(values, nn.Parameter) or values.numel() != delta.indices.numel():
            shown = "missing" if values is None else f"{values.numel()} elements"
            return "FSDP", (
                f"the values of {name!r} are {shown} for {delta.indices.numel()} indices "
                "(flattened or sharded)"
            )
    if optimizer is not None:
        inner, seen = optimizer, 0
        while inner is not None and seen < 8:
            if type(inner).__module__.split(".")[0] == "deepspeed":
                return "DeepSpeed", f"the optimizer is wrapped by {type(inner).__name__}"
            inner, seen = getattr(inner, "optimizer", None), seen + 1
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            n
            for n, d in (deltas or {}).items()
            if d.values.requires_grad and id(d.values) not in held
        ]
        if missing:
            return "DeepSpeed", (
                f"the optimizer does not hold the `values` parameter of {missing[:3]} "
                f"({len(missing)} deltas); its parameters were replaced (flattened) by a wrapper. "
                "If you built it yourself, create it with model.create_optimizer() after "
                "the model is wrapped"
            )
    return None


def refuse_unsupported(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    deltas: Mapping[str, SparseDelta] | None = None,
    group: Any | None = None,
) -> None:
    """Raise `UnsupportedParallelismError` if this (or, with ``group``, any) rank is sharded.

    With ``group`` the decision is collective, so that every rank raises instead of the
    healthy ones waiting forever in the next collective.
    """
    reason = unsupported_reason(model, optimizer, deltas)
    if group is not None:
        device = next(iter(deltas.values())).values.device if deltas else torch.device("cpu")
        flag = torch.tensor([1 if reason else 0], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if reason is None and flag.item():
            raise UnsupportedParallelismError(
                "spielft refuses to train: another rank runs under a sharded engine (FSDP / "
                f"DeepSpeed); see its error. {_ADVICE}"
            )
    if reason is not None:
        engine, detected = reason
        raise UnsupportedParallelismError(
            f"spielft does not support {engine} ({detected}): {_WHY[engine]}. {_ADVICE}"
        )
