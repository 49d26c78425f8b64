"""Sparse-delta layers: a frozen base layer plus one `SparseDelta` per adapter."""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .ops import (
    GradCapture,
    WeightSource,
    lines_of,
    mark_base_rewritten,
    merged_values,
    restore_weight,
    sparse_delta_embedding,
    sparse_delta_linear,
    weight_lock,
)


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


# -- whole lines: index sets made of entire rows or columns of the stored matrix --------------
#
# With ``SpielConfig.structure`` set, every index set is a union of whole lines along one axis
# of the stored weight (0: rows, 1: columns). The indices stay flat positions, so saving,
# merging and the optimizers see nothing different; the op and the selector read the lines
# back from them (`spielft.ops.lines_of`) to run a small dense GEMM instead of a sampled one.


def line_length(shape: tuple[int, int], axis: int) -> int:
    """How many entries one line along ``axis`` holds (a row has ``shape[1]``)."""
    return shape[1 - axis]


def line_members(lines: Tensor, shape: tuple[int, int], axis: int) -> Tensor:
    """The flat row-major positions of each line: (len(lines), line length), int64."""
    rows, cols = shape
    lines = lines.long()
    if axis == 0:
        return lines[:, None] * cols + torch.arange(cols, device=lines.device)
    return torch.arange(rows, device=lines.device)[None, :] * cols + lines[:, None]


def line_positions(lines: Tensor, shape: tuple[int, int], axis: int) -> Tensor:
    """Sorted flat row-major positions of the given sorted ``lines`` (int64)."""
    members = line_members(lines, shape, axis)
    return (members if axis == 0 else members.T).reshape(-1)


def is_whole_lines(indices: Tensor, shape: tuple[int, int], axis: int) -> bool:
    """Whether sorted unique ``indices`` are exactly a union of whole lines along ``axis``."""
    if indices.numel() % line_length(shape, axis):
        return False
    lines = lines_of(indices, shape, axis)
    return bool(torch.equal(line_positions(lines, shape, axis), indices.long()))


class SparseDelta(nn.Module):
    """One adapter's sparse update of one weight matrix.

    ``indices`` are sorted, unique, flat row-major positions in a ``shape`` matrix; ``values``
    holds the trainable difference from the pretrained weight at each of them. With
    ``line_axis`` (0 or 1) the indices are whole rows or whole columns of that matrix, and
    stay so through every reselection.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        indices: Tensor,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        grad_dtype: torch.dtype | None = None,
        line_axis: int | None = None,
    ) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        numel = self.shape[0] * self.shape[1]
        if line_axis is not None and not is_whole_lines(indices, self.shape, line_axis):
            raise ValueError(
                f"the indices of a {self.shape} delta are not sorted, unique whole "
                f"{'rows' if line_axis == 0 else 'columns'} of it, as a structured adapter "
                "needs: sort them, or, if they were saved by an unstructured adapter, load them "
                "with SpielConfig.structure='unstructured'."
            )
        self.line_axis = line_axis
        self.register_buffer("indices", indices.to(device=device, dtype=index_dtype(numel)))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=device))
        # Set by the selector during its statistics windows (see spielft.ops.GradCapture).
        self.grad_capture: GradCapture | None = None
        # dtype of the GEMM behind the weight gradient (SpielConfig.weight_grad_dtype).
        self.grad_dtype = grad_dtype

    @property
    def numel_dense(self) -> int:
        return self.shape[0] * self.shape[1]

    def lines(self) -> Tensor:
        """The whole lines this delta trains (only for a structured delta)."""
        assert self.line_axis is not None
        return lines_of(self.indices, self.shape, self.line_axis)

    def values_by_line(self) -> Tensor:
        """``values`` as (lines, line length): row i holds the i-th line's deltas."""
        assert self.line_axis is not None
        width = line_length(self.shape, self.line_axis)
        if self.line_axis == 0:
            return self.values.view(-1, width)
        return self.values.view(width, -1).T

    def extra_repr(self) -> str:
        lines = "" if self.line_axis is None else f", lines along axis {self.line_axis}"
        return f"shape={self.shape}, k={self.values.numel()}, dtype={self.values.dtype}{lines}"

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
        if self.line_axis is not None and not is_whole_lines(indices, self.shape, self.line_axis):
            raise ValueError("a structured delta must be reassigned whole lines")
        old = self.values.detach().clone()
        new = torch.zeros_like(old)
        kept = source >= 0
        new[kept] = old[source[kept]]
        self.values.copy_(new)
        grad = self.values.grad
        if grad is not None:  # a gradient being accumulated over micro-batches follows its slot
            grad.copy_(torch.where(kept, grad[source.clamp(min=0)], 0))
        self.indices = indices.to(device=self.indices.device, dtype=self.indices.dtype)


