"""Optimizers for sparse deltas whose index sets change during training.

Both keep their state in float32 whatever the deltas' dtype, and both implement
``reindex(param, source, init)``: after a drop-and-regrow update, slot ``i`` of ``param``
takes the state of old slot ``source[i]``, or a fresh state where ``source[i] == -1``.
`SparseAdamW8bit` is SparseAdamW with its moments stored blockwise in 8 bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .layer import SparseDelta
from .ops import scatter_index


def _remap(state: Tensor, source: Tensor, init: Tensor | None = None) -> Tensor:
    new = torch.zeros_like(state) if init is None else init.to(state).clone()
    kept = source >= 0
    new[kept] = state[source[kept]]
    return new


def _write(param: Tensor, update_fp32: Tensor) -> None:
    """Store a float32 result into a (possibly lower-precision) parameter."""
    if param.dtype == torch.float32:
        param.copy_(update_fp32)
    else:
        param.copy_(update_fp32.to(param.dtype))


class _KeepStateDtype:
    """Keep our state's dtypes on `load_state_dict`.

    torch casts loaded floating-point state to the parameter's dtype; ours is float32 (or uint8
    codes with float32 scales) on purpose, even for bf16 deltas, so put the saved tensors back.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        params = [p for group in self.param_groups for p in group["params"]]  # type: ignore[attr-defined]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param, saved_id in zip(params, saved_ids, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and key != "step":
                    self.state[param][key] = value.to(param.device, copy=True)  # type: ignore[attr-defined]


