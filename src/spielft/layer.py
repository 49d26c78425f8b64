"""Sparse-delta layers: a frozen base layer plus one `SparseDelta` per adapter."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .ops import GradCapture, WeightSource, merged_values, sparse_delta_linear


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices where the matrix allows it (half the memory of int64)."""
    return torch.int32 if numel < 2**31 else torch.int64


def random_indices(numel: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct positions in ``range(numel)``, uniformly at random, sorted (int64).

    Draws with replacement and de-duplicates, so memory stays O(k) even for huge matrices.
    """
    if not 0 <= k <= numel:
        raise ValueError(f"cannot choose {k} distinct indices out of {numel}")
    if 4 * k >= numel:
        return torch.randperm(numel, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(numel, (int(1.2 * (k - chosen.numel())) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


class SparseDelta(nn.Module):
    """One adapter's sparse update of one weight matrix.

    ``indices`` are sorted, unique, flat row-major positions in a ``shape`` matrix; ``values``
    holds the trainable difference from the pretrained weight at each of them.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        indices: Tensor,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        numel = self.shape[0] * self.shape[1]
        self.register_buffer("indices", indices.to(device=device, dtype=index_dtype(numel)))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=device))
        # Set by the selector during AG accumulation windows; called with the dense gradient.
        self.grad_capture: GradCapture | None = None

    @property
    def numel_dense(self) -> int:
        return self.shape[0] * self.shape[1]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, k={self.values.numel()}, dtype={self.values.dtype}"

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The delta as a dense (out, in) matrix (for inspection and tests, not the hot path)."""
        dense = torch.zeros(
            self.numel_dense, dtype=dtype or self.values.dtype, device=self.values.device
        )
        dense[self.indices.long()] = self.values.detach().to(dense.dtype)
        return dense.view(self.shape)

    @torch.no_grad()
    def reassign(self, indices: Tensor, source: Tensor) -> None:
        """Move to a new index set of the same size, in place.

        ``source[i]`` is the old slot whose value new slot ``i`` keeps, or -1 for a regrown
        position, which starts at zero. The ``values`` parameter object is kept, so optimizers
        holding it stay valid (their per-slot state is remapped with the same ``source``).
        """
        if indices.numel() != self.values.numel():
            raise ValueError("reassign keeps the number of deltas constant")
        old = self.values.detach().clone()
        new = torch.zeros_like(old)
        kept = source >= 0
        new[kept] = old[source[kept]]
        self.values.copy_(new)
        self.indices = indices.to(device=self.indices.device, dtype=self.indices.dtype)


class SpielLayer(nn.Module):
    """Base of all sparse-delta layers: the frozen ``base_layer`` and its adapters' deltas.

    Subclasses say how to get the dense weight (`weight_source`) and how to compute with it
    (`forward`). Everything about adapters (adding, activating, merging) lives here.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spiel_deltas = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Original weights at merged positions, so `unmerge` restores W bit for bit.
        self._merge_backup: dict[str, Tensor] = {}

    # -- what subclasses provide -------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        """The (rows, cols) of the matrix that the flat indices address."""
        raise NotImplementedError

    def weight_source(self) -> WeightSource:
        """The base weight as a patchable tensor, or a callable returning a fresh dense copy."""
        raise NotImplementedError

    # -- adapters -------------------------------------------------------------------------------
    def add_delta(self, adapter_name: str, delta: SparseDelta) -> None:
        if delta.shape != self.weight_shape:
            raise ValueError(
                f"delta for adapter {adapter_name!r} has shape {delta.shape}, but the layer's "
                f"weight is {self.weight_shape}"
            )
        self.spiel_deltas[adapter_name] = delta

    def delete_delta(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"unmerge adapter {adapter_name!r} before deleting it")
        if adapter_name in self.spiel_deltas:
            del self.spiel_deltas[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [n for n in adapter_names if n in self.spiel_deltas]

    def live_deltas(self) -> list[SparseDelta]:
        """Deltas that the forward pass must add (active and not already merged into W)."""
        if self.disable_adapters:
            return []
        return [self.spiel_deltas[n] for n in self.active_adapters if n not in self.merged_adapters]

    def combined_delta(self) -> tuple[Tensor, Tensor, list[GradCapture]] | None:
        """Sorted unique indices and summed values of all live deltas (differentiable)."""
        deltas = [d for d in self.live_deltas() if d.values.numel() > 0]
        if not deltas:
            return None
        captures = [d.grad_capture for d in deltas if d.grad_capture is not None]
        if len(deltas) == 1:
            return deltas[0].indices, deltas[0].values, captures
        all_indices = torch.cat([d.indices.long() for d in deltas])
        dtype = deltas[0].values.dtype
        for d in deltas[1:]:
            dtype = torch.promote_types(dtype, d.values.dtype)
        indices, inverse = torch.unique(all_indices, sorted=True, return_inverse=True)
        values = torch.zeros(indices.numel(), dtype=dtype, device=indices.device)
        values = values.index_add(0, inverse, torch.cat([d.values.to(dtype) for d in deltas]))
        return indices, values, captures

    # -- merging ---------------------------------------------------------------------------------
    def _merge_target(self) -> Tensor:
        weight = self.weight_source()
        if callable(weight):
            raise TypeError(
                f"{type(self.base_layer).__name__} has a quantized weight: merging would "
                "silently requantize and lose the deltas. Dequantize the base model first "
                "(see spielft.model.SpielModel.merge_and_unload(dequantize=True))."
            )
        return weight

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Write the deltas into the base weight (exactly reversible by `unmerge`)."""
        flat = self._merge_target().view(-1)
        for name in adapter_names or self.active_adapters:
            if name in self.merged_adapters or name not in self.spiel_deltas:
                continue
            delta = self.spiel_deltas[name]
            idx = delta.indices.long()
            self._merge_backup[name] = flat[idx].clone()
            flat[idx] = merged_values(flat[idx], delta.values)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pretrained weight, undoing merges in reverse order."""
        if not self.merged_adapters:
            return
        flat = self._merge_target().view(-1)
        for name in reversed(self.merged_adapters):
            flat[self.spiel_deltas[name].indices.long()] = self._merge_backup.pop(name)
        self.merged_adapters = []


class SpielLinear(SpielLayer):
    """``nn.Linear`` with sparse deltas: ``x @ (W + delta).T + b``."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return tuple(self.base_layer.weight.shape)  # type: ignore[return-value]

    def weight_source(self) -> WeightSource:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        combined = self.combined_delta()
        if combined is None:
            return self.base_layer(x)
        indices, values, captures = combined
        return sparse_delta_linear(
            x, self.weight_source(), self.base_layer.bias, indices, values, captures
        )


def wrap_module(module: nn.Module) -> SpielLayer | None:
    """The sparse-delta layer for ``module``, or None if its type is not supported."""
    if isinstance(module, SpielLayer):
        return module
    if type(module) is nn.Linear:
        return SpielLinear(module)
    return None


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` deltas over matrices in proportion to their sizes (largest remainder)."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    counts = [min(math.floor(e), s) for e, s in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts
