"""spielft: sparse fine-tuning of large language models (SpIEL).

The library: `SpielConfig` + `get_spiel_model` wrap any causal LM (or classifier) with
sparse-delta layers; `create_optimizer` / `create_selector` train them with dynamic
drop-and-regrow (AG or MA). Trainer integration (`SpielTrainer`, `SpielCallback`) and the
``AutoSpielModelFor...`` classes are imported lazily, since they pull in
``transformers.Trainer`` and the auto classes.
"""

from typing import Any

from .config import SpielConfig
from .distributed import UnsupportedParallelismError
from .layer import (
    SparseDelta,
    SpielConv1D,
    SpielEmbedding,
    SpielLayer,
    SpielLinear,
    SpielLinear4bit,
    SpielLinear8bit,
    SpielQuantLinear,
)
from .model import SpielModel, get_spiel_model
from .modules_to_save import ModulesToSaveWrapper
from .ops import sparse_delta_embedding, sparse_delta_linear
from .optim import SM3, SparseAdamW, SparseAdamW8bit
from .selection import SpielSelector

__version__ = "0.1.0"

_LAZY = {
    "AutoSpielModelForCausalLM": "auto",
    "AutoSpielModelForSequenceClassification": "auto",
    "AutoSpielModelForTokenClassification": "auto",
    "AutoSpielModelForQuestionAnswering": "auto",
    "SpielTrainer": "trainer",
    "SpielTrainerMixin": "trainer",
    "SpielCallback": "trainer",
    "create_spiel_optimizer": "trainer",
    "create_spiel_optimizer_and_scheduler": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SM3",
    "AutoSpielModelForCausalLM",
    "AutoSpielModelForQuestionAnswering",
    "AutoSpielModelForSequenceClassification",
    "AutoSpielModelForTokenClassification",
    "ModulesToSaveWrapper",
    "SparseAdamW",
    "SparseAdamW8bit",
    "SparseDelta",
    "SpielCallback",
    "SpielConfig",
    "SpielConv1D",
    "SpielEmbedding",
    "SpielLayer",
    "SpielLinear",
    "SpielLinear4bit",
    "SpielLinear8bit",
    "SpielModel",
    "SpielQuantLinear",
    "SpielSelector",
    "SpielTrainer",
    "SpielTrainerMixin",
    "UnsupportedParallelismError",
    "create_spiel_optimizer",
    "create_spiel_optimizer_and_scheduler",
    "get_spiel_model",
    "sparse_delta_embedding",
    "sparse_delta_linear",
]