class SparseAdamW(_KeepStateDtype, torch.optim.Optimizer):
    """AdamW for sparse deltas.

    Decoupled weight decay shrinks each delta toward zero, i.e. pulls the fine-tuned weight
    toward the pretrained one. Moments are float32 per slot and follow their slot through
    `reindex`; regrown slots start at zero, or at the values the selector supplies.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid SparseAdamW settings: lr={lr}, eps={eps}, wd={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SparseAdamW betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    # How the moments are kept: float32 tensors here; SparseAdamW8bit overrides these two.
    def _load_moments(self, state: dict, param: Tensor) -> tuple[Tensor, Tensor]:
        if not state:
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                exp_avg, exp_avg_sq = self._load_moments(state, p)
                state["step"] = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
                step = state["step"].item()
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
                value = p.float()
                if wd:
                    value.mul_(1 - lr * wd)
                value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
                _write(p, value)
                self._store_moments(state, exp_avg, exp_avg_sq)
        return loss

    @torch.no_grad()
    def reindex(
        self, param: Tensor, source: Tensor, init: Mapping[str, Tensor] | None = None
    ) -> None:
        state = self.state.get(param)
        if not state:
            return
        init = init or {}
        exp_avg, exp_avg_sq = self._load_moments(state, param)
        self._store_moments(
            state,
            _remap(exp_avg, source, init.get("exp_avg")),
            _remap(exp_avg_sq, source, init.get("exp_avg_sq")),
        )


def _covered_max_(acc: Tensor, positions: Tensor, nu: Tensor) -> None:
    """``acc[i] = max(nu[positions == i])`` where ``i`` occurs in ``positions``; others keep theirs.

    As ``scatter_reduce_(..., include_self=False)``, but that (like zeroing the covered entries
    with ``index_fill_``) costs a second pass over all of ``positions``; here the scatter goes
    into a -1 sentinel (nu >= 0) and the keep-or-take is over ``acc``'s few entries.
    """
    new = torch.full_like(acc, -1.0).scatter_reduce_(0, scatter_index(positions), nu, "amax")
    acc.copy_(torch.where(new < 0, acc, new))  # NaN (a NaN gradient) is taken, as before


def _line_nu_(row_acc: Tensor, col_acc: Tensor, grad: Tensor, delta: SparseDelta) -> Tensor:
    """SM3's nu for a delta of whole lines, updating both accumulators as `_covered_max_` does.

    The deltas form a dense (rows, cols) block of the lines by every position across them, so
    the row and column maxima are plain reductions: no index arithmetic, gathers or scatters.
    """
    if grad.numel() == 0:
        return grad
    lines = delta.lines()
    if delta.line_axis == 0:  # |lines| x cols, every column covered
        g = grad.view(-1, delta.shape[1])
        nu = torch.minimum(row_acc[lines, None], col_acc[None, :]).addcmul_(g, g)
        row_acc[lines] = nu.amax(1)
        col_acc.copy_(nu.amax(0))
    else:  # rows x |lines|, every row covered
        g = grad.view(delta.shape[0], -1)
        nu = torch.minimum(row_acc[:, None], col_acc[None, lines]).addcmul_(g, g)
        row_acc.copy_(nu.amax(1))
        col_acc[lines] = nu.amax(0)
    return nu.view(-1)


class SM3(_KeepStateDtype, torch.optim.Optimizer):
    """SM3 (Anil et al., 2019) with O(rows + cols) second-moment memory for sparse deltas.

    For a delta at (i, j): nu = min(row[i], col[j]) + g^2, update = g / (sqrt(nu) + eps); then
    row[i] and col[j] become the max of nu over the active entries of that row/column. Rows
    and columns with no active entry keep their value. ``row * col`` is what SpIEL-MA ranks
    inactive positions by. Parameters that are not sparse deltas get a per-element
    accumulator (Adagrad). Optional momentum (a per-slot float32 buffer) is remapped on
    regrowth; decoupled weight decay pulls deltas toward zero.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        sparse_deltas: Mapping[nn.Parameter, SparseDelta] | None = None,
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(
                f"invalid SM3 settings: lr={lr}, momentum={momentum}, wd={weight_decay}"
            )
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))
        # Which parameter is which delta: read at each step, since indices change. Kept out
        # of param_groups so that state_dict() stays plain tensors.
        self.sparse_deltas: dict[nn.Parameter, SparseDelta] = dict(sparse_deltas or {})

    def _init_state(self, p: Tensor, delta: SparseDelta | None, momentum: float) -> dict:
        state = self.state[p]
        if delta is not None:
            rows, cols = delta.shape
            state["row_acc"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
            state["col_acc"] = torch.zeros(cols, dtype=torch.float32, device=p.device)
        else:
            state["acc"] = torch.zeros_like(p, dtype=torch.float32)
        if momentum:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eps, wd = (
                group["lr"],
                group["momentum"],
                group["eps"],
                group["weight_decay"],
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                delta = self.sparse_deltas.get(p)
                state = self.state[p] or self._init_state(p, delta, momentum)
                if delta is not None and delta.line_axis is not None:
                    nu = _line_nu_(state["row_acc"], state["col_acc"], grad, delta)
                elif delta is not None:
                    in_features = delta.shape[1]
                    # In the indices' own (int32) dtype: half the memory traffic of int64.
                    rows, cols = delta.indices // in_features, delta.indices % in_features
                    row_acc, col_acc = state["row_acc"], state["col_acc"]
                    nu = torch.minimum(row_acc.index_select(0, rows), col_acc.index_select(0, cols)).addcmul_(grad, grad)
                    _covered_max_(row_acc, rows, nu)
                    _covered_max_(col_acc, cols, nu)
                else:
                    nu = state["acc"].addcmul_(grad, grad)
                # A delta's nu is a fresh tensor, used up here: its square root goes in place.
                # (At LoRA-like budgets these are the step's largest buffers: every pass and
                # every fresh allocation of them shows in the step time.)
                denom = (nu.sqrt() if delta is None else nu.sqrt_()).add_(eps)
                value = p if p.dtype == torch.float32 else p.float()
                if wd:
                    value.mul_(1 - lr * wd)
                if momentum:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).addcdiv_(grad, denom, value=1 - momentum)
                    value.add_(buf, alpha=-lr)
                else:
                    value.addcdiv_(grad, denom, value=-lr)
                if value is not p:
                    _write(p, value)
        return loss

    def row_col_scores(self, param: Tensor) -> tuple[Tensor, Tensor] | None:
        """The (row, col) accumulators of a delta parameter, or None before its first step."""
        state = self.state.get(param)
        if not state or "row_acc" not in state:
            return None
        return state["row_acc"], state["col_acc"]

    @torch.no_grad()
    def reindex(
        self, param: Tensor, source: Tensor, init: Mapping[str, Tensor] | None = None
    ) -> None:
        state = self.state.get(param)
        if state and "momentum_buffer" in state:
            state["momentum_buffer"] = _remap(state["momentum_buffer"], source)


# bitsandbytes' dynamic (tree) quantization maps, as its 8-bit optimizers use them.
_DYNAMIC_MAPS: dict[bool, Tensor] = {}


def _dynamic_map(signed: bool, device: torch.device) -> Tensor:
    """256 sorted values in [-1, 1] (signed) or [0, 1]: ``bnb.functional.create_dynamic_map``."""
    if signed not in _DYNAMIC_MAPS:
        from bitsandbytes.functional import create_dynamic_map

        _DYNAMIC_MAPS[signed] = create_dynamic_map(signed=signed).float().cpu()
    return _DYNAMIC_MAPS[signed].to(device)


def quantize_blockwise_8bit(x: Tensor, signed: bool, block_size: int) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of ``x``: (uint8 codes, float32 absmax per block).

    Same format as ``bnb.functional.quantize_blockwise`` with bitsandbytes' dynamic map (the
    codes can be read back with ``bnb.functional.dequantize_blockwise``), but each value is
    rounded to the *nearest* map entry; bitsandbytes 0.50's CPU kernel does not (it stores 0
    as about 2e-5 * absmax), which would make a regrown slot's state nonzero.
    """
    code = _dynamic_map(signed, x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = flat.new_zeros(blocks * block_size)
    padded[:n] = flat
    padded = padded.view(blocks, block_size)
    absmax = padded.abs().amax(dim=1) if blocks else flat.new_zeros(0)
    scale = absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    scaled = (padded / scale).view(-1)[:n]
    codes = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: Tensor, absmax: Tensor, signed: bool, block_size: int
) -> Tensor:
    """Float32 values of ``quantize_blockwise_8bit``'s output."""
    code = _dynamic_map(signed, codes.device)
    scale = absmax.float().repeat_interleave(block_size)[: codes.numel()]
    return code[codes.long()] * scale


class SparseAdamW8bit(SparseAdamW):
    """SparseAdamW with both moments stored blockwise in 8 bits (as bitsandbytes' AdamW8bit).

    Each moment is kept as uint8 codes into bitsandbytes' dynamic quantization map (signed
    for ``exp_avg``, unsigned for ``exp_avg_sq``) plus a float32 absmax per ``block_size``
    slots: about 1.02 bytes per moment and delta instead of 4. A step dequantizes, applies
    SparseAdamW's float32 update, and requantizes. `reindex` dequantizes, remaps the slots as
    SparseAdamW does and requantizes: kept slots keep their state (up to requantization in
    their new blocks), regrown slots start at exactly zero or at their (quantized) seeds.
    `moments(param)` returns the dequantized moments.
    """

    _MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        block_size: int = 256,
    ) -> None:
        if int(block_size) < 1:
            raise ValueError(f"SparseAdamW8bit block_size must be >= 1, got {block_size}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.block_size = int(block_size)
        # In the param groups, so that state_dict() records the layout the codes were made with.
        self.defaults["block_size"] = self.block_size
        for group in self.param_groups:
            group["block_size"] = self.block_size

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, keeping the saved ``block_size``: the saved codes only decode with their own."""
        saved = {g["block_size"] for g in state_dict["param_groups"] if "block_size" in g}
        if len(saved) > 1:
            raise ValueError(f"SparseAdamW8bit state has param groups with different block sizes {saved}.")
        super().load_state_dict(state_dict)
        if saved:
            self.block_size = saved.pop()
        for group in self.param_groups:
            group["block_size"] = self.block_size

    def _load(self, state: dict, key: str, signed: bool) -> Tensor:
        return dequantize_blockwise_8bit(
            state[key], state[f"{key}_absmax"], signed, self.block_size
        )

    def _store(self, state: dict, key: str, value: Tensor, signed: bool) -> None:
        state[key], state[f"{key}_absmax"] = quantize_blockwise_8bit(value, signed, self.block_size)

    def moments(self, param: Tensor) -> dict[str, Tensor] | None:
        """The dequantized float32 moments of ``param``, or None before its first step."""
        state = self.state.get(param)
        if not state:
            return None
        return {key: self._load(state, key, signed) for key, signed in self._MOMENTS}

    def _load_moments(self, state: dict, param: Tensor) -> tuple[Tensor, Tensor]:
        if not state:
            return (torch.zeros_like(param, dtype=torch.float32),
                    torch.zeros_like(param, dtype=torch.float32))
        return (self._load(state, "exp_avg", True).view_as(param),
                self._load(state, "exp_avg_sq", False).view_as(param))

    def _store_moments(self, state: dict, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        self._store(state, "exp_avg", exp_avg, True)
        self._store(state, "exp_avg_sq", exp_avg_sq, False)
