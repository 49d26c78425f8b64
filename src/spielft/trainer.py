"""SpIEL training with 🤗 `transformers.Trainer` (and trl's `SFTTrainer`).

Two ways in:

* `SpielTrainer`: a `transformers.Trainer` that builds the SpIEL optimizer (SparseAdamW for
  ``regrowth="ag"``, SM3 for ``"ma"``) from its `TrainingArguments`, runs the drop-and-regrow
  schedule, logs its statistics (``spiel/indices_changed``, ``spiel/reselection_rate``, ...),
  and writes checkpoints that hold the adapter only (``adapter_model.safetensors``), never the
  base model's weights. ``SpielTrainerMixin`` gives any other Trainer subclass the same.

* `SpielCallback` plus `create_spiel_optimizer` for a Trainer you do not subclass, above all
  trl's ``SFTTrainer``::

      spiel = get_spiel_model(base, SpielConfig(...))
      trainer = SFTTrainer(
          model=spiel.base_model,            # the transformers model, deltas inside: see below
          args=args,
          train_dataset=dataset,
          processing_class=tokenizer,
          optimizers=(create_spiel_optimizer(spiel, args), None),
          callbacks=[SpielCallback(spiel)],
      )

  ``SFTTrainer`` must get ``spiel.base_model`` (the ``PreTrainedModel`` whose layers now carry
  the sparse deltas), not the `SpielModel` itself: it replaces the model's ``forward`` with a
  fused LM head that calls ``model.base_model`` expecting the transformer backbone, and on a
  `SpielModel` that attribute is the whole causal LM (the callback raises a clear error if it
  sees this). Training the inner model trains the deltas all the same; the callback still
  needs the `SpielModel`, so pass it explicitly. The callback steps the selector once per
  optimizer step, writes the selector state (and the adapter) into each checkpoint folder and
  restores both when training resumes. The Trainer itself still saves its usual full
  ``model.safetensors`` in checkpoints (and ``trainer.save_model()`` writes the inner model with
  its ``spiel_deltas`` keys, not a plain transformers checkpoint): save the result with
  ``spiel.save_pretrained(dir)``. For adapter-only checkpoints and ``save_model()`` use
  ``class SpielSFTTrainer(SpielTrainerMixin, SFTTrainer)`` with the same arguments. A plain
  ``Trainer`` given a `SpielModel` plus this callback saves ``model.state_dict()`` in full,
  which fails on tied embeddings; use `SpielTrainer` there.

Checkpoint contents written by this module (next to the Trainer's ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json``):

* ``adapter_model.safetensors`` + ``adapter_config.json``: `SpielModel.save_pretrained`.
* ``spiel_selector_state.json``: the selector's integers (step count, number of updates, ...)
  and ``spiel_selector_state.safetensors``: its tensors (the AG gradient sums of an open
  accumulation window). Nothing is pickled. With several processes each rank writes its own
  tensors file (``...-rank{N}.safetensors``), since gradient sums are per rank until an update.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import find_labels

from .files import atomic_write
from .layer import SpielLayer
from .model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, SpielModel, read_adapter
from .selection import SpielSelector, unwrap_optimizer

try:  # only the name of the file; present in every supported transformers version
    from transformers.trainer import OPTIMIZER_NAME, TRAINING_ARGS_NAME
except ImportError:  # pragma: no cover
    OPTIMIZER_NAME, TRAINING_ARGS_NAME = "optimizer.pt", "training_args.bin"

try:
    from transformers.utils import can_return_loss
except ImportError:  # pragma: no cover
    can_return_loss = None

logger = logging.getLogger(__name__)

SELECTOR_STATE_NAME = "spiel_selector_state.json"
SELECTOR_TENSORS_NAME = "spiel_selector_state.safetensors"
SELECTOR_FORMAT_VERSION = 1

__all__ = [
    "SELECTOR_STATE_NAME",
    "SELECTOR_TENSORS_NAME",
    "SpielCallback",
    "SpielTrainer",
    "SpielTrainerMixin",
    "create_spiel_optimizer",
    "create_spiel_optimizer_and_scheduler",
    "load_adapter_in_place",
    "load_selector_state",
    "save_selector_state",
]


# -- helpers ---------------------------------------------------------------------------------------
def _find_spiel_model(model: Any) -> SpielModel | None:
    """The `SpielModel` in ``model`` (itself, or inside DDP/accelerate wrappers), else None."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, SpielModel):
            return model
        inner = getattr(model, "module", None)
        model = inner if inner is not None else getattr(model, "_orig_mod", None)
        seen += 1
    return None


def _optim_arg(args: TrainingArguments, key: str) -> str | None:
    """``key`` from ``args.optim_args`` ("a=1,b=2"), if present."""
    text = getattr(args, "optim_args", None) or ""
    for item in text.replace(" ", "").split(","):
        name, _, value = item.partition("=")
        if name == key and value:
            return value
    return None


def _refuse_data_parallel(args: TrainingArguments) -> None:
    """Refuse ``nn.DataParallel`` (the Trainer's choice on 2+ GPUs without a launcher).

    Its replicas run backward in threads that share the selector's captures, each seeing a
    slice of the batch, so AG's statistics would race and be partial.
    """
    mode = getattr(args, "parallel_mode", None)
    if getattr(args, "n_gpu", 1) > 1 and getattr(mode, "value", mode) == "not_distributed":
        raise RuntimeError(
            f"SpIEL does not support nn.DataParallel (the Trainer uses it on {args.n_gpu} GPUs "
            "when not launched by a distributed launcher). Launch with `torchrun "
            "--nproc-per-node N ...` or `accelerate launch` (DDP), or expose one GPU "
            "(CUDA_VISIBLE_DEVICES=0)."
        )


def _is_main_process(args: TrainingArguments) -> bool:
    return bool(getattr(args, "should_save", True))


def _rank_and_world(args: TrainingArguments) -> tuple[int, int]:
    return int(getattr(args, "process_index", 0)), int(getattr(args, "world_size", 1))


# -- optimizer -------------------------------------------------------------------------------------
# TrainingArguments.optim names that are AdamW implementations, mapped without a warning.
_PLAIN_ADAMW = frozenset(
    {"adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_hf",
     "adamw_apex_fused"}
)
_PLAIN_ADAMW_8BIT = frozenset({"adamw_bnb_8bit", "adamw_8bit", "adamw_torch_8bit"})


def create_spiel_optimizer(
    model: nn.Module, args: TrainingArguments, *, sm3_momentum: float | None = None
) -> torch.optim.Optimizer:
    """The SpIEL optimizer for ``model``'s active adapter, configured from ``args``.

    ``regrowth="ag"``: `SparseAdamW` with ``learning_rate``, ``weight_decay``, ``adam_beta1``,
    ``adam_beta2`` and ``adam_epsilon``. ``regrowth="ma"``: `SM3` with ``learning_rate`` and
    ``weight_decay`` (SM3's own tiny epsilon: ``adam_epsilon`` means something else), and
    momentum ``sm3_momentum``, else ``momentum=...`` from ``args.optim_args``, else 0.
    ``args.optim`` only chooses the precision: a name with "8bit" (``adamw_bnb_8bit``,
    ``paged_adamw_8bit``, ...) gives `SparseAdamW8bit` for ``"ag"``; other optimizers than
    AdamW, and variants (paged, 4-bit, ...), are not available for sparse deltas and are
    replaced with a warning. Weight decay applies to the deltas and to other trainable
    matrices, never to biases and norms (see `SpielModel.create_optimizer`).
    """
    spiel = _find_spiel_model(model)
    if spiel is None:
        raise TypeError(
            f"create_spiel_optimizer needs a SpielModel (from get_spiel_model), got "
            f"{type(model).__name__}"
        )
    optim = getattr(args, "optim", "adamw_torch")
    optim_name = str(getattr(optim, "value", optim)).lower()
    config = spiel.peft_config[spiel.active_adapter]
    ag = config.regrowth == "ag"
    bits = 8 if ag and "8bit" in optim_name else 32
    used = ("SparseAdamW8bit" if bits == 8 else "SparseAdamW") if ag else "SM3"
    if optim_name not in _PLAIN_ADAMW and not (bits == 8 and optim_name in _PLAIN_ADAMW_8BIT):
        logger.warning(
            "TrainingArguments.optim=%r is not available for SpIEL's sparse deltas (their "
            "optimizer must remap its per-slot state when indices change): training with %s "
            "instead.",
            optim_name,
            used,
        )
    if config.regrowth == "ma":
        if sm3_momentum is None:
            value = _optim_arg(args, "momentum")
            sm3_momentum = float(value) if value is not None else 0.0
        return spiel.create_optimizer(
            lr=args.learning_rate, weight_decay=args.weight_decay, momentum=float(sm3_momentum)
        )
    return spiel.create_optimizer(
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        optim_bits=bits,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def create_spiel_optimizer_and_scheduler(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int,
    *,
    sm3_momentum: float | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`create_spiel_optimizer` plus the scheduler ``args`` asks for (type, warmup, kwargs).

    For ``Trainer(optimizers=...)`` you can also pass ``(create_spiel_optimizer(...), None)``
    and let the Trainer build the scheduler once it knows the number of steps.
    """
    optimizer = create_spiel_optimizer(model, args, sm3_momentum=sm3_momentum)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler


# -- adapter and selector state ------------------------------------------------------------------
@torch.no_grad()
def load_adapter_in_place(
    model: SpielModel, adapter_dir: str | os.PathLike, adapter_name: str | None = None
) -> None:
    """Load a saved adapter's indices and values into ``model``'s existing deltas (and the
    state of the modules it trains in full into their copies).

    Unlike `SpielModel.load_adapter`, this keeps every `SparseDelta`, ``values`` parameter and
    copied module, so an optimizer, its (slot-ordered) state and the selector created for them
    stay valid. The index sets changed during training, so each delta is reassigned to the
    saved indices; the number of deltas per module must match.
    """
    adapter_name = adapter_name or model.active_adapter
    saved = read_adapter(adapter_dir, model.base_model)
    state = saved.deltas
    deltas = model.sparse_deltas(adapter_name)
    copies = {
        name: wrapper.modules_to_save[adapter_name]
        for name, wrapper in model.modules_to_save_wrappers().items()
        if adapter_name in wrapper.modules_to_save
    }
    if set(saved.modules_to_save) != set(copies):
        raise ValueError(
            f"adapter in {adapter_dir} does not match adapter {adapter_name!r}: it trains "
            f"{sorted(saved.modules_to_save)} in full (modules_to_save), the model "
            f"{sorted(copies)}"
        )
    if set(state) != set(deltas):
        missing, extra = sorted(set(deltas) - set(state)), sorted(set(state) - set(deltas))
        raise ValueError(
            f"adapter in {adapter_dir} does not match adapter {adapter_name!r}: modules missing "
            f"from the file {missing[:3]}, unknown modules {extra[:3]}"
        )
    layers = model.spiel_layers()
    for name, (indices, values) in state.items():
        delta = deltas[name]
        layer: SpielLayer = layers[name]
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"unmerge the model before loading an adapter into it ({name})")
        if indices.numel() != delta.values.numel():
            raise ValueError(
                f"{adapter_dir}, module {name!r}: {indices.numel()} deltas saved, the model "
                f"has {delta.values.numel()}"
            )
        delta.indices = indices.to(device=delta.indices.device, dtype=delta.indices.dtype)
        delta.values.copy_(values.to(device=delta.values.device, dtype=delta.values.dtype))
    for name, module_state in saved.modules_to_save.items():
        copies[name].load_state_dict(module_state)  # copies in place: the optimizer's tensors stay


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able copy of ``obj`` with each tensor moved to ``tensors`` (and a reference left)."""
    if isinstance(obj, Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            str(k): _flatten(v, f"{prefix}/{k}" if prefix else str(k), tensors)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"selector state holds a {type(obj).__name__} at {prefix!r}: not serialisable")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _tensors_name(rank: int, world_size: int) -> str:
    if world_size <= 1:
        return SELECTOR_TENSORS_NAME
    return SELECTOR_TENSORS_NAME.replace(".safetensors", f"-rank{rank}.safetensors")


def save_selector_state(
    selector: SpielSelector,
    directory: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    write_json: bool = True,
) -> None:
    """Write ``selector.state_dict()``: integers to JSON, tensors to safetensors (no pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    tree = _flatten(selector.state_dict(), "", tensors)
    name = _tensors_name(rank, world_size)
    atomic_write(directory / name, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if write_json:
        meta = {
            "format_version": SELECTOR_FORMAT_VERSION,
            "adapter_name": selector.adapter_name,
            "regrowth": selector.config.regrowth,
            "world_size": world_size,
            "state": tree,
        }
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        atomic_write(directory / SELECTOR_STATE_NAME, lambda p: Path(p).write_text(text))


def load_selector_state(
    selector: SpielSelector,
    directory: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    total_steps: int | None = None,
) -> None:
    """Restore a selector saved by `save_selector_state` (tensors onto the deltas' devices).

    ``total_steps`` (the resumed run's length) overrides the saved one if given; a mismatch is
    logged, since it changes the reselection-rate schedule from then on.
    """
    directory = Path(directory)
    meta = json.loads((directory / SELECTOR_STATE_NAME).read_text())
    if meta.get("format_version") != SELECTOR_FORMAT_VERSION:
        raise ValueError(
            f"{directory / SELECTOR_STATE_NAME}: unknown selector state format "
            f"{meta.get('format_version')!r}"
        )
    if (
        meta.get("adapter_name") != selector.adapter_name
        or meta.get("regrowth") != selector.config.regrowth
    ):
        raise ValueError(
            f"{directory}: selector state of adapter {meta.get('adapter_name')!r} "
            f"(regrowth={meta.get('regrowth')!r}) cannot resume adapter "
            f"{selector.adapter_name!r} (regrowth={selector.config.regrowth!r})"
        )
    saved_world_size = int(meta.get("world_size", 1))
    if saved_world_size != world_size:
        # Only an open statistics window is per rank (each rank's own gradient and input
        # sums); everything else is the same on every rank and resumes on any number of
        # processes.
        if meta["state"].get("accumulators"):
            raise ValueError(
                f"{directory}: selector state saved with {saved_world_size} processes inside "
                f"a statistics window (the steps before a reselection), resuming with "
                f"{world_size}: per-rank gradient and input sums cannot be redistributed. "
                "Resume with the same number of processes, or from a checkpoint outside a "
                "window."
            )
        rank, world_size = 0, saved_world_size
    path = directory / _tensors_name(rank, world_size)
    if not path.is_file() and meta["state"].get("accumulators"):
        raise ValueError(
            f"{path} is missing: the checkpoint was written inside a statistics window (the "
            "steps before a reselection), where each rank saves its own gradient and input "
            "sums in its own file. With several machines and no shared filesystem, each "
            "rank's file is in the checkpoint folder on that rank's machine: copy every "
            f"{SELECTOR_TENSORS_NAME.replace('.safetensors', '-rank*.safetensors')} into this "
            "folder on every machine, or resume from a checkpoint outside a window."
        )
    tensors = load_file(str(path)) if path.is_file() else {}
    state = _unflatten(meta["state"], tensors)
    default_device = (
        next(iter(selector.deltas.values())).values.device if selector.deltas else "cpu"
    )
    for name, acc in state.get("accumulators", {}).items():
        device = selector.deltas[name].values.device if name in selector.deltas else default_device
        for key, value in acc.items():
            if isinstance(value, Tensor):
                acc[key] = value.to(device)
    if total_steps is not None and int(state.get("total_steps", total_steps)) != int(total_steps):
        logger.warning(
            "Resuming with max_steps=%d, the checkpoint's selector was scheduled for %d steps: "
            "the reselection rate now decays over %d steps.",
            total_steps,
            state["total_steps"],
            total_steps,
        )
        state["total_steps"] = int(total_steps)
    selector.load_state_dict(state)


# -- the callback ----------------------------------------------------------------------------------
class SpielCallback(TrainerCallback):
    """Runs SpIEL's drop-and-regrow schedule inside any `transformers.Trainer`.

    * ``on_train_begin``: builds the `SpielSelector` (``total_steps`` = the Trainer's
      ``max_steps``) over the Trainer's optimizer, which must come from
      `create_spiel_optimizer` / `SpielModel.create_optimizer`, and hands it accelerate's fp16
      ``GradScaler`` if there is one. ``nn.DataParallel`` is refused. When resuming, it loads the
      adapter (indices and values, in place) and the selector state from the checkpoint, so
      the schedule continues where it stopped: no restart at step 0, no second full
      reselection.
    * ``on_optimizer_step``: steps the selector once per optimizer step (after
      ``optimizer.step()``; gradient-accumulation micro-batches do not step it).
    * ``on_log``: adds ``spiel/indices_changed`` (summed since the last log),
      ``spiel/reselection_rate`` and ``spiel/update_seconds`` of the updates since the last
      log to the Trainer's log history and to the callbacks that run after this one (the
      progress bar; report_to integrations registered before it miss them — `SpielTrainer`
      logs them through ``Trainer.log`` instead, so every integration sees them).
    * ``on_save``: writes the selector state and, unless the Trainer already did, the adapter
      into ``output_dir/checkpoint-{step}``; ``on_push_begin`` writes them there before the
      Trainer pushes that checkpoint to the Hub (which it does before ``on_save``).

    Args:
        model: The `SpielModel`; required when the Trainer holds another object (e.g.
            ``spiel.base_model`` for trl's ``SFTTrainer``), else taken from the Trainer.
        resume_from_checkpoint: The checkpoint folder to restore from. When unset and
            training resumes at step N, ``args.output_dir/checkpoint-N`` is used (what
            ``train(resume_from_checkpoint=True)`` picks); `SpielTrainer` sets it itself.
    """

    def __init__(
        self, model: SpielModel | None = None, resume_from_checkpoint: str | None = None
    ) -> None:
        if model is not None and _find_spiel_model(model) is None:
            raise TypeError(f"SpielCallback needs a SpielModel, got {type(model).__name__}")
        self.model: SpielModel | None = _find_spiel_model(model)
        self.resume_from_checkpoint = resume_from_checkpoint
        self.selector: SpielSelector | None = None
        self.run_dir: str | None = None  # set by SpielTrainerMixin (hyperparameter search)
        self.adapter_loaded = False  # set by SpielTrainerMixin once it loaded the checkpoint
        self._pending: dict[str, float] = {}
        self._saved: tuple[str, int] | None = None  # (folder, step) last written

    # -- helpers ---------------------------------------------------------------------------------
    def _resolve_model(self, trainer_model: Any) -> SpielModel:
        spiel_in_trainer = _find_spiel_model(trainer_model)
        if spiel_in_trainer is not None and "forward" in vars(spiel_in_trainer):
            raise TypeError(
                "The Trainer replaced SpielModel.forward (trl's SFTTrainer patches in a fused LM "
                "head that needs the transformer backbone as `model.base_model`). Pass the inner "
                "model instead: SFTTrainer(model=spiel.base_model, ..., "
                "callbacks=[SpielCallback(spiel)])."
            )
        model = self.model if self.model is not None else spiel_in_trainer
        if model is None:
            raise TypeError(
                f"SpielCallback: the Trainer's model is a {type(trainer_model).__name__}, not a "
                "SpielModel; pass the SpielModel explicitly: SpielCallback(spiel_model)."
            )
        self.model = model
        return model

    def pop_logs(self) -> dict[str, float]:
        """The statistics of the updates since the last call (empty if none)."""
        pending, self._pending = self._pending, {}
        return pending

    def _record(self, stats: dict[str, float]) -> None:
        for key in ("spiel/indices_changed", "spiel/update_seconds"):
            self._pending[key] = self._pending.get(key, 0.0) + float(stats.get(key, 0.0))
        self._pending["spiel/reselection_rate"] = float(stats["spiel/reselection_rate"])
        self._pending["spiel/num_updates"] = float(self.selector.num_updates)

    def _checkpoint_dir(self, args: TrainingArguments, global_step: int) -> str:
        return os.path.join(
            self.run_dir or args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}"
        )

    # -- events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_data_parallel(args)
        self._saved = None  # a new selector: nothing of it is written yet
        spiel = self._resolve_model(model)
        raw = unwrap_optimizer(optimizer)
        if raw is None or not hasattr(raw, "reindex"):
            raise TypeError(
                f"SpIEL needs its own optimizer (it remaps per-slot state when indices change); "
                f"the Trainer has {type(raw).__name__}. Pass optimizers=(create_spiel_optimizer("
                "spiel_model, args), None) or use SpielTrainer."
            )
        if self.selector is not None:
            self.selector.close()
        self._pending = {}
        # The raw optimizer: the Trainer calls on_optimizer_step only on real steps. Its
        # GradScaler (fp16) lives on accelerate's wrapper: AG's gradient sums are scaled by it.
        self.selector = spiel.create_selector(raw, total_steps=state.max_steps)
        self.selector.grad_scaler = getattr(optimizer, "scaler", None)
        if state.global_step > 0:
            self._restore(args, state, spiel, raw)
        self.resume_from_checkpoint = None
        self.adapter_loaded = False
        return control

    def _restore(self, args, state, spiel: SpielModel, optimizer) -> None:
        checkpoint = self.resume_from_checkpoint or self._checkpoint_dir(args, state.global_step)
        rank, world = _rank_and_world(args)
        if not self.adapter_loaded and os.path.isfile(
            os.path.join(checkpoint, ADAPTER_WEIGHTS_NAME)
        ):
            load_adapter_in_place(spiel, checkpoint, self.selector.adapter_name)
        if os.path.isfile(os.path.join(checkpoint, SELECTOR_STATE_NAME)):
            load_selector_state(
                self.selector, checkpoint, rank=rank, world_size=world, total_steps=state.max_steps
            )
            if self.selector.step_count != state.global_step:
                logger.warning(
                    "Selector state in %s is at step %d but training resumes at step %d.",
                    checkpoint,
                    self.selector.step_count,
                    state.global_step,
                )
            return
        # No saved selector: rebuild the schedule position from the step count alone.
        step = state.global_step
        updates = self.selector.updates_through(step)
        logger.warning(
            "Resuming at step %d without %s in %s: the SpIEL schedule continues from the step "
            "count (%d updates done); statistics of an open window are lost.",
            step,
            SELECTOR_STATE_NAME,
            checkpoint,
            updates,
        )
        self.selector.load_state_dict(
            {"step_count": step, "num_updates": updates, "total_steps": self.selector.total_steps}
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.selector is not None:
            stats = self.selector.step()
            if stats:
                self._record(stats)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None and not any(k.startswith("eval_") for k in logs):
            extra = self.pop_logs()
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)
        return control

    def on_push_begin(self, args, state, control, **kwargs):
        # The Trainer pushes a checkpoint (hub_strategy="checkpoint"/"all_checkpoints") from
        # inside _save_checkpoint, before on_save: write our part first, so the pushed
        # checkpoint can resume too. Only the main process pushes: under DDP the other ranks'
        # selector files come in on_save, after the push, so a DDP checkpoint pushed inside a
        # statistics window lacks them (`load_selector_state` then says what is missing).
        directory = self._checkpoint_dir(args, state.global_step)
        if os.path.isdir(directory):
            self._save_to(args, directory)
            # transformers copies the adapter to the pushed top level only when peft is installed.
            for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
                if os.path.isfile(os.path.join(directory, name)):
                    shutil.copy(os.path.join(directory, name), os.path.join(args.output_dir, name))
        return control

    def on_save(self, args, state, control, **kwargs):
        self._save_to(args, self._checkpoint_dir(args, state.global_step))
        return control

    def _save_to(self, args: TrainingArguments, directory: str) -> None:
        """Write the selector state and, unless the Trainer already did, the adapter."""
        if self.selector is None or self._saved == (directory, self.selector.step_count):
            return
        rank, world = _rank_and_world(args)
        main = _is_main_process(args)
        if world > 1 or main:
            save_selector_state(
                self.selector, directory, rank=rank, world_size=world, write_json=main
            )
        if (
            main
            and self.model is not None
            and not os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
        ):
            self.model.save_pretrained(directory, adapter_name=self.selector.adapter_name)
        self._saved = (directory, self.selector.step_count)

    def on_train_end(self, args, state, control, **kwargs):
        if self.selector is not None:
            self.selector.close()  # no more dense-gradient captures outside training
        return control


if not hasattr(TrainerCallback, "on_optimizer_step"):  # pragma: no cover - transformers < 4.42

    def _on_step_end(self, args, state, control, **kwargs):
        return SpielCallback.on_optimizer_step(self, args, state, control, **kwargs)

    SpielCallback.on_step_end = _on_step_end


# -- the trainer -----------------------------------------------------------------------------------
class SpielTrainerMixin:
    """Makes a `transformers.Trainer` subclass train a `SpielModel` with SpIEL.

    Use as ``class MyTrainer(SpielTrainerMixin, SomeTrainer)``. On top of a `SpielCallback`
    (added unless one is passed in ``callbacks``), it:

    * creates the optimizer with `create_spiel_optimizer` (``sm3_momentum`` for ``"ma"``);
    * saves checkpoints and ``save_model()`` output as the adapter only
      (``adapter_model.safetensors`` + ``adapter_config.json``, plus the tokenizer and
      ``training_args.bin`` as usual), never the base model's weights;
    * resumes by loading the checkpoint's indices and values into the existing deltas;
    * logs the selection statistics through ``Trainer.log``;
    * takes label names and dataset columns from the wrapped transformers model;
    * with ``keep_deltas_applied=True``, trains inside `SpielModel.applied_deltas` (faster
      steps at high density, 8 more bytes per delta).

    DeepSpeed, FSDP and ``nn.DataParallel`` are refused when training starts; use DDP.
    """

    def __init__(
        self,
        *args: Any,
        sm3_momentum: float | None = None,
        keep_deltas_applied: bool = False,
        **kwargs: Any,
    ) -> None:
        self.sm3_momentum = sm3_momentum
        self.keep_deltas_applied = keep_deltas_applied
        super().__init__(*args, **kwargs)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SpielCallback)]
        if callbacks:
            self.spiel_callback: SpielCallback = callbacks[0]
        else:
            self.spiel_callback = SpielCallback()
            self.add_callback(self.spiel_callback)
        spiel = self.spiel_callback.model
        if spiel is None:
            spiel = _find_spiel_model(self.model)
        if spiel is None:
            raise TypeError(
                f"{type(self).__name__} trains a SpielModel; got {type(self.model).__name__}. "
                "Pass the SpielModel as model, or callbacks=[SpielCallback(spiel_model)]."
            )
        self.spiel_callback.model = spiel
        self.spiel_model = spiel
        if _find_spiel_model(self.model) is not None:
            # SpielModel.forward(*args, **kwargs) hides the signature Trainer inspects.
            inner = type(spiel.base_model)
            if self.args.label_names is None:
                self.label_names = find_labels(inner)
            if can_return_loss is not None:
                self.can_return_loss = can_return_loss(inner)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``keep_deltas_applied``, inside `SpielModel.applied_deltas`.

        That gives the same results without patching and restoring every targeted weight in
        every forward and backward, for 8 more bytes per delta held while training; the base
        weights are restored when training ends, also on an error.
        """
        applied = self.spiel_model.applied_deltas() if self.keep_deltas_applied else nullcontext()
        with applied:
            return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and _find_spiel_model(self.model) is not None:
            columns = list(inspect.signature(self.spiel_model.base_model.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = create_spiel_optimizer(
                self.spiel_model, self.args, sm3_momentum=self.sm3_momentum
            )
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if not any(k.startswith("eval_") for k in logs):
            logs.update(self.spiel_callback.pop_logs())
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self.spiel_callback.run_dir = self._get_output_dir(trial=trial)
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the trained adapter (not the base model) at the top of ``output_dir``, whatever
        its name (checkpoints resume from there), the tokenizer and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving SpIEL adapter to %s", output_dir)
        self.spiel_model.save_pretrained(output_dir, adapter_name=self.spiel_model.active_adapter)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load the checkpoint's adapter into the model in place (indices and values)."""
        self.spiel_callback.resume_from_checkpoint = resume_from_checkpoint
        if os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS_NAME)):
            load_adapter_in_place(self.spiel_model, resume_from_checkpoint)
            self.spiel_callback.adapter_loaded = True
        else:  # e.g. a checkpoint written by a plain Trainer: full state dict
            self.spiel_model.restore_base_weights()  # it loads into W itself
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and os.path.isfile(os.path.join(best, ADAPTER_WEIGHTS_NAME)):
            logger.info("Loading best adapter from %s (score: %s).", best, self.state.best_metric)
            load_adapter_in_place(self.spiel_model, best)
        else:
            self.spiel_model.restore_base_weights()
            super()._load_best_model()


class SpielTrainer(SpielTrainerMixin, Trainer):
    """`transformers.Trainer` for a `SpielModel`: SpIEL optimizer, schedule, adapter checkpoints.

    Use like ``Trainer`` (``SpielTrainer(model=spiel_model, args=..., train_dataset=...)``);
    the extra keywords ``sm3_momentum`` (SM3's momentum for ``regrowth="ma"``) and
    ``keep_deltas_applied`` (see `SpielModel.applied_deltas`) are SpIEL's own. See
    `SpielTrainerMixin` and `SpielCallback` for what it adds, and the module docstring for
    the checkpoint layout. ``trainer.selector`` is the running `SpielSelector` once
    ``train()`` has started.
    """

    @property
    def selector(self) -> SpielSelector | None:
        return self.spiel_callback.selector