class CombinedDelta(NamedTuple):
    """What one forward adds to a layer's weight: the live deltas, summed."""

    indices: Tensor
    values: Tensor
    captures: list[GradCapture]
    grad_dtype: torch.dtype | None  # the ops' grad_dtype (None: auto)
    line_axis: int | None  # the indices are whole lines along this stored axis (or None)


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
        # adapter -> (positions written, their values before): unmerge restores exactly these,
        # even if a selector update moved the adapter's indices since the merge.
        self._merge_backup: dict[str, tuple[Tensor, Tensor]] = {}

    transposed = False  # True where the stored weight is (in, out), as in Conv1D

    def stored_line_axis(self, structure: str) -> int | None:
        """The stored axis whose whole lines `SpielConfig.structure` trains (None: any entries).

        ``"rows"`` are output features and ``"columns"`` input features of the computation,
        whatever the storage layout; an embedding's rows are its tokens' vectors.
        """
        if structure == "unstructured":
            return None
        axis = 0 if structure == "rows" else 1
        return 1 - axis if self.transposed else axis

    # -- the base layer's parameters, read through (as peft's tuner layers do) -------------------
    @property
    def weight(self) -> Tensor:
        """The frozen base weight: model code reads e.g. ``self.wo.weight.dtype`` (T5)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

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

    def combined_delta(self, deltas: list[SparseDelta] | None = None) -> CombinedDelta | None:
        """Sorted unique indices and summed values of ``deltas`` (default: all live deltas).

        Differentiable with respect to the deltas' values.
        """
        deltas = self.live_deltas() if deltas is None else deltas
        deltas = [d for d in deltas if d.values.numel() > 0]
        if not deltas:
            return None
        captures = [d.grad_capture for d in deltas if d.grad_capture is not None]
        grad_dtypes = {d.grad_dtype for d in deltas}  # live adapters that disagree: exact
        grad_dtype = grad_dtypes.pop() if len(grad_dtypes) == 1 else torch.float32
        axes = {d.line_axis for d in deltas}  # a union of lines along one axis is lines too
        line_axis = axes.pop() if len(axes) == 1 else None
        if len(deltas) == 1:
            d = deltas[0]
            return CombinedDelta(d.indices, d.values, captures, grad_dtype, line_axis)
        all_indices = torch.cat([d.indices.long() for d in deltas])
        dtype = deltas[0].values.dtype
        for d in deltas[1:]:
            dtype = torch.promote_types(dtype, d.values.dtype)
        indices, inverse = torch.unique(all_indices, sorted=True, return_inverse=True)
        values = torch.zeros(indices.numel(), dtype=dtype, device=indices.device)
        values = values.index_add(0, inverse, torch.cat([d.values.to(dtype) for d in deltas]))
        return CombinedDelta(indices, values, captures, grad_dtype, line_axis)

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
        """Write the deltas into the base weight (exactly reversible by `unmerge`).

        Under the weight's lock, as forwards patch it: a merge never interleaves with one.
        """
        weight = self._merge_target()
        flat = weight.view(-1)
        with weight_lock(weight):
            restore_weight(weight)  # W's own values, not deltas an applied_deltas block left
            for name in adapter_names or self.active_adapters:
                if name in self.merged_adapters or name not in self.spiel_deltas:
                    continue
                delta = self.spiel_deltas[name]
                idx = delta.indices.long()
                self._merge_backup[name] = (idx, flat[idx].clone())
                flat[idx] = merged_values(flat[idx], delta.values)
                mark_base_rewritten(weight)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pretrained weight, undoing merges in reverse order."""
        if not self.merged_adapters:
            return
        weight = self._merge_target()
        flat = weight.view(-1)
        with weight_lock(weight):
            restore_weight(weight)
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                idx, before = self._merge_backup[name]
                # The model may have been moved or cast (``.to``) since the merge.
                flat[idx.to(flat.device)] = before.to(device=flat.device, dtype=flat.dtype)
                mark_base_rewritten(weight)
                # Forget the backup only once it is written back: a failure stays retryable.
                del self._merge_backup[name]
                self.merged_adapters.pop()


class SpielLinear(SpielLayer):
    """``nn.Linear`` with sparse deltas: ``x @ (W + delta).T + b``."""

    @property
    def weight_shape(self) -> tuple[int, int]:
        return tuple(self.base_layer.weight.shape)  # type: ignore[return-value]

    def weight_source(self) -> WeightSource:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        combined = self.combined_delta()
        if combined is None:
            restore_weight(self.weight_source())
            return self.base_layer(x)
        return sparse_delta_linear(
            x,
            self.weight_source(),
            self.base_layer.bias,
            combined.indices,
            combined.values,
            combined.captures,
            transposed=self.transposed,
            grad_dtype=combined.grad_dtype,
            line_axis=combined.line_axis,
        )


