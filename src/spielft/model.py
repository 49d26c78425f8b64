"""`SpielModel`: a base model with sparse-delta adapters, and `get_spiel_model`."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import SpielConfig
from .files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, atomic_write
from .hub import model_card, push_saved, resolve_adapter_dir
from .layer import (
    SUPPORTED_LAYERS,
    SparseDelta,
    SpielEmbedding,
    SpielLayer,
    SpielQuantLinear,
    is_whole_lines,
    line_length,
    line_positions,
    random_indices,
    split_budget,
    wrap_module,
)
from .modules_to_save import ModulesToSaveWrapper, check_can_save, shared_with
from .ops import applied_deltas, restore_weight, write_applied
from .optim import SM3, SparseAdamW, SparseAdamW8bit
from .selection import SpielSelector

ADAPTER_TYPE = "spielft"
# Version 2 added modules trained in full (``modules_to_save``) and the config fields that go
# with them; version 1 files still load.
FORMAT_VERSION = 2
# Config fields of a classification/QA model that its saved head depends on: recorded in the
# adapter, so that the Auto classes rebuild the same model.
_TASK_CONFIG_FIELDS = ("num_labels", "id2label", "label2id", "problem_type", "pad_token_id")
_SAVED_PREFIX = "modules_to_save/"  # tensor keys: modules_to_save/<module>/<state key>
# The heads of the classification/QA models transformers builds fresh: warn if they stay frozen.
_TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")
_TASK_MODEL_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    """As peft matches module names: a string is a regex for the full name, a list holds
    names or name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _matches(name: str, config: SpielConfig) -> bool:
    if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
        return False
    if config.targets_all_linear:
        return True
    return _name_matches(name, config.target_modules)  # type: ignore[arg-type]


def _own_weight(module: nn.Module) -> Tensor | None:
    return dict(module.named_parameters(recurse=False)).get("weight")


def _weight_owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(weight parameter) -> the modules that hold it as their own ``weight``."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = _own_weight(module)
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
    return owners


def tied_weight_users(
    model: nn.Module, module: nn.Module, owners: dict[int, list[nn.Module]] | None = None
) -> list[str]:
    """Names of the other modules of ``model`` whose own ``weight`` is ``module``'s weight."""
    if isinstance(module, SpielLayer):
        module = module.base_layer
    weight = _own_weight(module)
    if weight is None:
        return []
    owners = _weight_owners(model) if owners is None else owners
    others = [m for m in owners.get(id(weight), []) if m is not module]
    if not others:
        return []
    return [
        name.removesuffix(".base_layer")
        for name, m in model.named_modules()
        if any(m is o for o in others)
    ]


def _refuse_tied(name: str, users: list[str]) -> None:
    raise ValueError(
        f"module {name!r} shares its weight with {users} (tied weights, e.g. an input "
        "embedding tied to the output head). Sparse deltas are added to the weight only inside "
        f"{name!r}'s own forward, so the tied module(s) would ignore them until a merge, and a "
        "merge would change both: spielft refuses this. Untie first (e.g. "
        "model.config.tie_word_embeddings = False and "
        "model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())), or do "
        "not target it."
    )


def _offloads(hook: Any) -> bool:
    """Whether an accelerate hook (or one of a ``SequentialHook``'s) offloads weights."""
    return bool(getattr(hook, "offload", False)) or any(
        _offloads(h) for h in getattr(hook, "hooks", ())
    )


