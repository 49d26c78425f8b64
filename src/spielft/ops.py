"""The sparse-delta linear op: y = x @ (W + scatter(indices, values)).T + b.

Forward and backward never build a second dense copy of W for an ``nn.Linear`` base: the few
weights at ``indices`` are patched in place, used, and restored bit for bit (O(k) work). The
deltas' gradient is an SDDMM (for each active (i, j): sum over tokens of g[t, i] * x[t, j]):
a sampled matmul for sparse index sets, a dense GEMM plus gather only when the index set is so
dense that the GEMM is faster, or when the selector asks for the full weight gradient (AG).
That GEMM runs in bfloat16 for a bf16 layer, or on request for any (`gemm_dtype_for`).

The same op handles weights stored transposed (transformers' ``Conv1D``: ``y = x @ W + b``)
and quantized bases (``weight`` is then a dequantizing callable). `sparse_delta_embedding` is
the embedding-lookup counterpart, whose backward touches only the rows that occur in the batch.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

# Which SDDMM path is fastest at which density (bench/sddmm.py on the 2-core CPU, SmolLM2's
# shapes, 1024 tokens; bench/results/sddmm.json): the dense GEMM + gather from
# DENSE_SDDMM_DENSITY up (at 18.4%, 1536 x 576: 9.6 ms against CSR's 10.6), the column gathers
# below GATHER_SDDMM_DENSITY (at 0.1%: 1.0 ms against 2.4), the CSR sampled matmul in between.
DENSE_SDDMM_DENSITY = 0.12
GATHER_SDDMM_DENSITY = 0.002
# With a bfloat16 GEMM (see `gemm_dtype_for`) the dense path costs 0.5-0.6 as much on the AMD
# EPYC (AVX512-BF16) these were measured on, so it beats the float32 CSR path from 3-10% up on
# the large shapes (1536 x 576: 5.4 ms against 5.6 at 3%, 5.6 against 9.1 at 10%) and 1-3% on
# the small ones (bench/results/sddmm_bf16.json): 5% is taken for all.
BF16_DENSE_SDDMM_DENSITY = 0.05

# The sampled matmul below is the one CSR op we use; its "beta" notice is noise for our users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

class GradCapture(Protocol):
    """What the selector collects in backward during a statistics window (see selection.py).

    Called once per backward with ``dense_grad``, the float32 gradient of the full weight in
    its stored layout (None unless ``wants_dense_grad``); ``input_ms``, the mean over tokens
    of each input feature's square, shaped to broadcast against the stored weight: (1, in),
    or (in, 1) for a transposed (Conv1D) weight (None unless ``wants_input_stats``, and always
    None for embeddings, whose one-hot inputs have no scale); and ``factors``, the (left,
    right) pair whose product ``left.T @ right`` is that gradient, (tokens, rows) and (tokens,
    cols), for statistics cheaper than the product (None unless ``wants_factors``; an
    embedding passes ``dense_grad`` instead, which is cheap there).
    """

    wants_dense_grad: bool
    wants_input_stats: bool
    wants_factors: bool

    def __call__(
        self,
        dense_grad: Tensor | None,
        input_ms: Tensor | None,
        factors: tuple[Tensor, Tensor] | None,
    ) -> None: ...


WeightSource = Tensor | Callable[[], Tensor]


def merged_values(base: Tensor, values: Tensor) -> Tensor:
    """W[idx] + delta, added in (at least) float32 and rounded once to W's dtype.

    Forward, merge and unmerge all use this one formula, so a merged model's logits equal the
    unmerged model's exactly, in bf16/fp16 too.
    """
    dtype = torch.promote_types(base.dtype, torch.float32)
    return (base.to(dtype) + values.to(dtype)).to(base.dtype)


class _WeightState:
    """Per-weight bookkeeping that must not live on the tensor (a lock can be neither pickled
    nor deep-copied): the patching lock, and how often W's base values were rewritten on
    purpose (merge, unmerge), so a backward can tell that its forward saw another W."""

    __slots__ = ("base_revision", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.base_revision = 0


# Keyed by id(), dropped when the tensor dies; the guard also covers `_APPLIED` below.
_WEIGHT_STATES: dict[int, _WeightState] = {}
_REGISTRY_GUARD = threading.Lock()


def _weight_state(weight: Tensor) -> _WeightState:
    key = id(weight)
    with _REGISTRY_GUARD:
        state = _WEIGHT_STATES.get(key)
        if state is None:
            state = _WEIGHT_STATES[key] = _WeightState()
            weakref.finalize(weight, _WEIGHT_STATES.pop, key, None)
    return state


def weight_lock(weight: Tensor) -> threading.RLock:
    """The lock serialising in-place patching of ``weight`` across threads.

    Re-entrant, so a nested patch in the same thread (e.g. a recomputation) cannot deadlock.
    """
    return _weight_state(weight).lock


def base_revision(weight: WeightSource) -> int | None:
    """How many times `mark_base_rewritten` was called on ``weight`` (None: not a tensor)."""
    return None if callable(weight) else _weight_state(weight).base_revision


def mark_base_rewritten(weight: Tensor) -> None:
    """Record that W's base values changed (merge/unmerge): pending backwards must not use it."""
    _weight_state(weight).base_revision += 1