class SpielConv1D(SpielLinear):
    """transformers' ``Conv1D`` (GPT-2) with sparse deltas: ``x @ (W + delta) + b``.

    ``Conv1D`` stores its weight transposed, (in, out). The flat indices address that stored
    layout row-major (``weight_shape`` is (in, out)), so merging writes straight into it.
    """

    transposed = True


class SpielEmbedding(SpielLayer):
    """``nn.Embedding`` with sparse deltas on its entries: a lookup in ``W + delta``.

    Indices address the (num_embeddings, dim) weight row-major. ``padding_idx``,
    ``max_norm``, ``norm_type`` and ``scale_grad_by_freq`` behave as in ``F.embedding`` on
    the dense ``W + delta``, except that ``max_norm`` rescales the looked-up rows instead of
    renormalising W in place (the frozen weight never changes). The deltas' gradient only
    involves the rows that occur in the batch.

    Not targeted by default: name it in ``SpielConfig.target_modules``. An embedding whose
    weight is tied to another module (e.g. the output head) is refused by `SpielModel`.
    """

    @property
    def weight_shape(self) -> tuple[int, int]:
        return tuple(self.base_layer.weight.shape)  # type: ignore[return-value]

    def weight_source(self) -> WeightSource:
        return self.base_layer.weight

    def forward(self, ids: Tensor) -> Tensor:
        combined = self.combined_delta()
        if combined is None:
            restore_weight(self.weight_source())
            return self.base_layer(ids)
        base = self.base_layer
        return sparse_delta_embedding(  # a lookup, no GEMM: grad_dtype does not apply
            ids,
            self.weight_source(),
            combined.indices,
            combined.values,
            combined.captures,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            line_axis=combined.line_axis,  # whole rows/columns are patched line by line
        )


class SpielQuantLinear(SpielLayer):
    """Base of the bitsandbytes (4-bit / 8-bit) linear layers with sparse deltas.

    ``weight_source()`` is a callable that dequantizes the base weight into a fresh dense
    (out, in) tensor in the compute dtype; the op adds the deltas to it (in the compute
    dtype), uses it and drops it. The quantized weight is never modified, and no dense copy
    outlives a forward or backward call. `merge` refuses (it would have to requantize);
    `dequantized_linear` builds a plain ``nn.Linear`` holding dequantized W + delta instead
    (used by ``SpielModel.merge_and_unload(dequantize=True)``).
    """

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.base_layer.out_features, self.base_layer.in_features)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """A fresh dense (out, in) copy of the base weight in ``dtype`` (no deltas)."""
        raise NotImplementedError

    def compute_dtype(self, x: Tensor | None = None) -> torch.dtype:
        """The dtype the layer computes in for input ``x`` (without ``x``: for merging)."""
        raise NotImplementedError

    def weight_source(self, dtype: torch.dtype | None = None) -> WeightSource:
        return functools.partial(self.dequantize, dtype or self.compute_dtype())

    def _base_forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x)

    def forward(self, x: Tensor) -> Tensor:
        combined = self.combined_delta()
        if combined is None:
            return self._base_forward(x)
        dtype = self.compute_dtype(x)
        out = sparse_delta_linear(
            x.to(dtype),
            self.weight_source(dtype),
            self.base_layer.bias,
            combined.indices,
            combined.values,
            combined.captures,
            grad_dtype=combined.grad_dtype,
            line_axis=combined.line_axis,
        )
        return out.to(x.dtype)

    @torch.no_grad()
    def dequantized_linear(
        self, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None
    ) -> nn.Linear:
        """A plain ``nn.Linear`` with weight dequantized W + the named adapters' deltas.

        W + delta is formed exactly as the forward pass forms it (in the compute dtype, the
        deltas of several adapters summed first), then stored in ``dtype`` (default: the
        compute dtype). The result is frozen; nothing is ever requantized.
        """
        compute = self.compute_dtype()
        weight = self.dequantize(compute)
        names = self.active_adapters if adapter_names is None else adapter_names
        combined = self.combined_delta(
            [self.spiel_deltas[n] for n in names if n in self.spiel_deltas]
        )
        if combined is not None:
            flat = weight.view(-1)
            idx = combined.indices.long()
            flat[idx] = merged_values(flat[idx], combined.values.detach())
        dtype = dtype or compute
        base = self.base_layer
        linear = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)


