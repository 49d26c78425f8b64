"""`ModulesToSaveWrapper`: a module trained in full next to the sparse deltas, as in peft.

A task head that starts random (a classifier) cannot be fine-tuned by a few deltas: it must
train whole. The wrapper keeps the pretrained module frozen as ``original_module`` and one
trainable copy per adapter in ``modules_to_save``; the forward pass runs the copy of the
active adapter, or the original when no active adapter has one or adapters are disabled.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from .layer import SpielLayer

# bitsandbytes' packed weights: a copy of them cannot train.
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` (frozen) and a trainable copy of it per adapter."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def __getattr__(self, name: str) -> Any:
        # The attributes of the module in use (``weight``, ``out_features``, ...), as peft does.
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Private names (and copy/pickle probing a half-built object) stay ours.
            if name.startswith("_") or name in ("original_module", "modules_to_save",
                                                "active_adapter", "disable_adapters"):
                raise
            return getattr(self.module_in_use(), name)

    def module_in_use(self) -> nn.Module:
        """The module the forward pass runs: the active adapter's copy, else the original."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module_in_use()(*args, **kwargs)

    def add_copy(self, adapter_name: str, state: dict[str, Tensor] | None = None) -> nn.Module:
        """A copy of the original for ``adapter_name``, with ``state`` (a state dict) if given."""
        trainable = copy.deepcopy(self.original_module)
        if state is not None:
            trainable.load_state_dict(state)
        self.modules_to_save[adapter_name] = trainable
        return trainable

    def delete_copy(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Use the copy of the one adapter in ``adapter_names`` that has one (else the original)."""
        self.active_adapter = next((n for n in adapter_names if n in self.modules_to_save), None)

    def mark_trainable(self, adapter_name: str | None) -> None:
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)


def shared_with(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """The other modules of ``model`` that hold one of ``module``'s parameters (tied weights),
    or that are ``module`` itself under another name."""
    own = {id(p) for p in module.parameters()}
    return sorted(
        other
        for other, m in model.named_modules(remove_duplicate=False)
        if other != name and not other.startswith(name + ".")
        and (m is module or any(id(p) in own for p in m.parameters(recurse=False)))
    )


def check_can_save(model: nn.Module, name: str, module: nn.Module, *, allow_tied: bool = False) -> None:
    """Refuse a module that cannot be trained in full as a copy, with the reason and a remedy.

    ``allow_tied``: the copy of an embedding or output head comes from a saved adapter, trained
    untied; it reproduces that forward pass on a base that ties the two.
    """
    where = f"module to save {name!r}"
    if any(isinstance(m, (SpielLayer, ModulesToSaveWrapper)) for m in module.modules()):
        raise ValueError(
            f"{where} holds layers with sparse deltas (or is itself one): a module is either "
            "targeted or trained in full, not both. Remove it from target_modules (or "
            "exclude_modules it) or from modules_to_save."
        )
    quantized = [n for n, p in module.named_parameters() if type(p).__name__ in _QUANTIZED_PARAMS]
    if quantized:
        raise ValueError(
            f"{where} holds quantized weights ({quantized[0]!r}): a 4-/8-bit copy cannot "
            "train. Keep that module in full precision when loading (e.g. "
            "BitsAndBytesConfig(llm_int8_skip_modules=[...]))."
        )
    shared = shared_with(model, name, module)
    if shared and not allow_tied:
        raise ValueError(
            f"{where} shares weights with {shared} (tied weights, e.g. an output head tied to "
            "the input embedding, or one module under two names): a trained copy would untie "
            "them silently. Untie first (e.g. model.config.tie_word_embeddings = False and "
            "model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())), or "
            "do not list it."
        )