def _scatter_takes_int32() -> bool:
    """Whether ``scatter_`` takes an int32 index (torch >= 2.8), so int32 indices need no copy."""
    try:
        torch.zeros(1).scatter_(0, torch.zeros(1, dtype=torch.int32), torch.ones(1))
    except RuntimeError:
        return False
    return True


_SCATTER_TAKES_INT32 = _scatter_takes_int32()


def scatter_index(indices: Tensor) -> Tensor:
    """``indices`` as ``scatter_`` takes them: int32 as they are where torch allows it."""
    return indices if _SCATTER_TAKES_INT32 and indices.dtype == torch.int32 else indices.long()


class _AppliedDelta:
    """What `applied_deltas` keeps written into one base weight between uses.

    ``saved`` holds W's own values at ``where`` (None while nothing is written), so the
    weight is restored bit for bit: 4 bytes per delta for a float32 W, held for the whole
    block. ``where`` is our own copy of the positions (4 bytes more per delta for int32
    indices), or, for whole lines (``line_axis``), only the few line numbers, written line by
    line as `_write_deltas` does. ``token`` names the op call whose values W holds, so that
    call's backward can use W as it is; ``values_seen`` (the values tensor, its version and
    storage, and the optimizer steps taken so far) lets any later call with the same,
    unmodified values skip the write: the micro-batches of one optimizer step, evaluation, and
    every token of `SpielModel.generate` then write nothing.
    """

    def __init__(self, weight: Tensor) -> None:
        self.weight = weakref.ref(weight)
        self.indices: Tensor | None = None  # the caller's index tensor, as last seen
        self.indices_version = -1
        self.where: Tensor | None = None  # our own copy of the positions, or the lines
        self.line_axis: int | None = None
        self.saved: Tensor | None = None
        self.token: object | None = None
        self.weight_version = -1
        self.values_seen: tuple[weakref.ref, int, int, int] | None = None

    def restore(self, weight: Tensor) -> None:
        if self.saved is not None:
            saved = self.saved.to(device=weight.device, dtype=weight.dtype)  # after a .to()
            _put(weight, self.where.to(weight.device), saved, self.line_axis)
        self.indices = self.where = self.saved = self.token = None
        self.line_axis = self.values_seen = None

    def _holds(self, weight: Tensor, indices: Tensor, line_axis: int | None) -> bool:
        """Whether W already holds deltas at exactly these positions, written the same way."""
        if line_axis != self.line_axis:
            return False
        if indices is self.indices and indices._version == self.indices_version:
            return True
        if indices.numel() != self.saved.numel():
            return False
        where = _where(indices.to(weight.device), tuple(weight.shape), line_axis)
        return torch.equal(where.to(self.where.dtype), self.where)

    def write(
        self,
        weight: Tensor,
        indices: Tensor,
        values: Tensor,
        token: object | None,
        line_axis: int | None = None,
    ) -> None:
        """Make W hold W0 + scatter(indices, values), writing only what is not already there.

        The state changes only once the write has succeeded: a failed call (e.g. values of the
        wrong length) leaves the block usable.
        """
        if self.saved is not None:
            if weight._version != self.weight_version:
                raise RuntimeError(
                    f"a base weight of shape {tuple(weight.shape)} was modified in place while "
                    "spielft kept sparse deltas applied to it (inside "
                    "SpielModel.applied_deltas(), or SpielTrainer(keep_deltas_applied=True)), "
                    "so its pretrained values can no longer be restored exactly. Modify base "
                    "weights outside that block."
                )
            if self.saved.device != weight.device or self.saved.dtype != weight.dtype:  # a .to()
                self.where = self.where.to(weight.device)
                self.saved = self.saved.to(device=weight.device, dtype=weight.dtype)
                self.values_seen = None  # W was converted from what was written: write again
            if not self._holds(weight, indices, line_axis):
                self.restore(weight)
            elif token is not None and token is self.token:
                return  # this op's forward wrote exactly these values
            elif self._seen(values):
                self.token = token  # W holds them already (an in-place change bumps _version)
                return
        if self.saved is not None:
            where, saved = self.where, self.saved
        else:
            # A copy: restoring must not depend on the caller's tensor staying as it is
            # (lines_of builds a fresh tensor; scatter_index may return ``indices`` itself).
            where = _where(indices if line_axis is not None else indices.clone(),
                           tuple(weight.shape), line_axis)
            saved = _read(weight, where, line_axis)
        _put(weight, where, merged_values(saved, values.view(saved.shape)), line_axis)
        self.where, self.saved, self.line_axis = where, saved, line_axis
        self.indices, self.indices_version = indices, indices._version
        self.token, self.weight_version = token, weight._version
        self.values_seen = (
            weakref.ref(values), values._version, values.data_ptr(), _OptimizerSteps.count
        )

    def _seen(self, values: Tensor) -> bool:
        """Whether W holds exactly these ``values``: the same tensor, not modified since.

        Not modified: no in-place change (its version counter) and no optimizer step since
        (fused optimizers change values without bumping the version).
        """
        if self.values_seen is None:
            return False
        ref, version, pointer, steps = self.values_seen
        return (
            ref() is values
            and values._version == version
            and values.data_ptr() == pointer
            and _OptimizerSteps.count == steps
        )


# id(weight) -> its _AppliedDelta, for the weights inside an `applied_deltas` block.
_APPLIED: dict[int, _AppliedDelta] = {}


class _OptimizerSteps:
    """Counts every ``torch.optim.Optimizer.step()`` while an `applied_deltas` block is open.

    Part of what `_AppliedDelta` checks before it skips a write: torch's fused optimizers (and
    others that write through raw pointers) leave a parameter's version counter unchanged, so
    the version alone would miss their updates. Registered globally (torch's
    ``register_optimizer_step_post_hook``) only while a block is open.
    """

    count = 0
    _blocks = 0
    _handle = None

    @classmethod
    def _hook(cls, optimizer: object, args: object, kwargs: object) -> None:
        cls.count += 1

    @classmethod
    def open(cls) -> None:  # under _REGISTRY_GUARD
        if cls._blocks == 0:
            cls._handle = register_optimizer_step_post_hook(cls._hook)
        cls._blocks += 1

    @classmethod
    def close(cls) -> None:  # under _REGISTRY_GUARD
        cls._blocks -= 1
        if cls._blocks == 0 and cls._handle is not None:
            cls._handle.remove()
            cls._handle = None


def _applied_for(weight: Tensor) -> _AppliedDelta | None:
    applied = _APPLIED.get(id(weight))
    return applied if applied is not None and applied.weight() is weight else None


@contextmanager
def applied_deltas(weights: Sequence[Tensor]) -> Iterator[None]:
    """Inside, `weight_with_deltas` leaves the deltas written into ``weights`` between uses.

    Outside, every forward and every backward patches W at the deltas' positions and restores
    it: three passes over those positions each, and at LoRA-like densities every cache line of
    W. Inside, a forward writes only the new values (one pass), its backward writes nothing,
    and each weight is restored exactly on exit. The price is memory: W's own values at the
    positions, and the positions, kept for the whole block (8 bytes per float32 delta with one
    adapter's int32 indices; 12 with several adapters' combined int64 ones; 4 for whole lines,
    which keep only their line numbers). W reads as
    ``W + delta`` inside the block; `restore_weight` (what merging and a forward without live
    deltas call) puts W back first. Blocks nest; only the outermost one restores.
    """
    entered = []
    with _REGISTRY_GUARD:
        _OptimizerSteps.open()
        for weight in weights:
            if _applied_for(weight) is None:
                _APPLIED[id(weight)] = _AppliedDelta(weight)
                entered.append(weight)
    try:
        yield
    finally:
        with _REGISTRY_GUARD:
            _OptimizerSteps.close()
        failures = []
        for weight in entered:  # every weight, even if restoring another one failed
            with weight_lock(weight):
                applied = _APPLIED.pop(id(weight), None)
                try:
                    if applied is not None:
                        with torch.no_grad():
                            applied.restore(weight)
                except Exception as error:  # re-raised below, once all are restored
                    failures.append(error)
        if failures:
            raise failures[0]