class SpielLinear4bit(SpielQuantLinear):
    """bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double quantization).

    Computes like ``Linear4bit``: the input is cast to the layer's ``compute_dtype`` (set
    from the first input if it was not given, as bitsandbytes does) and the output back to
    the input's dtype. bitsandbytes' CPU inference repacking (an AVX512-BF16 layout whose
    statistics are rounded to bf16) is turned off while this layer calls its base, so the
    quantized weight stays exactly as it was quantized.
    """

    def compute_dtype(self, x: Tensor | None = None) -> torch.dtype:
        base = self.base_layer
        if x is not None:
            if not getattr(base, "compute_type_is_set", True):
                base.set_compute_type(x)
                base.compute_type_is_set = True
            return base.compute_dtype or x.dtype
        if base.compute_dtype is not None:
            return base.compute_dtype
        state = getattr(base.weight, "quant_state", None)
        return state.dtype if state is not None else base.weight.dtype

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        weight = self.base_layer.weight
        state = getattr(weight, "quant_state", None)
        if state is None:  # lost by a parameter conversion; bitsandbytes keeps a copy
            state = getattr(self.base_layer, "quant_state", None)
        if state is None:  # not quantized yet (still on the meta device or before .to())
            return weight.data.to(dtype, copy=True).reshape(self.weight_shape).contiguous()
        import bitsandbytes.functional as bnbf

        if getattr(state, "packing_format_for_cpu", False):
            # Packed by an earlier eval-mode call of the bare layer: back to the canonical
            # layout, as bitsandbytes itself does before saving.
            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                weight.data, state
            )
            state = weight.quant_state
        dense = bnbf.dequantize_4bit(weight.data, state)
        return dense.to(dtype).reshape(self.weight_shape).contiguous()

    def _base_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if not getattr(base, "support_avx512bf16_for_cpu", False):
            return base(x)
        base.support_avx512bf16_for_cpu = False
        try:
            return base(x)
        finally:
            base.support_avx512bf16_for_cpu = True


class SpielLinear8bit(SpielQuantLinear):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8 weights: int8 rows and a scale per row).

    With deltas, the layer computes in the input's dtype with the dequantized weight
    ``CB * SCB / 127`` (+ delta), where bitsandbytes' own forward would also quantize the
    input; without live deltas it calls the base layer. For merging, the compute dtype is
    the bias's dtype (bitsandbytes casts the bias to the input dtype), else float32.
    """

    def compute_dtype(self, x: Tensor | None = None) -> torch.dtype:
        if x is not None:
            return x.dtype
        bias = self.base_layer.bias
        if bias is not None and bias.is_floating_point():
            return bias.dtype
        weight = self.base_layer.weight
        return weight.dtype if weight.is_floating_point() else torch.float32

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        weight = self.base_layer.weight
        if weight.dtype != torch.int8:  # not quantized (yet), or has_fp16_weights=True
            return weight.data.to(dtype, copy=True).contiguous()
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(self.base_layer.state, "SCB", None)
        if scb is None:
            raise RuntimeError(
                "Linear8bitLt has int8 weights but no row scales (SCB): cannot dequantize"
            )
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(weight.data, scb).to(dtype).contiguous()


def wrap_module(module: nn.Module) -> SpielLayer | None:
    """The sparse-delta layer for ``module``, or None if its type is not supported.

    Supported: ``nn.Linear``, ``nn.Embedding`` (exact types: subclasses may override
    ``forward``), transformers' ``Conv1D``, and bitsandbytes' ``Linear4bit`` and
    ``Linear8bitLt`` (and their subclasses). The bitsandbytes layers subclass ``nn.Linear``,
    so they are checked first. Neither library is imported here: a module can only be one
    of their layers if the library is already loaded.
    """
    if isinstance(module, SpielLayer):
        return module
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    if bnb_nn is not None and isinstance(module, nn.Linear):
        if isinstance(module, bnb_nn.Linear4bit):
            return SpielLinear4bit(module)
        if isinstance(module, bnb_nn.Linear8bitLt):
            return SpielLinear8bit(module)
    if type(module) is nn.Linear:
        return SpielLinear(module)
    if type(module) is nn.Embedding:
        return SpielEmbedding(module)
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and type(module) is getattr(pytorch_utils, "Conv1D", None):
        return SpielConv1D(module)
    return None


SUPPORTED_LAYERS = (
    "nn.Linear, nn.Embedding, transformers Conv1D, bitsandbytes Linear4bit and Linear8bitLt"
)


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` deltas over matrices in proportion to their sizes (largest remainder)."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    counts = [min(math.floor(e), s) for e, s in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts
