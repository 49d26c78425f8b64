"""spielft: sparse fine-tuning of large language models (SpIEL)."""

from .config import SpielConfig
from .layer import SparseDelta, SpielLayer, SpielLinear
from .model import SpielModel, get_spiel_model
from .ops import sparse_delta_linear
from .optim import SM3, SparseAdamW
from .selection import SpielSelector

__version__ = "0.1.0"

__all__ = [
    "SM3",
    "SparseAdamW",
    "SparseDelta",
    "SpielConfig",
    "SpielLayer",
    "SpielLinear",
    "SpielModel",
    "SpielSelector",
    "get_spiel_model",
    "sparse_delta_linear",
]