def write_applied(
    weight: Tensor, indices: Tensor, values: Tensor, line_axis: int | None = None
) -> None:
    """Inside an `applied_deltas` block, write the deltas into W now (outside one: nothing)."""
    with torch.no_grad(), weight_lock(weight):
        applied = _applied_for(weight)
        if applied is not None:
            applied.write(weight, indices, values, None, line_axis)


def restore_weight(weight: WeightSource) -> None:
    """Put W's own values back where an `applied_deltas` block wrote deltas into it.

    The block stays open: the next use writes them again.
    """
    if callable(weight):
        return
    with weight_lock(weight):
        applied = _applied_for(weight)
        if applied is not None:
            with torch.no_grad():
                applied.restore(weight)


def lines_of(indices: Tensor, shape: tuple[int, int], axis: int) -> Tensor:
    """The sorted lines (int64) of an index set made of whole rows (axis 0) or columns (1)."""
    cols = shape[1]
    if axis == 0:
        return indices[::cols].long() // cols
    return indices[: indices.numel() // shape[0]].long() % cols


def _where(indices: Tensor, shape: tuple[int, int], line_axis: int | None) -> Tensor:
    """Where the deltas go, as `_put` takes it: flat positions, or the whole lines they make."""
    return scatter_index(indices) if line_axis is None else lines_of(indices, shape, line_axis)


def _read(weight: Tensor, where: Tensor, line_axis: int | None) -> Tensor:
    """W's values at ``where`` (shaped as the lines for whole lines)."""
    if line_axis is None:
        return weight.view(-1).index_select(0, where)
    return weight.index_select(line_axis, where)


def _put(weight: Tensor, where: Tensor, values: Tensor, line_axis: int | None) -> None:
    """W[where] = values in place.

    Whole lines are copied line by line (`index_copy_`), about 8x faster than a flat scatter
    for rows (contiguous) and 2x for columns; any other set goes through the flat scatter
    (scatter_ rather than flat[idx] = ...: ~10-40x faster on CPU).
    """
    if line_axis is None:
        weight.view(-1).scatter_(0, where, values)
    else:
        weight.index_copy_(line_axis, where, values)


def _write_deltas(
    weight: Tensor, indices: Tensor, values: Tensor, line_axis: int | None
) -> tuple[Tensor, Tensor]:
    """W[indices] = W[indices] + values in place; returns (where, W's values there) to restore."""
    where = _where(indices, tuple(weight.shape), line_axis)
    saved = _read(weight, where, line_axis)
    _put(weight, where, merged_values(saved, values.view(saved.shape)), line_axis)
    return where, saved


@contextmanager
def weight_with_deltas(
    weight: WeightSource,
    indices: Tensor,
    values: Tensor,
    token: object | None = None,
    line_axis: int | None = None,
) -> Iterator[Tensor]:
    """Yield the dense weight W + scatter(indices, values).

    A tensor ``weight`` (a frozen parameter) is patched in place at ``indices`` and restored
    exactly on exit, under `weight_lock` (concurrent forwards from several threads would
    otherwise corrupt W); inside an `applied_deltas` block it is left patched instead, and a
    backward passing its forward's ``token`` finds it ready. A callable ``weight`` (e.g. a
    dequantizer) returns a fresh dense tensor, which is patched and simply dropped afterwards;
    the quantized storage is never touched. ``line_axis`` says the indices are whole rows (0)
    or columns (1) of the 2-D weight, which are patched line by line.
    """
    with torch.no_grad():
        if callable(weight):
            dense = weight()
            _write_deltas(dense, indices, values, line_axis)
            yield dense
            return
        # Held from patch to restore: another thread must neither compute with our patched W
        # nor save our patched values as the "original" that it then writes back.
        with weight_lock(weight):
            applied = _applied_for(weight)
            if applied is not None:
                applied.write(weight, indices, values, token, line_axis)
                yield weight
                return
            where, saved = _write_deltas(weight, indices, values, line_axis)
            try:
                yield weight
            finally:
                _put(weight, where, saved, line_axis)


def gemm_dtype_for(operand_dtype: torch.dtype, grad_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the weight-gradient GEMM runs in: bfloat16, or None for exact (float32/64).

    ``grad_dtype`` is `SpielConfig.weight_grad_dtype`'s: None ("auto") is bfloat16 when the layer
    computes in bfloat16 (as autograd does for any bf16 ``nn.Linear``) and exact otherwise;
    ``torch.bfloat16`` always rounds to bfloat16; ``torch.float32`` is always exact.
    """
    if grad_dtype is None:
        return torch.bfloat16 if operand_dtype == torch.bfloat16 else None
    return torch.bfloat16 if grad_dtype == torch.bfloat16 else None


def weight_grad(left: Tensor, right: Tensor, gemm_dtype: torch.dtype | None = None) -> Tensor:
    """The full weight gradient ``left.T @ right``, as float32 (float64 stays float64).

    ``gemm_dtype=torch.bfloat16`` rounds both operands to bfloat16 for the GEMM, as
    mixed-precision training does for every weight gradient: half the time on hardware with
    bf16 units, a relative error of about 2**-8 per entry.
    """
    dtype = torch.float64 if torch.float64 in (left.dtype, right.dtype) else torch.float32
    if gemm_dtype == torch.bfloat16:
        return (left.to(gemm_dtype).T @ right.to(gemm_dtype)).to(dtype)
    return left.to(dtype).T @ right.to(dtype)


def dense_sddmm(grad_out: Tensor, x: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The SDDMM as the full ``grad_out.T @ x`` GEMM and a gather: best for dense index sets."""
    return (grad_out.T @ x).view(-1).index_select(0, indices)  # int32 or int64


def csr_sddmm(grad_out: Tensor, x: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The SDDMM as torch's CSR sampled matmul: O(k * tokens), plus a per-call overhead."""
    out_features, in_features = shape
    idx = indices.long()
    boundaries = torch.arange(out_features + 1, device=idx.device, dtype=torch.long) * in_features
    pattern = torch.sparse_csr_tensor(
        torch.searchsorted(idx, boundaries),
        idx % in_features,
        torch.zeros(idx.numel(), dtype=grad_out.dtype, device=idx.device),
        (out_features, in_features),
        check_invariants=False,  # built from sorted, unique, in-range indices
    )
    return torch.sparse.sampled_addmm(pattern, grad_out.T.contiguous(), x, beta=0.0).values()


# Elements of the gathered (tokens, chunk) operands materialised at once (16 MB in float32).
_GATHER_CHUNK = 1 << 22


def gather_sddmm(grad_out: Tensor, x: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The SDDMM as column gathers: for each index, sum over tokens of g[:, row] * x[:, col].

    No transposed copy of ``grad_out`` or ``x`` (what puts a floor under the CSR path's cost),
    so it wins at very low density; chunks of indices bound the gathered (tokens, chunk)
    operands to ``_GATHER_CHUNK`` elements.
    """
    in_features = shape[1]
    idx = indices.long()
    chunk = max(1, _GATHER_CHUNK // max(1, grad_out.shape[0]))
    out = torch.empty(idx.numel(), dtype=grad_out.dtype, device=grad_out.device)
    for start in range(0, idx.numel(), chunk):
        part = idx[start : start + chunk]
        rows = grad_out.index_select(1, part // in_features)
        cols = x.index_select(1, part % in_features)
        torch.sum(rows.mul_(cols), dim=0, out=out[start : start + chunk])
    return out


def line_sddmm(
    left: Tensor, right: Tensor, lines: Tensor, axis: int, gemm_dtype: torch.dtype | None = None
) -> Tensor:
    """The deltas' gradient when they are whole lines of the stored weight ``left.T @ right``.

    Rows (axis 0) are ``left[:, lines].T @ right``, columns (axis 1) ``left.T @ right[:,
    lines]``: one dense GEMM the size of the lines, flattened in the indices' (row-major)
    order. At LoRA r=64's count on SmolLM2 (18% of each matrix) it costs about a quarter of
    the full weight gradient, where an unstructured set costs all of it (`bench/sddmm.py`).
    """
    if axis == 0:
        return weight_grad(left.index_select(1, lines), right, gemm_dtype).view(-1)
    return weight_grad(left, right.index_select(1, lines), gemm_dtype).view(-1)


def sddmm(
    grad_out: Tensor,
    x: Tensor,
    indices: Tensor,
    shape: tuple[int, int],
    gemm_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sampled dense-dense matmul: (grad_out.T @ x).view(-1)[indices] without the dense product.

    ``grad_out`` is (tokens, out), ``x`` is (tokens, in), ``indices`` sorted flat row-major
    positions in an (out, in) matrix. Computed in float32 (float64 stays float64), by the path
    that is fastest at this density (`bench/sddmm.py`). With ``gemm_dtype=torch.bfloat16`` the
    dense path's GEMM runs in bfloat16 (see `weight_grad`) and is taken from
    ``BF16_DENSE_SDDMM_DENSITY`` up; the sparse paths below it stay exact.
    """
    out_features, in_features = shape
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    k = indices.numel()
    if k == 0:
        return grad_out.new_zeros(0, dtype=dtype)
    density = k / (out_features * in_features)
    if gemm_dtype == torch.bfloat16 and density >= BF16_DENSE_SDDMM_DENSITY:
        low = dense_sddmm(grad_out.to(gemm_dtype), x.to(gemm_dtype), indices, shape)
        return low.to(dtype)  # only the k gathered entries are widened
    g, xx = grad_out.to(dtype), x.to(dtype)
    if density >= DENSE_SDDMM_DENSITY:
        return dense_sddmm(g, xx, indices, shape)
    if density < GATHER_SDDMM_DENSITY:
        return gather_sddmm(g, xx, indices, shape)
    return csr_sddmm(g, xx, indices, shape)


def _linear_with_deltas(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    weight: WeightSource,
    bias: Tensor | None,
    transposed: bool,
    line_axis: int | None,
    token: object | None = None,
) -> tuple[Tensor, int | None]:
    """The op's forward: (output, W's base revision read under its lock, see `base_revision`)."""
    with weight_with_deltas(weight, indices, values, token, line_axis) as w:
        revision = base_revision(weight)  # under W's lock: no merge in between
        b = None if bias is None else bias.to(x.dtype)
        if transposed:  # exactly Conv1D's own computation
            x2 = x.reshape(-1, x.shape[-1])
            wt = w.to(x.dtype)
            out2 = x2 @ wt if b is None else torch.addmm(b, x2, wt)
            out = out2.view(*x.shape[:-1], out2.shape[-1])
        else:
            out = F.linear(x, w.to(x.dtype), b)
    return out, revision


def _deltas_grad(
    g2: Tensor,
    x2: Tensor,
    indices: Tensor,
    captures: Sequence[GradCapture],
    transposed: bool,
    line_axis: int | None,
    gemm: torch.dtype | None,
) -> Tensor:
    """The deltas' gradient from the 2-D output gradient and input, feeding the captures."""
    out_features, in_features = g2.shape[1], x2.shape[1]
    # Rows/columns of the stored weight: (out, in), or (in, out) when transposed.
    left, right = (x2, g2) if transposed else (g2, x2)
    stored = (in_features, out_features) if transposed else (out_features, in_features)
    dense = None
    if captures:
        if any(c.wants_dense_grad for c in captures):
            dense = weight_grad(left, right, gemm).float()
        input_ms = None
        if any(c.wants_input_stats for c in captures):
            ms = x2.float().square().mean(0)
            input_ms = ms[:, None] if transposed else ms[None, :]
        for capture in captures:
            capture(dense, input_ms, (left, right) if capture.wants_factors else None)
    if dense is not None:
        return dense.view(-1).index_select(0, indices)
    if line_axis is not None:
        lines = lines_of(indices, stored, line_axis)
        return line_sddmm(left, right, lines, line_axis, gemm)
    return sddmm(left, right, indices, stored, gemm)


class SparseDeltaLinearFn(torch.autograd.Function):
    """Autograd op for a linear layer with a sparse delta (see the module docstring).

    With ``transposed`` the weight is stored (in, out) and ``y = x @ W + b`` (transformers'
    ``Conv1D``): the indices then address the stored (in, out) layout, and the deltas'
    gradient is the SDDMM of ``x.T @ g`` instead of ``g.T @ x``.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        values: Tensor,
        indices: Tensor,
        weight: WeightSource,
        bias: Tensor | None,
        captures: Sequence[GradCapture],
        transposed: bool = False,
        grad_dtype: torch.dtype | None = None,
        line_axis: int | None = None,
    ) -> Tensor:
        ctx.token = object()  # lets backward find W as this forward left it (applied_deltas)
        out, ctx.base_revision = _linear_with_deltas(
            x, values, indices, weight, bias, transposed, line_axis, ctx.token
        )
        ctx.weight, ctx.has_bias, ctx.captures = weight, bias is not None, tuple(captures)
        ctx.transposed, ctx.grad_dtype, ctx.line_axis = transposed, grad_dtype, line_axis
        # (out_features, in_features) of the computation, whatever the storage layout.
        ctx.shape = (out.shape[-1], x.shape[-1])
        ctx.x_shape = x.shape
        # Only the deltas' gradient (and the captures) read x. Whole lines across the input
        # features (columns of an (out, in) weight, rows of a transposed one) read only those
        # features: up to a third of them, they are saved instead of x (at LoRA r=64's count
        # 18% of it, and q/k/v's shared input is no longer held; above a third, the copies of
        # q, k and v would outweigh the one x they share). With captures (selection windows),
        # or no gradient to compute for the values, x is saved whole, or not at all. With a
        # bfloat16 weight-gradient GEMM the copy is kept in bfloat16: half the bytes, and the
        # backward skips rounding it.
        lines = None
        if ctx.needs_input_grad[1] and line_axis == (0 if transposed else 1) and not ctx.captures:
            stored = (ctx.shape[1], ctx.shape[0]) if transposed else ctx.shape
            lines = lines_of(indices, stored, line_axis)
            if 3 * lines.numel() > ctx.shape[1]:
                lines = None
        ctx.input_lines = lines is not None
        saved_x = x if ctx.needs_input_grad[1] else None
        if lines is not None:
            saved_x = x.reshape(-1, x.shape[-1]).index_select(1, lines)
            # out's dtype is what grad_out will have, and what backward picks the GEMM by
            # (bf16 under autocast even for a float32 x)
            saved_x = saved_x.to(gemm_dtype_for(out.dtype, grad_dtype) or x.dtype)
        ctx.save_for_backward(saved_x, values, indices)
        return out

    @staticmethod
    @once_differentiable  # W is patched under no_grad: no second derivative through values
    def backward(ctx, grad_out: Tensor):
        x, values, indices = ctx.saved_tensors  # x: maybe only its lines' features, see forward
        out_features, in_features = ctx.shape
        g2 = grad_out.reshape(-1, out_features)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            with weight_with_deltas(ctx.weight, indices, values, ctx.token, ctx.line_axis) as w:
                if base_revision(ctx.weight) != ctx.base_revision:  # checked under W's lock
                    raise RuntimeError(
                        f"the base weight of shape {tuple(w.shape)} was merged or unmerged "
                        "between this forward pass and its backward pass, so the input "
                        "gradient would use another weight than the forward did. Call "
                        "merge()/unmerge() before the forward pass or after the backward pass."
                    )
                wt = w.to(g2.dtype)
                grad_x = (g2 @ (wt.T if ctx.transposed else wt)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gemm = gemm_dtype_for(g2.dtype, ctx.grad_dtype)
            if ctx.input_lines:  # x holds only the lines' input features: one GEMM
                left, right = (x, g2) if ctx.transposed else (g2, x)
                grad_values = weight_grad(left, right, gemm).view(-1)
            else:
                grad_values = _deltas_grad(
                    g2, x.reshape(-1, in_features), indices, ctx.captures, ctx.transposed,
                    ctx.line_axis, gemm,
                )
            grad_values = grad_values.to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0)
        return grad_x, grad_values, None, None, grad_bias, None, None, None, None


def sparse_delta_linear(
    x: Tensor,
    weight: WeightSource,
    bias: Tensor | None,
    indices: Tensor,
    values: Tensor,
    captures: Sequence[GradCapture] = (),
    transposed: bool = False,
    grad_dtype: torch.dtype | None = None,
    line_axis: int | None = None,
) -> Tensor:
    """``x @ (W + scatter(indices, values)).T + bias`` with a sparse-aware backward.

    ``indices`` must be sorted and unique flat positions in W's (out, in) row-major layout.
    Each capture in ``captures`` (only the selector's statistics windows pass any) is called in
    backward with what it asks for: the dense float32 gradient of the full weight, the mean
    square of each input feature (see `GradCapture`).

    With ``transposed=True``, W is stored (in, out) and the op computes ``x @ (W + delta) +
    bias`` (transformers' ``Conv1D``); ``indices`` and the captured gradient then refer to
    the stored (in, out) layout.

    ``grad_dtype`` chooses the GEMM behind the deltas' gradient and the captures' dense
    gradient (`gemm_dtype_for`): None (auto) runs it in bfloat16 when ``x`` is bfloat16 and
    exactly otherwise, ``torch.bfloat16`` always in bfloat16, ``torch.float32`` always
    exactly. The forward and the input gradient do not depend on it.

    ``line_axis`` (0 or 1) declares that ``indices`` are whole rows or whole columns of the
    stored weight (`SpielConfig.structure`): the weight is then patched line by line and the
    deltas' gradient is one small dense GEMM (`line_sddmm`). Wrong for any other index set.
    """
    if not torch.is_grad_enabled() or not (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    ):  # evaluation, generation: no graph to record, so no autograd.Function call to pay for
        return _linear_with_deltas(x, values, indices, weight, bias, bool(transposed), line_axis)[0]
    return SparseDeltaLinearFn.apply(
        x, values, indices, weight, bias, captures, bool(transposed), grad_dtype, line_axis
    )


def _renorm_rows(rows: Tensor, max_norm: float, norm_type: float) -> Tensor:
    """Rows scaled to norm at most ``max_norm``, as ``F.embedding(..., max_norm=...)`` does.

    Torch renormalises the looked-up rows of the weight in place, under no_grad, before the
    lookup; here the looked-up copies are scaled instead, so the frozen weight never changes.
    As in torch, the scale is a constant for autograd.
    """
    norms = rows.norm(p=norm_type, dim=-1, keepdim=True)
    scale = torch.where(
        norms > max_norm, max_norm / (norms.double() + 1e-7), torch.ones_like(norms.double())
    )
    return rows * scale.to(rows.dtype)


class SparseDeltaEmbeddingFn(torch.autograd.Function):
    """Autograd op for an embedding lookup in W + scatter(indices, values).

    The deltas' gradient is built from the token ids and the output gradient only: the
    gradient rows of the ids in the batch are summed into a (unique ids, dim) buffer and
    gathered at the active indices. A dense (num_embeddings, dim) gradient is built only
    when a capture (the selector's AG window) asks for it.
    """

    @staticmethod
    def forward(
        ctx,
        ids: Tensor,
        values: Tensor,
        indices: Tensor,
        weight: WeightSource,
        captures: Sequence[GradCapture],
        padding_idx: int | None,
        max_norm: float | None,
        norm_type: float,
        scale_grad_by_freq: bool,
        line_axis: int | None = None,
    ) -> Tensor:
        with weight_with_deltas(weight, indices, values, line_axis=line_axis) as w:
            out = F.embedding(ids, w)  # a fresh tensor: the rows are copied before the restore
            ctx.shape = tuple(w.shape)
        if max_norm is not None:
            out = _renorm_rows(out, max_norm, norm_type)
        ctx.save_for_backward(ids, values, indices)
        ctx.captures = tuple(captures)
        num = ctx.shape[0]
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        ids, values, indices = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[1]:
            num, dim = ctx.shape
            dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            g2 = grad_out.reshape(-1, dim).to(dtype)
            rows, inverse, counts = torch.unique(
                ids.reshape(-1).long(), sorted=True, return_inverse=True, return_counts=True
            )
            row_grad = torch.zeros(rows.numel(), dim, dtype=dtype, device=g2.device)
            row_grad.index_add_(0, inverse, g2)
            if ctx.scale_grad_by_freq:
                row_grad /= counts.unsqueeze(1).to(dtype)
            if ctx.padding_idx is not None:
                row_grad[rows == ctx.padding_idx] = 0
            dense = None
            if any(c.wants_dense_grad or c.wants_factors for c in ctx.captures):
                dense = torch.zeros(num, dim, dtype=torch.float32, device=g2.device)
                dense[rows] = row_grad.float()
            for capture in ctx.captures:
                capture(dense, None, None)
            if dense is not None:
                grad_values = dense.view(-1).index_select(0, indices)
            else:
                idx = indices.long()
                row_of, col_of = idx // dim, idx % dim
                grad_values = torch.zeros(idx.numel(), dtype=dtype, device=g2.device)
                if rows.numel():
                    pos = torch.searchsorted(rows, row_of).clamp_(max=rows.numel() - 1)
                    hit = rows[pos] == row_of
                    grad_values[hit] = row_grad[pos[hit], col_of[hit]]
            grad_values = grad_values.to(values.dtype)
        return None, grad_values, None, None, None, None, None, None, None, None


def sparse_delta_embedding(
    ids: Tensor,
    weight: WeightSource,
    indices: Tensor,
    values: Tensor,
    captures: Sequence[GradCapture] = (),
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    line_axis: int | None = None,
) -> Tensor:
    """``F.embedding(ids, W + scatter(indices, values), ...)`` with a row-sparse backward.

    ``indices`` are sorted unique flat positions in W's (num_embeddings, dim) layout. The
    deltas' gradient matches autograd through ``F.embedding`` on the dense ``W + delta``:
    nothing flows to ``padding_idx``'s row, ``scale_grad_by_freq`` divides by each id's count
    in the batch, and ``max_norm`` rescales the looked-up rows (without modifying W, unlike
    ``nn.Embedding``), the scale being a constant for autograd as in torch. ``line_axis``
    (0 or 1) declares whole rows or columns of W, which are then patched line by line.
    """
    return SparseDeltaEmbeddingFn.apply(
        ids,
        values,
        indices,
        weight,
        captures,
        padding_idx,
        max_norm,
        norm_type,
        scale_grad_by_freq,
        line_axis,
    )