def _refuse_offloaded(model: nn.Module, name: str, module: nn.Module) -> None:
    """Refuse a module whose weight accelerate offloads (CPU/disk, put back only per forward).

    Its weight is a ``meta`` placeholder outside the forward, and the deltas' op patches and
    reads the weight itself, so the outputs would be silently wrong.
    """
    weight = getattr(module, "weight", None)
    on_meta = isinstance(weight, Tensor) and weight.is_meta
    path = name.split(".")
    owners = [model] + [model.get_submodule(".".join(path[:i])) for i in range(1, len(path) + 1)]
    if on_meta or any(_offloads(getattr(m, "_hf_hook", None)) for m in owners):
        raise ValueError(
            f"module {name!r} has its weight offloaded by accelerate "
            f"({'on the meta device' if on_meta else 'an offloading hook'}): spielft needs "
            "the weights in memory to add sparse deltas or copy a module trained in full. Load "
            "the model without offloading, "
            "e.g. from_pretrained(..., device_map={'': 0}) or device_map='cpu' to put it all "
            "on one device."
        )


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the first caller outside spielft."""
    package = str(Path(__file__).parent) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _is_internal(name: str) -> bool:
    """A module inside one of our wrappers (a base layer, a delta, a saved module's copies)."""
    return any(
        part in name for part in (".base_layer", ".spiel_deltas", ".original_module", ".modules_to_save")
    )


def _under(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def find_target_modules(
    model: nn.Module, config: SpielConfig, saved: list[str] | None = None
) -> dict[str, nn.Module]:
    """The modules ``config`` targets, by full name; a clear error if none or unsupported.

    By default (``target_modules=None``) every supported linear layer (``nn.Linear``,
    bitsandbytes ``Linear4bit``/``Linear8bitLt``, transformers ``Conv1D``) except the output
    head and the modules in ``saved`` (trained in full); embeddings only when named. Modules
    with tied weights are skipped by default and refused when named, as is a saved module.
    """
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners = _weight_owners(model)
    saved = saved or []
    skipped: list[str] = []
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, SpielLayer):
            module = module.base_layer
        if _is_internal(name) or not name or isinstance(module, ModulesToSaveWrapper):
            continue
        if not _matches(name, config):
            continue
        if _under(name, saved):  # trained in full, as peft does for its modules_to_save
            if not config.targets_all_linear and wrap_module(module) is not None:
                skipped.append(name)
            continue
        if config.targets_all_linear:  # every supported linear but the head
            layer = wrap_module(module)
            if (
                module is output_head
                or layer is None
                or isinstance(layer, SpielEmbedding)
                or tied_weight_users(model, module, owners)
            ):
                continue
        elif wrap_module(module) is None:
            if len(list(module.children())) > 0:  # a container whose name matched: skip
                continue
            raise ValueError(
                f"SpielConfig.target_modules matched {name!r}, a {type(module).__name__}, "
                f"which spielft does not support; supported: {SUPPORTED_LAYERS}. Narrow "
                "target_modules."
            )
        else:
            users = tied_weight_users(model, module, owners)
            if users:
                _refuse_tied(name, users)
        found[name] = module
    if skipped:
        warnings.warn(
            f"SpielConfig.target_modules matched {skipped}, inside modules trained in full "
            f"({saved}, by modules_to_save or task_type): they train in full, without "
            "sparse deltas.",
            stacklevel=_user_stacklevel(),
        )
    if not found:
        raise ValueError(
            f"SpielConfig.target_modules={config.target_modules!r} matched no supported module "
            f"of {type(model).__name__} (excluding {config.exclude_modules}"
            + (f" and the {len(skipped)} inside modules trained in full" if skipped else "")
            + "). Module names "
            f"look like {[n for n, _ in model.named_modules()][1:4]}."
        )
    return found


def find_modules_to_save(model: nn.Module, config: SpielConfig) -> list[str]:
    """The full names of the modules ``config`` trains in full (outermost matches), checked.

    Names match as `target_modules` lists do: a whole name or a dotted suffix (``"norm"`` is
    ``model.norm``, not ``input_layernorm``; peft's string-suffix match would take both).
    """
    names = [n for n, _ in model.named_modules() if n and not _is_internal(n)]
    explicit = config.modules_to_save or []
    unmatched = [p for p in explicit if not any(_name_matches(n, [p]) for n in names)]
    if unmatched:
        raise ValueError(
            f"SpielConfig.modules_to_save names {unmatched}, which match no module of "
            f"{type(model).__name__} (names look like {names[:3]}); pass module "
            "names or name suffixes."
        )
    heads = list(config.task_heads)
    found: list[str] = []
    for name in names:
        if not _under(name, found) and _name_matches(name, explicit + heads):
            found.append(name)
    if heads and not any(_name_matches(n, heads) for n in found):
        raise ValueError(
            f"SpielConfig.task_type={config.task_type!r} trains the model's head in full, "
            f"but {type(model).__name__} has no module named any of {list(heads)}; "
            "name the head in modules_to_save."
        )
    for name in found:
        _check_module_to_save(model, name)
    return found


def _check_module_to_save(model: nn.Module, name: str, *, allow_tied: bool = False) -> None:
    """Refuse a module that cannot be copied and trained in full (a wrapper already was checked)."""
    module = model.get_submodule(name)
    if not isinstance(module, ModulesToSaveWrapper):
        check_can_save(model, name, module, allow_tied=allow_tied)
        _refuse_offloaded(model, name, module)


@functools.cache
def _cpu_bf16_gemm_speedup() -> float:
    """How many times faster this CPU runs a bfloat16 GEMM than a float32 one, measured.

    CPU flags do not tell: with AVX512-BF16 the same weight-gradient GEMM ran in half the time
    on an AMD EPYC and in twice the time on an Intel Xeon (bench/results). About 50 ms, once.
    """
    gen = torch.Generator().manual_seed(0)  # not the global RNG: user code must not notice
    g, x = torch.randn(1024, 768, generator=gen), torch.randn(1024, 768, generator=gen)

    def best(a: Tensor, b: Tensor) -> float:
        a.T @ b  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a.T @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(g, x) / best(g.bfloat16(), x.bfloat16())


class SpielModel(nn.Module):
    """A base model whose targeted layers carry sparse deltas (one set per adapter).

    The forward pass goes straight to the base model; attributes the wrapper lacks are looked
    up on the base model (``generate``, ``config``, ...). All base weights are frozen; only the
    active adapter's deltas are trainable.
    """

    # transformers' Trainer refuses to train a quantized model unless trainable adapters are
    # attached, which it reads from this flag: a SpielModel always has them.
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        config: SpielConfig,
        adapter_name: str = "default",
        state: dict[str, tuple[Tensor, Tensor]] | None = None,
        saved_modules: dict[str, dict[str, Tensor]] | None = None,
    ) -> None:
        """``state`` (module -> (indices, values)) and ``saved_modules`` (module -> state dict)
        restore a saved adapter instead of random indices and fresh copies."""
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, SpielConfig] = {}
        self.active_adapters: list[str] = []
        self.inference_adapters: set[str] = set()  # loaded with is_trainable=False: never trained
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config, state=state, saved_modules=saved_modules)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``base_model.generate``, inside `applied_deltas`: one forward per new token, each of
        which would otherwise patch and restore every targeted weight."""
        with self.applied_deltas():
            return self.base_model.generate(*args, **kwargs)

    # -- layers and adapters -------------------------------------------------------------------
    def spiel_layers(self) -> dict[str, SpielLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpielLayer)}

    def modules_to_save_wrappers(self) -> dict[str, ModulesToSaveWrapper]:
        """Module name -> the wrapper of a module trained in full (`SpielConfig.modules_to_save`)."""
        return {
            n: m for n, m in self.base_model.named_modules() if isinstance(m, ModulesToSaveWrapper)
        }

    def _warn_frozen_head(self, saved: list[str]) -> None:
        """A classification/QA head that transformers initialised randomly must train."""
        kind = type(self.base_model).__name__
        if not kind.endswith(_TASK_MODEL_SUFFIXES):
            return
        heads = [
            n for n, _ in self.base_model.named_modules()
            if n.split(".")[-1] in _TASK_HEAD_NAMES and not _is_internal(n)
        ]
        frozen = [h for h in heads if not _under(h, saved)]
        if frozen:
            warnings.warn(
                f"{kind}'s head {frozen} stays frozen (only its sparse deltas, if targeted, "
                "train), and transformers initialises it randomly for a new task: pass "
                "task_type='SEQ_CLS' (or 'TOKEN_CLS', 'QUESTION_ANS') or "
                f"modules_to_save={frozen} to train it in full, as with peft.",
                stacklevel=_user_stacklevel(),
            )

    def _wrap_to_save(self, name: str) -> ModulesToSaveWrapper:
        module = self.base_model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            return module
        wrapper = ModulesToSaveWrapper(module)
        self._set_module(name, wrapper)
        return wrapper

    def sparse_deltas(self, adapter_name: str | None = None) -> dict[str, SparseDelta]:
        """Module name -> that module's delta for ``adapter_name`` (default: the active one)."""
        adapter_name = adapter_name or self.active_adapter
        return {
            name: layer.spiel_deltas[adapter_name]
            for name, layer in self.spiel_layers().items()
            if adapter_name in layer.spiel_deltas
        }

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def _wrap(self, name: str, owners: dict[int, list[nn.Module]] | None = None) -> SpielLayer:
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        module = getattr(parent, child)
        if isinstance(module, SpielLayer):
            return module
        _refuse_offloaded(self.base_model, name, module)
        layer = wrap_module(module)
        if layer is None:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is not supported; supported: "
                f"{SUPPORTED_LAYERS}"
            )
        users = tied_weight_users(self.base_model, module, owners)
        if users:
            _refuse_tied(name, users)
        setattr(parent, child, layer)
        return layer

    def add_adapter(
        self,
        adapter_name: str,
        config: SpielConfig,
        state: dict[str, tuple[Tensor, Tensor]] | None = None,
        saved_modules: dict[str, dict[str, Tensor]] | None = None,
    ) -> None:
        """Add an adapter: random initial indices and fresh copies of the modules to save, or
        ``state`` (module -> (indices, values)) and ``saved_modules`` (module -> state dict)."""
        if (
            not isinstance(adapter_name, str)
            or not adapter_name.strip()
            or any(c in adapter_name for c in "./\\")
        ):
            raise ValueError(
                f"adapter name {adapter_name!r} is not a plain name: it must be a non-empty string "
                "without '.', '/' or '\\' (it keys the layers' submodules and, when saved, names "
                "a subfolder)"
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
        if any(adapter_name in layer.spiel_deltas for layer in self.spiel_layers().values()):
            raise ValueError(
                f"the base model already carries a spielft adapter {adapter_name!r} (another "
                "SpielModel wrapped it): add this one under another name through that "
                "SpielModel (add_adapter / load_adapter), or start from a fresh base model."
            )
        config.validate()
        # Everything is checked before the first module is wrapped.
        if state is None:
            saved = find_modules_to_save(self.base_model, config)
            self._warn_frozen_head(saved)
        else:
            saved = list(saved_modules or {})
            clash = [n for n in state if _under(n, saved)]
            if clash:
                raise ValueError(
                    f"the adapter both trains {clash[0]!r} in full (modules_to_save) and gives "
                    "it sparse deltas: a module is one or the other."
                )
            for name in saved:
                # A head or embedding trained untied reproduces its forward on a tied base.
                tied_ok = _is_embedding(self.base_model, self.base_model.get_submodule(name))
                _check_module_to_save(self.base_model, name, allow_tied=tied_ok)
        if state is None:
            targets = find_target_modules(self.base_model, config, saved)
            owners = _weight_owners(self.base_model)
            layers = {name: self._wrap(name, owners) for name in targets}
            sizes = [layer.weight_shape[0] * layer.weight_shape[1] for layer in layers.values()]
            total = sum(sizes)
            budget = config.num_tunable_weights or round(float(config.density) * total)
            if budget == 0:
                raise ValueError(
                    f"SpielConfig.density={config.density} of the {total} parameters of the "
                    f"{len(layers)} targeted matrices rounds to 0 trainable deltas; raise the "
                    "density, set num_tunable_weights, or target more modules."
                )
            if budget > total:
                raise ValueError(
                    f"SpielConfig.num_tunable_weights={budget} exceeds the {total} parameters of "
                    f"the {len(layers)} targeted matrices; lower it or target more modules."
                )
            generator = torch.Generator().manual_seed(config.seed)
            created = 0
            for layer, k in zip(layers.values(), split_budget(budget, sizes), strict=True):
                shape = layer.weight_shape
                axis = layer.stored_line_axis(config.structure)
                if axis is None:
                    indices = random_indices(shape[0] * shape[1], k, generator)
                else:  # the matrix's share rounded to whole lines, at least one
                    n = min(max(1, round(k / line_length(shape, axis))), shape[axis])
                    lines = torch.randperm(shape[axis], generator=generator)[:n].sort().values
                    indices = line_positions(lines, shape, axis)
                created += indices.numel()
                device = layer.base_layer.weight.device
                delta = SparseDelta(
                    shape, indices, config.torch_delta_dtype, device,
                    grad_dtype=config.torch_weight_grad_dtype, line_axis=axis,
                )
                layer.add_delta(adapter_name, delta)
            if abs(created - budget) > 0.1 * budget:
                warnings.warn(
                    f"structure={config.structure!r} rounds each matrix's share of the {budget} "
                    f"trainable parameters to whole lines (at least one): adapter "
                    f"{adapter_name!r} has {created}. Adjust density/num_tunable_weights, or "
                    "exclude the matrices whose lines are long (embeddings).",
                    stacklevel=3,
                )
        else:
            owners = _weight_owners(self.base_model)
            for name, (indices, values) in state.items():
                layer = self._wrap(name, owners)
                device = layer.base_layer.weight.device
                delta = SparseDelta(
                    layer.weight_shape, indices, config.torch_delta_dtype, device,
                    grad_dtype=config.torch_weight_grad_dtype,
                    line_axis=layer.stored_line_axis(config.structure),
                )
                with torch.no_grad():
                    delta.values.copy_(values)
                layer.add_delta(adapter_name, delta)
        for name in saved:
            self._wrap_to_save(name).add_copy(adapter_name, (saved_modules or {}).get(name))
        self.peft_config[adapter_name] = config
        self._mark_trainable()
        if config.weight_grad_dtype == "bfloat16" and any(
            p.device.type == "cpu" for p in self.base_model.parameters()
        ):
            speedup = _cpu_bf16_gemm_speedup()
            if speedup < 1.1:
                warnings.warn(
                    f"SpielConfig.weight_grad_dtype='bfloat16' on a CPU whose bfloat16 GEMMs are "
                    f"not faster than float32 ones (measured: {speedup:.2f}x as fast): it would "
                    "only round the gradient; use weight_grad_dtype='float32' here.",
                    stacklevel=2,
                )

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate one adapter, or several whose deltas add up; the first one is trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ValueError(f"unknown adapter(s) {missing}; available: {list(self.peft_config)}")
        self._refuse_two_copies(names, "only one copy can run: activate at most one of them")
        wrappers = self.modules_to_save_wrappers()
        self._unmerge_before("set_adapter")
        self.active_adapters = names
        for layer in self.spiel_layers().values():
            layer.set_adapter(names)
        for wrapper in wrappers.values():
            wrapper.set_adapter(names)
        self._mark_trainable()

    def _refuse_two_copies(self, adapter_names: list[str], remedy: str) -> None:
        """Raise if two of ``adapter_names`` have their own copy of one module to save."""
        for name, wrapper in self.modules_to_save_wrappers().items():
            owners = [n for n in adapter_names if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"adapters {owners} each train their own copy of {name!r} "
                    f"(modules_to_save); {remedy}."
                )

    def _unmerge_before(self, action: str) -> None:
        """Unmerge first (as peft does): merged deltas live in W, where no switch can reach."""
        if any(layer.merged_adapters for layer in self.spiel_layers().values()):
            warnings.warn(f"{action} on a merged model: unmerging the adapters first.", stacklevel=3)
            self.unmerge()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"unknown adapter {adapter_name!r}; available: {list(self.peft_config)}"
            )
        for layer in self.spiel_layers().values():
            layer.delete_delta(adapter_name)
        for name, wrapper in self.modules_to_save_wrappers().items():
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_copy(adapter_name)
            if not wrapper.modules_to_save:  # no adapter trains it any more
                self._set_module(name, wrapper.original_module)
        del self.peft_config[adapter_name]
        self.inference_adapters.discard(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def _mark_trainable(self) -> None:
        """The first active adapter trains, unless it was loaded for inference only."""
        trainable = self.active_adapters[0] if self.active_adapters else None
        if trainable in self.inference_adapters:
            trainable = None
        for layer in self.spiel_layers().values():
            for name, delta in layer.spiel_deltas.items():
                delta.values.requires_grad_(name == trainable)
        for wrapper in self.modules_to_save_wrappers().values():
            wrapper.mark_trainable(trainable)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (merged adapters are unmerged)."""
        self._unmerge_before("disable_adapter")
        layers: list[SpielLayer | ModulesToSaveWrapper] = [
            *self.spiel_layers().values(), *self.modules_to_save_wrappers().values()
        ]
        previous = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, value in zip(layers, previous, strict=True):
                layer.disable_adapters = value

    @contextmanager
    def applied_deltas(self) -> Iterator[None]:
        """Keep the live deltas written into the base weights inside the block: faster steps.

        Outside it, every forward and every backward of a targeted layer writes its deltas into
        W at their positions, computes, and writes W's own values back: at LoRA-like densities
        that touches every cache line of W six times a step. Inside it, a forward writes the
        deltas' values only if they changed since W last received them (once per optimizer
        step; never while evaluating or generating), its backward writes nothing, and every
        weight is restored bit for bit on exit (also on an exception). Outputs and gradients
        are the same. A change is seen through the values' version counter and any
        ``torch.optim`` step: outside an optimizer, change them in place or with ``copy_``,
        not through ``.data``, which bypasses the counter.

        The price is memory held for the whole block: W's own values at the deltas' positions
        and a copy of the positions, 8 bytes per float32 delta (int32 indices; 4 for whole
        lines, `SpielConfig.structure`, which keep only their line numbers), which is why it
        is opt-in for training (``SpielTrainer(..., keep_deltas_applied=True)``, or wrap a
        hand-written loop). `generate` always runs inside one. Inside, the targeted base
        weights (and ``state_dict()``) read as ``W + delta``: do not read, save or modify them
        there. Merging, unloading, a forward under ``disable_adapter`` and
        `restore_base_weights` put W back first. Quantized layers dequantize a fresh copy per
        use and are not affected.
        """
        layers = [(layer, layer.weight_source()) for layer in self.spiel_layers().values()]
        layers = [(layer, w) for layer, w in layers if isinstance(w, Tensor)]
        with applied_deltas([w for _, w in layers]):
            # Written now, before any activation exists: the buffers that keep W's own values
            # are allocated once, not among a forward's temporaries (which fragments the heap).
            with torch.no_grad():
                for layer, weight in layers:
                    combined = layer.combined_delta()
                    if combined is not None:
                        write_applied(
                            weight, combined.indices, combined.values, combined.line_axis
                        )
            yield

    def restore_base_weights(self) -> None:
        """Write W's own values back where an `applied_deltas` block left deltas in it.

        The block stays open (the next forward writes the deltas again): for code inside it
        that must read or load the base weights themselves.
        """
        for layer in self.spiel_layers().values():
            restore_weight(layer.weight_source())

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str
    ) -> None:
        """A new adapter: union of the indices, weighted sum of the values (task arithmetic).

        Exact for sparse deltas: its delta equals sum_i weight_i * delta_i, position by position.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("add_weighted_adapter needs one weight per adapter (and at least one)")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; available: {list(self.peft_config)}")
        with_copies = sorted(
            {a for w in self.modules_to_save_wrappers().values() for a in w.modules_to_save}
            & set(adapters)
        )
        if with_copies:
            raise ValueError(
                f"adapters {with_copies} train modules in full (modules_to_save), which have no "
                "weighted sum that means anything: add_weighted_adapter combines sparse deltas "
                "only. Combine adapters without modules_to_save."
            )
        state: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in self.spiel_layers().items():
            parts = [
                (layer.spiel_deltas[a], w)
                for a, w in zip(adapters, weights, strict=True)
                if a in layer.spiel_deltas
            ]
            if not parts:
                continue
            all_idx = torch.cat([d.indices.long() for d, _ in parts])
            indices, inverse = torch.unique(all_idx, sorted=True, return_inverse=True)
            weighted = torch.cat([d.values.detach().float() * w for d, w in parts])
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=indices.device)
            state[name] = (indices, values.index_add_(0, inverse, weighted))
        base = self.peft_config[adapters[0]]
        structures = {self.peft_config[a].structure for a in adapters}
        config = SpielConfig.from_dict(
            {
                **base.to_dict(),
                "num_tunable_weights": sum(v.numel() for _, v in state.values()) or None,
                "delta_dtype": "float32",
                # A union of rows is rows; rows and columns together are just entries.
                "structure": structures.pop() if len(structures) == 1 else "unstructured",
            }
        )
        self.add_adapter(adapter_name, config, state=state)

    # -- merging ---------------------------------------------------------------------------------
    def _refuse_quantized(self, remedy: str) -> None:
        """Raise before touching any weight: a merge that stopped at the first quantized layer
        would leave the model half merged."""
        quantized = [n for n, m in self.spiel_layers().items() if isinstance(m, SpielQuantLinear)]
        if quantized:
            raise TypeError(
                f"{len(quantized)} targeted layers are quantized (e.g. {quantized[0]!r}): "
                f"merging into them would requantize and lose the deltas. {remedy}"
            )

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Write the active (or named) adapters into the base weights, reversibly."""
        self._refuse_quantized(
            "Nothing was merged; use merge_and_unload(dequantize=True) for a dequantized model "
            "with the deltas merged."
        )
        for layer in self.spiel_layers().values():
            layer.merge(adapter_names or self.active_adapters)

    def unmerge(self) -> None:
        for layer in self.spiel_layers().values():
            layer.unmerge()

    # peft's names for the same three things.
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        self.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        self.unmerge()

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def _non_finite_merged_layers(self) -> list[str]:
        """Names of the merged layers whose merged weights hold a NaN or an infinity."""
        bad = []
        for name, layer in self.spiel_layers().items():
            flat = layer._merge_target().view(-1)
            if any(not flat[idx.to(flat.device)].isfinite().all()
                   for idx, _ in layer._merge_backup.values()):
                bad.append(name)
        return bad

    def merge_and_unload(
        self,
        dequantize: bool = False,
        dtype: torch.dtype | None = None,
        *,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """The plain base model with W + delta in its weights; the wrapper is dismantled.

        As in peft, ``adapter_names`` picks the adapters to merge (default: the active ones),
        ``safe_merge`` checks the merged full-precision weights for NaN/inf first (and raises,
        leaving the model as it was) and ``progressbar`` shows one.

        A quantized (bitsandbytes) weight cannot take the deltas without being requantized,
        which would silently lose most of them, so with quantized layers this raises unless
        ``dequantize=True``. Then every bitsandbytes ``Linear4bit``/``Linear8bitLt`` of the
        model, targeted or not, becomes a plain frozen ``nn.Linear`` holding the dequantized W
        (+ the active adapters' deltas), formed in the layer's compute dtype exactly as the
        forward pass forms it, and stored in ``dtype`` (default: that compute dtype; pass the
        dtype the rest of the model runs in if it differs, since a plain ``nn.Linear`` does not
        cast its input as ``Linear4bit`` does). Nothing is ever requantized; quantize the
        result yourself if you want a quantized merged model. ``dtype`` only applies to the
        dequantized layers.
        """
        names = adapter_names or self.active_adapters
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; available: {list(self.peft_config)}")
        self._refuse_two_copies(
            names, "merge_and_unload can keep only one: pass adapter_names with at most one of them"
        )
        layers = self.spiel_layers()
        if not dequantize:
            self._refuse_quantized(
                "Use merge_and_unload(dequantize=True) to get a dequantized model with the "
                "deltas merged."
            )
        if safe_merge:  # merge reversibly, check, and only then dismantle
            for layer in layers.values():
                if not isinstance(layer, SpielQuantLinear):
                    layer.merge(names)
            bad = self._non_finite_merged_layers()
            if bad:
                self.unmerge()
                raise ValueError(
                    f"safe_merge: merging {names} gives NaN or inf weights in {len(bad)} "
                    f"layers (e.g. {bad[0]!r}); nothing was merged. The adapter's deltas are "
                    "probably broken (check training for divergence)."
                )
        if not dequantize:
            for layer in tqdm(layers.values(), desc="merging", disable=not progressbar):
                layer.merge(names)
            return self._unload(keep_merged=True, adapter_names=names)
        for name, layer in tqdm(layers.items(), desc="merging", disable=not progressbar):
            if isinstance(layer, SpielQuantLinear):
                replacement = layer.dequantized_linear(names, dtype)
            else:
                layer.merge(names)
                replacement = layer.base_layer
            self._set_module(name, replacement)
        for name, module in list(self.base_model.named_modules()):
            layer = wrap_module(module)
            if isinstance(layer, SpielQuantLinear):  # an untargeted quantized layer
                self._set_module(name, layer.dequantized_linear([], dtype))
        self._unwrap_modules_to_save(names)
        # The weights are plain floats now: forget the bitsandbytes config, or save_pretrained
        # would write one over unquantized weights (as transformers' own dequantize() does).
        quantizer = getattr(self.base_model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(self.base_model)
        return self.base_model

    def _set_module(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        setattr(parent, child, module)

    def unload(self, keep_merged: bool = False) -> nn.Module:
        """Put the original layers back (unmerging first unless ``keep_merged``).

        As in peft, a module trained in full (`SpielConfig.modules_to_save`) keeps the active
        adapter's trained copy; the original comes back where no active adapter has one.
        """
        return self._unload(keep_merged, self.active_adapters)

    def _unwrap_modules_to_save(self, adapter_names: list[str]) -> None:
        """Replace each wrapper by the copy of the adapter in ``adapter_names`` that has one
        (frozen, as the rest of the plain model), else by the original module."""
        wrappers = self.modules_to_save_wrappers()
        # Which copies replace a tied embedding or head: decided before any is replaced.
        untie = [
            name for name, wrapper in wrappers.items()
            if any(n in wrapper.modules_to_save for n in adapter_names)
            and _is_embedding(self.base_model, wrapper.original_module)
            and shared_with(self.base_model, name, wrapper.original_module)
        ]
        for name, wrapper in wrappers.items():
            owner = next((n for n in adapter_names if n in wrapper.modules_to_save), None)
            module = wrapper.original_module if owner is None else wrapper.modules_to_save[owner]
            self._set_module(name, module.requires_grad_(False))
        if untie:
            self._untie_word_embeddings(untie)

    def _untie_word_embeddings(self, names: list[str]) -> None:
        """A trained copy now stands where a tied module was: record the model as untied, or
        transformers would tie the copy back to the embedding when the model is saved and
        loaded, losing it."""
        config = getattr(self.base_model, "config", None)
        try:
            text_config = config.get_text_config(decoder=True) if config is not None else None
        except (AttributeError, TypeError, ValueError):  # no text config, or several
            text_config = None
        tied = [c for c in {id(c): c for c in (config, text_config) if c is not None}.values()
                if getattr(c, "tie_word_embeddings", False)]
        for cfg in tied:
            cfg.tie_word_embeddings = False
        if tied:
            warnings.warn(
                f"{names} were tied to another module's weights and now hold the adapter's "
                "trained copies: the model's config is set to tie_word_embeddings=False so "
                "that saving and reloading keep them.",
                stacklevel=_user_stacklevel(),
            )

    def _unload(self, keep_merged: bool, adapter_names: list[str]) -> nn.Module:
        self.restore_base_weights()
        for name, layer in self.spiel_layers().items():
            if not keep_merged:
                layer.unmerge()
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        self._unwrap_modules_to_save(adapter_names)
        return self.base_model

    # -- parameters, optimizer, selector ----------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a packed 4-bit weight counts as in peft."""
        trainable = sum(_num_params(p) for p in self.parameters() if p.requires_grad)
        total = sum(_num_params(p) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def create_optimizer(
        self,
        lr: float | None = None,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        **kwargs: Any,
    ) -> torch.optim.Optimizer:
        """SparseAdamW (``regrowth="ag"``) or SM3 (``"ma"``) over the trainable parameters.

        The deltas get ``weight_decay`` (a pull toward the pretrained weights); other trainable
        parameters, if any, get it too unless they are biases or norms (1-D).
        ``optim_bits=8`` gives `SparseAdamW8bit` (Adam moments stored blockwise in 8 bits);
        only for ``"ag"``: SM3's state is already O(rows + cols) per matrix.
        """
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        config = self.peft_config[self.active_adapter]
        if optim_bits == 8 and config.regrowth == "ma":
            raise ValueError(
                "optim_bits=8 stores SparseAdamW's moments in 8 bits (regrowth='ag'); "
                "regrowth='ma' uses SM3, whose state is already O(rows + cols) per matrix."
            )
        deltas = {d.values: d for d in self.sparse_deltas().values()}
        others = [p for p in self.parameters() if p.requires_grad and p not in deltas]
        groups = [{"params": list(deltas), "weight_decay": weight_decay}]
        decay = [p for p in others if p.ndim >= 2]
        no_decay = [p for p in others if p.ndim < 2]
        groups += [
            g
            for g in (
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]
        if config.regrowth == "ma":
            return SM3(groups, lr=1e-3 if lr is None else lr, sparse_deltas=deltas, **kwargs)
        adamw = SparseAdamW8bit if optim_bits == 8 else SparseAdamW
        return adamw(groups, lr=1e-4 if lr is None else lr, **kwargs)

    def create_selector(
        self, optimizer: torch.optim.Optimizer, total_steps: int, grad_scaler: Any | None = None
    ) -> SpielSelector:
        """The drop-and-regrow schedule for ``optimizer`` (from `create_optimizer`, or that
        optimizer wrapped by accelerate); pass a fp16 ``GradScaler`` so AG's statistics are
        unscaled (accelerate's is found on its wrapper)."""
        return SpielSelector(self, optimizer, total_steps, self.active_adapter, grad_scaler=grad_scaler)

    # -- saving and loading ------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, each atomically.

        As peft: every adapter (or those in ``selected_adapters``), ``"default"`` at the top
        of ``save_directory`` and any other in a subfolder named after it (load it with
        ``load_adapter(dir/name, name)``); nothing when not ``is_main_process``.
        ``adapter_name`` (ours) writes that one adapter at the top, whatever its name. The
        weights file also carries the whole config in its metadata and is replaced first, so
        a save interrupted at any point leaves a loadable, self-consistent adapter.
        """
        if not safe_serialization:
            raise ValueError(
                "spielft saves adapters as safetensors only (a pickle could run code when "
                "loaded); drop safe_serialization=False"
            )
        if adapter_name is not None and selected_adapters is not None:
            raise ValueError("pass adapter_name or selected_adapters to save_pretrained, not both")
        if Path(save_directory).is_file():
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        names = (
            [adapter_name]
            if adapter_name is not None
            else list(self.peft_config if selected_adapters is None else selected_adapters)
        )
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(
                f"cannot save unknown adapter(s) {unknown or names} to {save_directory}; "
                f"available: {list(self.peft_config)}"
            )
        if not is_main_process:
            return
        for name in names:
            top = adapter_name is not None or name == "default"
            self._save_adapter(Path(save_directory) if top else Path(save_directory) / name, name)

    def _save_adapter(self, directory: Path, adapter_name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        deltas = self.sparse_deltas(adapter_name)
        tensors: dict[str, Tensor] = {}
        modules: dict[str, Any] = {}
        for name, delta in deltas.items():
            tensors[f"{name}.indices"] = (
                delta.indices.detach()
                .to("cpu", torch.int32 if delta.numel_dense < 2**31 else torch.int64)
                .contiguous()
            )
            tensors[f"{name}.values"] = delta.values.detach().cpu().contiguous()
            modules[name] = {"shape": list(delta.shape), "num_deltas": delta.values.numel()}
        saved: dict[str, list[str]] = {}
        for name, wrapper in self.modules_to_save_wrappers().items():
            if adapter_name in wrapper.modules_to_save:
                state = wrapper.modules_to_save[adapter_name].state_dict()
                saved[name] = sorted(state)
                for key, tensor in state.items():
                    tensors[f"{_SAVED_PREFIX}{name}/{key}"] = tensor.detach().cpu().contiguous()
        meta: dict[str, Any] = {
            "adapter_type": ADAPTER_TYPE,
            "format_version": FORMAT_VERSION,
            "base_model_name_or_path": self._base_model_name(),
            "config": self.peft_config[adapter_name].to_dict(),
            "modules": modules,
        }
        if saved:
            meta["modules_to_save"] = saved
        task_config = self._task_model_config()
        if task_config:
            meta["task_model_config"] = task_config
        embeddings = _input_embeddings(self.base_model)
        if embeddings is not None:  # the Auto classes resize a base whose vocabulary differs
            meta["vocab_size"] = embeddings.weight.shape[0]
        text = json.dumps(meta, indent=2, sort_keys=True)
        atomic_write(
            directory / ADAPTER_WEIGHTS_NAME,
            lambda p: save_file(tensors, p, metadata={"spielft": text}),
        )
        atomic_write(directory / ADAPTER_CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))

    def _task_model_config(self) -> dict[str, Any]:
        """A classification/QA model's label settings, which its saved head depends on."""
        config = getattr(self.base_model, "config", None)
        if config is None or not type(self.base_model).__name__.endswith(_TASK_MODEL_SUFFIXES):
            return {}
        return {
            field: getattr(config, field)
            for field in _TASK_CONFIG_FIELDS
            if getattr(config, field, None) is not None
        }

    def _base_model_name(self) -> str | None:
        """The base model's Hub id, or its folder as an absolute path (found from anywhere)."""
        name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        if not name:
            return None
        return str(Path(name).resolve()) if Path(name).is_dir() else name

    def load_adapter(
        self,
        adapter_dir: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> None:
        """Load a saved adapter (a folder or a Hub repo id) under ``adapter_name``.

        Validated, never unpickled; ``subfolder``/``revision``/``token`` as in peft.
        """
        folder = resolve_adapter_dir(adapter_dir, subfolder=subfolder, revision=revision, token=token)
        saved = read_adapter(folder, self.base_model)
        self.add_adapter(
            adapter_name, saved.config, state=saved.deltas, saved_modules=saved.modules_to_save
        )
        if not is_trainable:
            self.inference_adapters.add(adapter_name)
            self._mark_trainable()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> SpielModel:
        """Wrap ``model`` with the adapter saved in ``adapter_dir`` (a folder or a Hub repo id)."""
        folder = resolve_adapter_dir(adapter_dir, subfolder=subfolder, revision=revision, token=token)
        saved = read_adapter(folder, model)
        spiel = cls(
            model, saved.config, adapter_name, state=saved.deltas,
            saved_modules=saved.modules_to_save,
        )
        if not is_trainable:
            spiel.inference_adapters.add(adapter_name)
            spiel._mark_trainable()
        return spiel

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        adapter_name: str | None = None,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Upload what `save_pretrained` writes (every adapter, or the ones chosen) and a model
        card to ``repo_id`` on the Hugging Face Hub, creating the repo (and ``revision``'s
        branch) if needed; the commit info."""
        def save(folder: Path) -> None:
            self.save_pretrained(folder, adapter_name=adapter_name, selected_adapters=selected_adapters)
            (folder / "README.md").write_text(model_card(repo_id, self._base_model_name()))

        return push_saved(
            save,
            repo_id,
            commit_message=commit_message or "Upload spielft adapter",
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def _num_params(param: Tensor) -> int:
    """Parameter count; a packed bitsandbytes 4-bit weight holds 2 per byte (as peft counts)."""
    if type(param).__name__ == "Params4bit" and getattr(param, "bnb_quantized", False):
        return param.numel() * 2 * param.element_size()
    return param.numel()


def get_spiel_model(
    model: nn.Module, config: SpielConfig, adapter_name: str = "default"
) -> SpielModel:
    """Freeze ``model`` and give its targeted layers sparse deltas (random initial indices)."""
    return SpielModel(model, config, adapter_name)


def _adapter_file(adapter_dir: str | os.PathLike) -> Path:
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        nested = sorted(
            sub.name for sub in Path(adapter_dir).glob(f"*/{ADAPTER_WEIGHTS_NAME}")
        )
        hint = (
            f" (it holds adapters in subfolders, as save_pretrained lays out adapters other "
            f"than 'default': pass {Path(adapter_dir) / nested[0]}"
            + (f", or one of {nested[1:]}" if nested[1:] else "")
            + ")"
            if nested
            else ": not a spielft adapter folder"
        )
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {adapter_dir}{hint}")
    return path


def _peft_type(config_path: Path) -> str | None:
    """The ``peft_type`` of a peft adapter's config file, if that is what it is."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    return str(config["peft_type"]) if isinstance(config, dict) and "peft_type" in config else None


def _adapter_metadata(path: Path, header: dict[str, str]) -> dict[str, Any]:
    """The weights file's spielft metadata (the authoritative copy of the config), checked."""
    if "spielft" not in header:
        peft_type = _peft_type(path.parent / ADAPTER_CONFIG_NAME)
        if peft_type is not None:
            raise ValueError(
                f"{path.parent} holds a peft {peft_type} adapter, not a spielft one: load it "
                "with peft (PeftModel.from_pretrained, or AutoPeftModelForCausalLM)"
            )
        raise ValueError(f"{path} has no spielft metadata: not an adapter saved by spielft")
    try:
        meta = json.loads(header["spielft"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the spielft metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the spielft metadata is not a JSON object")
    if meta.get("adapter_type") != ADAPTER_TYPE:
        raise ValueError(
            f"{path}: adapter type {meta.get('adapter_type')!r} is not {ADAPTER_TYPE!r}"
        )
    if meta.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise ValueError(
            f"{path}: unknown format version {meta.get('format_version')!r} (this spielft reads "
            f"versions 1 to {FORMAT_VERSION}); upgrade spielft to load it"
        )
    return meta


def _read_header(path: Path, tensors: bool) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            loaded = {key: fh.get_tensor(key) for key in fh.keys()} if tensors else {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from err
    return header, loaded


def _saved_metadata(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """A saved adapter's spielft metadata, checked, without reading its tensors."""
    path = _adapter_file(adapter_dir)
    return _adapter_metadata(path, _read_header(path, tensors=False)[0])


def _is_embedding(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module`` is ``model``'s input embedding or output head (the modules that
    ``tie_word_embeddings`` ties)."""
    candidates = [_input_embeddings(model)]
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is not None:
        output = get_output()
        candidates.append(output.original_module if isinstance(output, ModulesToSaveWrapper) else output)
    return any(c is not None and c is module for c in candidates)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        module = get() if get is not None else None
    except NotImplementedError:
        return None
    if isinstance(module, (SpielLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, SpielLayer) else module.original_module
    weight = getattr(module, "weight", None)
    return module if isinstance(weight, Tensor) and weight.ndim == 2 else None


def resize_to_adapter_vocab(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Resize ``model``'s token embeddings to the vocabulary the adapter was trained with.

    An adapter trained after ``resize_token_embeddings`` (added tokens) records its vocabulary
    size; a base loaded from its checkpoint has the old one. The new rows come from the
    adapter when it trains the embeddings (``modules_to_save``); otherwise they are freshly
    initialised, as when training began, and this warns.
    """
    meta = _saved_metadata(adapter_dir)
    vocab = meta.get("vocab_size")
    embeddings = _input_embeddings(model)
    if not isinstance(vocab, int) or embeddings is None or embeddings.weight.shape[0] == vocab:
        return
    before = embeddings.weight.shape[0]
    model.resize_token_embeddings(vocab)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    resized_modules = [m for m in (model.get_input_embeddings(), output) if m is not None]
    resized = {n for n, m in model.named_modules() if any(m is r for r in resized_modules)}
    missing = sorted(resized - set(meta.get("modules_to_save") or {}))
    if vocab < before:
        warnings.warn(
            f"{adapter_dir} was trained with a vocabulary of {vocab} tokens, fewer than the "
            f"base model's {before}: its embeddings were cut to {vocab} rows.",
            stacklevel=_user_stacklevel(),
        )
    elif missing:
        warnings.warn(
            f"{adapter_dir} was trained with a vocabulary of {vocab} tokens, the base model "
            f"has {before}: the embeddings were resized, and the new rows of {missing} are "
            "freshly initialised, not the ones the adapter was trained with (train those "
            "modules with modules_to_save to keep them).",
            stacklevel=_user_stacklevel(),
        )


def adapter_task_model_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The label settings (``num_labels``, ``id2label``, ...) a classifier's adapter records."""
    recorded = _saved_metadata(adapter_dir).get("task_model_config")
    if not isinstance(recorded, dict):
        return {}
    fields = {k: v for k, v in recorded.items() if k in _TASK_CONFIG_FIELDS}
    if isinstance(fields.get("id2label"), dict):  # JSON made its integer keys strings
        fields["id2label"] = {int(k): v for k, v in fields["id2label"].items()}
    return fields


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model a saved adapter records (``base_model_name_or_path``), if any."""
    base = _saved_metadata(adapter_dir).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


class SavedAdapter(NamedTuple):
    """A saved adapter, read and validated: its config, its deltas (module -> (sorted indices,
    values)) and the state dicts of the modules it trains in full (module -> state dict)."""

    config: SpielConfig
    deltas: dict[str, tuple[Tensor, Tensor]]
    modules_to_save: dict[str, dict[str, Tensor]]


def _read_modules_to_save(
    path: Path, meta: dict[str, Any], tensors: dict[str, Tensor], model: nn.Module
) -> dict[str, dict[str, Tensor]]:
    """The saved modules' state dicts, each checked against the module of ``model``."""
    listed = meta.get("modules_to_save", {})
    if not isinstance(listed, dict) or not all(
        isinstance(keys, list) and all(isinstance(k, str) for k in keys) for keys in listed.values()
    ):
        raise ValueError(
            f"{path}: 'modules_to_save' in the spielft metadata must map module names to lists "
            f"of state keys, got {listed!r}"
        )
    modules = dict(model.named_modules())
    result: dict[str, dict[str, Tensor]] = {}
    for name, keys in listed.items():
        where = f"{path}, module to save {name!r}"
        if not name or _is_internal(name):
            raise ValueError(f"{where}: not a module name the adapter can hold")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{where}: the base model has no such module; is this the right base model?")
        # What a wrapper wraps is what the saved state must fit.
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        elif isinstance(module, SpielLayer):
            module = module.base_layer
        expected = module.state_dict()
        if sorted(keys) != sorted(expected):
            raise ValueError(
                f"{where}: saved with state keys {sorted(keys)}, the base model's module has "
                f"{sorted(expected)}; is this the right base model?"
            )
        state: dict[str, Tensor] = {}
        for key in keys:
            tensor = tensors.get(f"{_SAVED_PREFIX}{name}/{key}")
            if tensor is None:
                raise ValueError(f"{where}: tensor {key!r} is missing from the file")
            want = expected[key]
            if tensor.shape != want.shape or tensor.is_floating_point() != want.is_floating_point():
                raise ValueError(
                    f"{where}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, the base model "
                    f"has {want.dtype} {tuple(want.shape)} (a classification head: load the base "
                    "model with the num_labels the adapter was trained with)"
                )
            state[key] = tensor
        result[name] = state
    return result


def read_adapter(adapter_dir: str | os.PathLike, model: nn.Module) -> SavedAdapter:
    """Read and validate a saved adapter against ``model``; raise a ValueError naming the problem."""
    path = _adapter_file(adapter_dir)
    header, tensors = _read_header(path, tensors=True)
    meta = _adapter_metadata(path, header)
    missing = [key for key in ("config", "modules") if key not in meta]
    if missing:
        raise ValueError(f"{path}: the spielft metadata lacks {missing}")
    try:
        config = SpielConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid adapter config: {err}") from err
    if not isinstance(meta["modules"], dict) or not meta["modules"]:
        raise ValueError(f"{path}: the spielft metadata lists no modules: an empty adapter")
    modules = dict(model.named_modules())
    owners = _weight_owners(model)
    state: dict[str, tuple[Tensor, Tensor]] = {}
    for name, info in meta["modules"].items():
        where = f"{path}, module {name!r}"
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("shape"), list)
            or not isinstance(info.get("num_deltas"), int)
        ):
            raise ValueError(
                f"{where}: the metadata needs a 'shape' list and a 'num_deltas' integer, got "
                f"{info!r}"
            )
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"{where}: the base model has no such module; is this the right base model?"
            )
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"{where}: another adapter of this model trains that module in full "
                "(modules_to_save), so it cannot take sparse deltas"
            )
        layer = module if isinstance(module, SpielLayer) else wrap_module(module)
        if layer is None:
            raise ValueError(
                f"{where}: {type(module).__name__} is not a supported layer type (supported: "
                f"{SUPPORTED_LAYERS})"
            )
        users = tied_weight_users(model, module, owners)
        if users:
            _refuse_tied(name, users)
        shape = tuple(info["shape"])
        if shape != tuple(layer.weight_shape):
            raise ValueError(
                f"{where}: adapter was trained for shape {shape}, the base model has {tuple(layer.weight_shape)}"
            )
        try:
            indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        except KeyError as err:
            raise ValueError(f"{where}: tensor {err} is missing from the file") from err
        if indices.dtype not in (torch.int32, torch.int64) or indices.ndim != 1:
            raise ValueError(
                f"{where}: indices must be a 1-D int32/int64 tensor, got {indices.dtype} {tuple(indices.shape)}"
            )
        if not values.is_floating_point() or values.shape != indices.shape:
            raise ValueError(
                f"{where}: values must be floating point with one per index, got {values.dtype} {tuple(values.shape)}"
            )
        if indices.numel() != info["num_deltas"]:
            raise ValueError(
                f"{where}: {indices.numel()} deltas stored, the config says {info['num_deltas']}"
            )
        idx = indices.long()
        numel = shape[0] * shape[1]
        if idx.numel() and (idx.min() < 0 or idx.max() >= numel):
            raise ValueError(f"{where}: indices out of range for a {shape[0]}x{shape[1]} matrix")
        order = torch.argsort(idx)
        idx, values = idx[order], values[order]
        if idx.numel() > 1 and (idx[1:] == idx[:-1]).any():
            raise ValueError(f"{where}: duplicated indices")
        axis = layer.stored_line_axis(config.structure)
        if axis is not None and not is_whole_lines(idx, shape, axis):
            raise ValueError(
                f"{where}: the config says structure={config.structure!r}, but the indices are "
                f"not whole {config.structure} of the {shape[0]}x{shape[1]} matrix; was the "
                "file edited?"
            )
        state[name] = (idx, values)
    return SavedAdapter(config, state, _read_modules_to_save(path, meta, tensors, model))
