"""Drop and regrow: the SpIEL index-selection step and its schedule.

Every ``reselection_steps`` optimizer steps, each matrix drops the fraction p of its active
indices with the smallest |delta| and regrows as many inactive ones:

* AG: by the |sum| of full-weight gradients accumulated (float32) over the
  ``accumulation_steps`` optimizer steps before the update, all micro-batches included. Only
  during those windows does backward compute a dense weight gradient. To bound memory, the
  sums are kept for a candidate set only: the ``max(k, 2 * n_regrow)`` eligible positions with
  the largest |gradient| in the window's first micro-batch (k = the matrix's number of
  deltas), i.e. 8 bytes per candidate (int32 position, float32 sum) while the window is
  open, and nothing outside it.
* MA: by ``row[i] * col[j]`` from SM3's accumulators, scored in row blocks so the transient
  memory stays below ``_SCORE_BLOCK`` elements whatever the matrix size.

With ``normalize_regrowth_by_input`` (the default for MA) each score is divided by the RMS of the
input feature the position multiplies (MA: by its mean square, SM3's accumulators being
squared), measured over the same window. A raw gradient score favours positions on loud input
features, and Adam moves every delta by about the learning rate, so a step there moves the
layer's output most: a gradient-chosen set then acts like a larger learning rate and trains
worse (bench/index_columns.py). |G_ij| / rms_j also ranks positions by the loss decrease a
per-weight Newton step would give, G_ij^2 / H_jj, taking the Gauss-Newton curvature as
proportional to the input's mean square.

With ``SpielConfig.structure`` (whole rows or columns), everything above counts whole lines:
each line is dropped by the norm of its deltas and regrown by the norm of its scores. AG keeps
whole candidate lines' gradient sums and takes the norm of the summed gradient (over the input
RMS if normalised). MA cannot use SM3's accumulators there (they know nothing of lines with no
active entry): its window sums each line's squared gradient instead, estimated from a few
random projections without the dense gradient (`LineEnergy`).

"Eligible" means not active before the update, except at a full reselection (p = 1), where
nothing is kept and every position may be chosen.

Under DDP every rank selects the same indices: see `spielft.distributed` (AG statistics
averaged over ranks, a fingerprint check of the indices at start-up and after each update,
sharded engines refused).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import distributed
from .layer import SparseDelta, index_dtype, line_length, line_members, line_positions

if TYPE_CHECKING:
    from .model import SpielModel

logger = logging.getLogger(__name__)

_SCORE_BLOCK = 1 << 22  # elements of row*col scores materialised at once (16 MB in float32)


def reselection_rate(step: int, total_steps: int, initial_rate: float, policy: str) -> float:
    """The fraction p of active indices dropped at ``step``: decays from initial_rate to 0."""
    progress = min(max(step / total_steps, 0.0), 1.0)
    if policy == "linear":
        return initial_rate * (1.0 - progress)
    if policy == "cosine":
        return initial_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown reselection_rate_policy {policy!r}")


def _masked_topk(scores: Tensor, n: int) -> Tensor:
    """Positions of the n largest finite scores (fewer if fewer are finite)."""
    n = min(n, scores.numel())
    values, positions = torch.topk(scores, n, sorted=False)
    return positions[values > float("-inf")]


def top_outer_product(row: Tensor, col: Tensor, n: int, exclude: Tensor | None) -> Tensor:
    """Flat positions of the n largest ``row[i] * col[j]``, skipping the sorted ``exclude``.

    Works in blocks of rows so that at most ``_SCORE_BLOCK`` scores exist at once.
    """
    rows, cols = row.numel(), col.numel()
    block_rows = max(1, _SCORE_BLOCK // cols)
    best_scores = row.new_empty(0)
    best_positions = torch.empty(0, dtype=torch.long, device=row.device)
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        scores = (row[r0:r1, None] * col[None, :]).view(-1)
        if exclude is not None and exclude.numel():
            lo, hi = torch.searchsorted(
                exclude, torch.tensor([r0 * cols, r1 * cols], device=exclude.device)
            ).tolist()
            scores[exclude[lo:hi] - r0 * cols] = float("-inf")
        top = _masked_topk(scores, n)
        best_scores = torch.cat([best_scores, scores[top]])
        best_positions = torch.cat([best_positions, top + r0 * cols])
        if best_scores.numel() > n:
            keep = torch.topk(best_scores, n, sorted=False).indices
            best_scores, best_positions = best_scores[keep], best_positions[keep]
    return best_positions


def num_units(delta: SparseDelta) -> int:
    """What drop and regrow count in ``delta``: whole lines when structured, else entries."""
    k = delta.values.numel()
    return k if delta.line_axis is None else k // line_length(delta.shape, delta.line_axis)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (and similar) wrappers.

    Wrappers hide ``reindex``/``row_col_scores``; they expose the real one as ``.optimizer``.
    """
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "reindex") and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


class InputStatistics:
    """Mean square of one matrix's input features over a window (called from backward).

    Kept as a (1, in) or, for a transposed (Conv1D) weight, (in, 1) tensor that broadcasts
    against the stored weight. Embeddings pass no statistics (one-hot inputs have no scale):
    their scores stay unnormalised.
    """

    wants_dense_grad = False
    wants_input_stats = True
    wants_factors = False

    def __init__(self) -> None:
        self.ms_sum: Tensor | None = None
        self.count = 0

    def __call__(self, dense_grad: Tensor | None, input_ms: Tensor | None, factors=None) -> None:
        self.add(input_ms)

    @property
    def started(self) -> bool:
        return self.count > 0

    def add(self, input_ms: Tensor | None) -> None:
        if input_ms is not None:
            self.ms_sum = input_ms.clone() if self.ms_sum is None else self.ms_sum + input_ms
        self.count += 1

    def mean_square(self) -> Tensor | None:
        """Each input feature's mean square over the window (None for embeddings)."""
        return None if self.ms_sum is None else (self.ms_sum / self.count).clamp_(min=1e-30)

    def mean_square_at(self, positions: Tensor, shape: tuple[int, int]) -> Tensor | None:
        """The mean square of the input feature each flat position of ``shape`` multiplies."""
        ms = self.mean_square()
        if ms is None:
            return None
        features = positions % shape[1] if ms.shape[0] == 1 else positions // shape[1]
        return ms.view(-1)[features]

    def state_dict(self) -> dict[str, Any]:
        return {"ms_sum": self.ms_sum, "input_count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ms_sum, self.count = state.get("ms_sum"), int(state.get("input_count", 0))


class GradientAccumulator:
    """AG statistics of one matrix during an accumulation window (called from backward).

    With ``inputs`` (input-normalised regrowth) it also keeps the window's input statistics,
    and ranks the first micro-batch's candidates by |gradient| / input RMS as well.

    With ``loss_scale`` (fp16 with a GradScaler: it returns the scale tensor, or None when
    the backward is unscaled) each contribution is divided by the scale it was computed
    under, and a contribution that is not finite (an overflow: GradScaler skips that step
    too) is dropped, so one overflow cannot turn the window's sums into inf/NaN.
    """

    wants_dense_grad = True
    wants_factors = False

    def __init__(
        self,
        delta: SparseDelta,
        num_candidates: int,
        exclude_active: bool,
        inputs: InputStatistics | None = None,
        group=None,
        loss_scale: Callable[[], Tensor | None] | None = None,
    ):
        self.delta = delta
        self.num_candidates = num_candidates
        self.exclude_active = exclude_active
        self.inputs = inputs
        self.group = group
        self.loss_scale = loss_scale
        self.candidates: Tensor | None = None
        self.grad_sum: Tensor | None = None
        self.count = 0

    @property
    def wants_input_stats(self) -> bool:
        return self.inputs is not None

    def __call__(self, dense_grad: Tensor | None, input_ms: Tensor | None, factors=None) -> None:
        assert dense_grad is not None
        axis = self.delta.line_axis
        # What a candidate is: an entry (the flat gradient) or a line (a row of this view).
        units = dense_grad.reshape(-1) if axis is None else (dense_grad if axis == 0 else dense_grad.T)
        scale = self.loss_scale() if self.loss_scale is not None else None
        if self.candidates is None:
            if self.group is None:
                ranking = dense_grad.abs()  # a fresh tensor: the caller still needs dense_grad
            else:
                # Under DDP this is the rank's local gradient: rank by |mean over ranks|, the
                # global-batch gradient (identical on every rank, so the candidates are too).
                ranking = distributed.all_reduce_mean_(dense_grad.clone(), self.group).abs_()
            if self.inputs is not None and input_ms is not None:
                ms = input_ms if self.group is None else distributed.all_reduce_mean_(
                    input_ms.clone(), self.group
                )
                ranking /= ms.clamp(min=1e-30).sqrt_()
            if scale is not None and not bool(ranking.isfinite().all()):
                # Overflow: wait for a finite micro-batch to pick candidates. Decided on the
                # rank-averaged ranking under DDP, so every rank skips together.
                return
            if axis is None:
                ranking, active = ranking.view(-1), self.delta.indices.long()
            else:  # a line by the norm of its (normalised) gradient
                ranking, active = ranking.square_().sum(1 - axis), self.delta.lines()
            if self.exclude_active:
                ranking.index_fill_(0, active, float("-inf"))
            # int32 where the matrix allows it, as the indices: 8 bytes a candidate, not 12.
            chosen = _masked_topk(ranking, self.num_candidates).sort().values
            self.candidates = chosen.to(index_dtype(dense_grad.numel()))
            self.grad_sum = torch.zeros(
                (self.candidates.numel(), *units.shape[1:]), dtype=torch.float32,
                device=units.device,
            )
        contribution = units.index_select(0, self.candidates).float()
        if scale is not None:  # no host sync: a non-finite contribution adds zeros
            contribution = contribution / scale
            contribution = torch.where(contribution.isfinite().all(), contribution, 0.0)
        self.grad_sum += contribution
        self.count += 1  # every backward, kept or dropped: ranks compare counts
        if self.inputs is not None:
            self.inputs.add(input_ms)

    def scores(self) -> Tensor:
        """|summed gradient| of each candidate, over its input feature's RMS if normalised.

        A line scores the norm of its entries' scores.
        """
        assert self.candidates is not None and self.grad_sum is not None
        scores = self.grad_sum.abs()
        axis = self.delta.line_axis
        if self.inputs is not None:
            positions = self.candidates.long()
            if axis is not None:
                positions = line_members(positions, self.delta.shape, axis)
            ms = self.inputs.mean_square_at(positions, self.delta.shape)
            if ms is not None:
                scores /= ms.sqrt_()
        return scores if axis is None else scores.norm(dim=1)

    @property
    def started(self) -> bool:
        return self.candidates is not None

    def state_dict(self) -> dict[str, Any]:
        state = {"candidates": self.candidates, "grad_sum": self.grad_sum, "count": self.count}
        if self.inputs is not None:
            state.update(self.inputs.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.candidates, self.grad_sum, self.count = (
            state["candidates"],
            state["grad_sum"],
            int(state["count"]),
        )
        if self.inputs is not None:
            self.inputs.load_state_dict(state)


class LineEnergy:
    """MA's statistic for whole lines: each line's squared gradient, summed over the window.

    SM3's row and column accumulators only cover lines with active entries, so they cannot
    rank the inactive lines a structured delta regrows from. Instead each backward adds every
    line's ||G_line||^2, estimated from ``probes`` random projections of the gradient G =
    left.T @ right without forming it: G @ z = left.T @ (right @ z) for rows, z^T @ G =
    (left @ z)^T @ right for columns. For z ~ N(0, I), E[(G_i . z)^2] = ||G_i||^2; the relative
    error is about sqrt(2 / probes) per backward, at about ``probes * (1/out + 1/in)`` of the
    weight-gradient GEMM's cost (3-4% on SmolLM2). Summed over the window, a line's energy is
    what an Adagrad accumulator of its entries would sum to. With ``normalize``, G's columns are
    first divided by the RMS of the input feature they multiply in that backward (``|G_ij| /
    rms_j``; unstructured regrowth divides by the window's RMS instead). Embeddings hand over
    their (cheap) dense gradient, and get exact energies, unnormalised. ``loss_scale`` is as for
    `GradientAccumulator`: energies are unscaled, and an overflowed backward adds nothing.
    """

    wants_dense_grad = False
    wants_factors = True

    def __init__(
        self,
        delta: SparseDelta,
        normalize: bool,
        seed: int,
        probes: int = 16,
        loss_scale: Callable[[], Tensor | None] | None = None,
    ) -> None:
        assert delta.line_axis is not None
        self.axis, self.probes = delta.line_axis, probes
        self.wants_input_stats = normalize
        self.loss_scale = loss_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.energy: Tensor | None = None
        self.count = 0

    def __call__(
        self, dense_grad: Tensor | None, input_ms: Tensor | None, factors: tuple[Tensor, Tensor] | None
    ) -> None:
        if factors is None:  # an embedding: the dense gradient is given
            assert dense_grad is not None
            energy = dense_grad.square().sum(1 - self.axis)
        else:
            left, right = factors[0].float(), factors[1].float()
            if input_ms is not None:  # input features are the stored columns (1, in) or rows
                scale = input_ms.clamp(min=1e-30).rsqrt()
                if scale.shape[0] == 1:
                    right = right * scale
                else:
                    left = left * scale.view(1, -1)
            if self.axis == 0:
                z = torch.randn(right.shape[1], self.probes, generator=self.generator)
                projected = left.T @ (right @ z.to(right.device))  # (rows, probes)
            else:
                z = torch.randn(left.shape[1], self.probes, generator=self.generator)
                projected = ((left @ z.to(left.device)).T @ right).T  # (cols, probes)
            energy = projected.square().mean(1)
        scale = self.loss_scale() if self.loss_scale is not None else None
        if scale is not None:  # no host sync: an overflowed backward adds zeros
            energy = energy / scale.float().square()
            energy = torch.where(energy.isfinite().all(), energy, 0.0)
        self.energy = energy if self.energy is None else self.energy + energy
        self.count += 1

    @property
    def started(self) -> bool:
        return self.count > 0

    def scores(self) -> Tensor:
        assert self.energy is not None
        return self.energy

    def state_dict(self) -> dict[str, Any]:
        return {"energy": self.energy, "count": self.count, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.energy, self.count = state["energy"], int(state["count"])
        self.generator.set_state(state["rng"].cpu())  # a CPU generator, whatever the device


class SpielSelector:
    """Runs the drop-and-regrow schedule of one adapter; call `step()` after each optimizer step.

    Holds no hooks: during its statistics windows it sets ``SparseDelta.grad_capture``, and
    clears it outside them and after ``total_steps``. ``state_dict()`` makes a resumed run
    continue the schedule exactly (no restart at step 0, no second full reselection).

    ``optimizer`` may be accelerate's ``AcceleratedOptimizer``: the selector then uses the
    optimizer inside it, and its ``step()`` counts only the micro-batches where accelerate
    really steps (``accelerator.accumulate()`` makes the others no-ops), so calling it after
    every ``optimizer.step()`` keeps the schedule in optimizer steps. ``grad_scaler`` (default:
    the wrapper's ``scaler``; settable later as ``selector.grad_scaler``) is the fp16
    ``GradScaler`` whose scale AG's gradient sums (and MA's line energies) must be divided by.
    """

    def __init__(
        self,
        model: SpielModel,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        adapter_name: str | None = None,
        grad_scaler: Any | None = None,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.adapter_name = adapter_name or model.active_adapter
        self.config = model.peft_config[self.adapter_name]
        self.optimizer = unwrap_optimizer(optimizer)
        # accelerate's GradientState: sync_gradients is False on the micro-batches whose
        # optimizer.step() accelerate skips. Only read through a wrapper, never for a bare one.
        wrapped = self.optimizer is not optimizer
        self._gradient_state = getattr(optimizer, "gradient_state", None) if wrapped else None
        if grad_scaler is None and wrapped:
            grad_scaler = getattr(optimizer, "scaler", None)
        self.grad_scaler = grad_scaler
        self.total_steps = int(total_steps)
        self.deltas: dict[str, SparseDelta] = model.sparse_deltas(self.adapter_name)
        ma = self.config.regrowth == "ma"
        needed = ("reindex", "row_col_scores") if ma else ("reindex",)
        if not all(hasattr(self.optimizer, attr) for attr in needed):
            raise ValueError(
                f"regrowth={self.config.regrowth!r} needs spielft's {'SM3' if ma else 'SparseAdamW'}"
                f" (it remaps its per-slot state when indices change"
                f"{'; its row/column accumulators score the positions' if ma else ''}), but the "
                f"optimizer is {type(self.optimizer).__name__}; create it with "
                "model.create_optimizer()."
            )
        self.step_count = 0
        self.num_updates = 0
        self.accumulators: dict[str, GradientAccumulator] = {}
        # Under DDP (torch.distributed initialised, several ranks): our own process group, so
        # our collectives never interleave with DDP's gradient buckets. Creating it, refusing
        # sharded engines and the start-up check are collective: every rank builds a selector.
        self.group = distributed.selection_group()
        distributed.refuse_unsupported(model, optimizer, self.deltas, group=self.group)
        self._arm()
        if self.group is not None:
            self._check_consistent(at_start=True)

    def _loss_scale(self) -> Tensor | None:
        """The GradScaler's current scale as a tensor (no host sync), or None if unscaled."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        if hasattr(scaler, "_scale"):  # torch's GradScaler: None until its first scale()
            return scaler._scale
        return torch.tensor(float(scaler.get_scale()))

    # -- schedule ------------------------------------------------------------------------------
    def next_update_step(self, after: int) -> int | None:
        """The first update step strictly after ``after``, or None if the schedule is over."""
        every = self.config.reselection_steps
        first = self.config.first_reselection_step or every
        step = first if after < first else first + ((after - first) // every + 1) * every
        return step if step < self.total_steps else None

    def updates_through(self, step: int) -> int:
        """How many updates the schedule runs at steps 1..``step`` (to resume from a count)."""
        count, upcoming = 0, self.next_update_step(0)
        while upcoming is not None and upcoming <= step:
            count, upcoming = count + 1, self.next_update_step(upcoming)
        return count

    def rate_at(self, step: int) -> float:
        if self.num_updates == 0 and self.config.full_first_reselection:
            return 1.0
        return reselection_rate(
            step,
            self.total_steps,
            self.config.initial_reselection_rate,
            self.config.reselection_rate_policy,
        )

    def _num_to_regrow(self, delta: SparseDelta, rate: float) -> int:
        """How many entries (lines, when structured) the update drops and regrows."""
        units = num_units(delta)
        return units if rate >= 1.0 else int(rate * units)

    @property
    def _needs_window(self) -> bool:
        """AG always collects statistics before an update; MA its input statistics, or its
        lines' energies for whole lines."""
        return (
            self.config.regrowth == "ag"
            or self.config.normalize_regrowth_by_input
            or self.config.structure != "unstructured"
        )

    def _arm(self) -> None:
        """Turn statistics capture on for the next step iff it is in a window."""
        upcoming = self.next_update_step(self.step_count)
        in_window = (
            self._needs_window
            and upcoming is not None
            and upcoming - (self.step_count + 1) < self.config.accumulation_steps
        )
        if not in_window:
            for delta in self.deltas.values():
                delta.grad_capture = None
            self.accumulators.clear()
            return
        rate = self.rate_at(upcoming)
        full = rate >= 1.0
        for name, delta in self.deltas.items():
            n = self._num_to_regrow(delta, rate)
            if n == 0:
                delta.grad_capture = None
                continue
            if name not in self.accumulators:
                self.accumulators[name] = self._new_capture(name, delta, n, full)
            delta.grad_capture = self.accumulators[name]

    def _new_capture(
        self, name: str, delta: SparseDelta, n: int, full: bool
    ) -> GradientAccumulator | InputStatistics | LineEnergy:
        normalize = self.config.normalize_regrowth_by_input
        if self.config.regrowth == "ma" and delta.line_axis is not None:
            # A seed per matrix and window, the same on every rank and in every run.
            seed = self.config.seed + 1_000_003 * self.step_count + zlib.crc32(name.encode())
            return LineEnergy(delta, normalize, seed, loss_scale=self._loss_scale)
        inputs = InputStatistics() if normalize else None
        if self.config.regrowth == "ma":
            assert inputs is not None
            return inputs
        k = num_units(delta)
        total = delta.numel_dense if delta.line_axis is None else delta.shape[delta.line_axis]
        eligible = total - (0 if full else k)
        return GradientAccumulator(
            delta, min(eligible, max(k, 2 * n)), exclude_active=not full, inputs=inputs,
            group=self.group, loss_scale=self._loss_scale,
        )

    def close(self) -> None:
        """Stop selecting: detach every capture and free the statistics."""
        self.total_steps = min(self.total_steps, self.step_count)
        self._arm()

    # -- the update ----------------------------------------------------------------------------
    def step(self) -> dict[str, float] | None:
        """Count one optimizer step; run an update when one is due. Returns its statistics.

        Under ``accelerator.accumulate()``, a no-op on the micro-batches where accelerate
        skipped ``optimizer.step()``.
        """
        if self._gradient_state is not None and not self._gradient_state.sync_gradients:
            return None
        self.step_count += 1
        result = None
        if self.next_update_step(self.step_count - 1) == self.step_count:
            result = self.update()
        self._arm()
        return result

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Drop and regrow every matrix of the adapter now."""
        start = time.perf_counter()
        rate = self.rate_at(self.step_count)
        changed = skipped = 0
        if self.group is not None and self._needs_window:
            self._reduce_statistics()
        for name, delta in self.deltas.items():
            n_drop = self._num_to_regrow(delta, rate)
            if n_drop == 0:
                continue
            grown, init = self._regrow(name, delta, n_drop, full=rate >= 1.0)
            if grown is None:
                skipped += 1
                continue
            changed += self._reassign(delta, grown, init)
        self.num_updates += 1
        self.accumulators.clear()
        if skipped:
            logger.warning(
                "SpIEL update at step %d: %d matrices had no statistics (no backward pass in "
                "the accumulation window, or no optimizer state yet) and kept their indices.",
                self.step_count,
                skipped,
            )
        if self.group is not None:
            self._check_consistent()
        return {
            "spiel/reselection_rate": rate,
            "spiel/indices_changed": float(changed),
            "spiel/update_seconds": time.perf_counter() - start,
        }

    def _regrow(
        self, name: str, delta: SparseDelta, n: int, full: bool
    ) -> tuple[Tensor | None, dict[str, Tensor] | None]:
        """Up to n new flat positions for ``delta`` (and optional optimizer-state seeds).

        For a structured delta, up to n new lines (seeds shaped (lines, line length)).
        """
        axis = delta.line_axis
        active = delta.indices.long() if axis is None else delta.lines()
        capture = self.accumulators.get(name)  # under DDP: already averaged over ranks
        if self._needs_window and (capture is None or not capture.started):
            return None, None
        if isinstance(capture, LineEnergy):
            scores = capture.scores().clone()
            if not full:
                scores[active] = float("-inf")
            return _masked_topk(scores, n), None
        if self.config.regrowth == "ma":
            scores = self.optimizer.row_col_scores(delta.values)  # type: ignore[attr-defined]
            if scores is None:
                return None, None
            row, col = scores
            ms = capture.mean_square() if isinstance(capture, InputStatistics) else None
            if ms is not None:  # SM3's accumulators are squared gradients: over the mean square
                if ms.shape[0] == 1:
                    col = col / ms.view(-1)
                else:
                    row = row / ms.view(-1)
            return top_outer_product(row, col, n, None if full else active), None
        assert isinstance(capture, GradientAccumulator)
        grad_sum = capture.grad_sum
        chosen = _masked_topk(capture.scores(), n)
        grown = capture.candidates[chosen].long()
        init = None
        if self.config.ag_seed_optimizer_state:
            # The window is shorter than accumulation_steps when an early first update cuts it.
            since_last = self.step_count if self.num_updates == 0 else self.config.reselection_steps
            mean = grad_sum[chosen] / min(self.config.accumulation_steps, since_last)
            init = {"exp_avg": mean, "exp_avg_sq": mean * mean}
        return grown, init

    def _reassign(self, delta: SparseDelta, grown: Tensor, init: dict[str, Tensor] | None) -> int:
        """Keep the largest |delta|s, add ``grown``, sort; remap values and optimizer state."""
        if delta.line_axis is not None:
            return self._reassign_lines(delta, grown, init)
        k = delta.values.numel()
        active, magnitude = delta.indices.long(), delta.values.detach().float().abs()
        while True:  # a regrown index is never one that stays active
            n = grown.numel()
            keep_slots = torch.topk(magnitude, k - n, sorted=False).indices
            clash = torch.isin(grown, active[keep_slots])
            if not clash.any():
                break
            grown = grown[~clash]
            if init is not None:
                init = {key: value[~clash] for key, value in init.items()}
        # A regrown position that was active (only a full reselection can pick one) keeps its
        # trained delta and optimizer state: dropping and regrowing it must not zero it.
        slot = torch.searchsorted(active, grown).clamp_(max=k - 1)
        was_active = active[slot] == grown
        new_indices = torch.cat([active[keep_slots], grown])
        source = torch.cat([keep_slots, torch.where(was_active, slot, -1)])
        order = torch.argsort(new_indices)
        new_indices, source = new_indices[order], source[order]
        seeds = None
        if init is not None:
            regrown_slots = (source < 0).nonzero().squeeze(1)
            which = order[regrown_slots] - (k - n)  # position of each regrown slot in `grown`
            seeds = {}
            for key, value in init.items():
                seeds[key] = torch.zeros(k, dtype=torch.float32, device=value.device)
                seeds[key][regrown_slots] = value.float()[which]
        delta.reassign(new_indices, source)
        self.optimizer.reindex(delta.values, source, seeds)  # type: ignore[attr-defined]
        return n - int(was_active.sum())

    def _reassign_lines(
        self, delta: SparseDelta, grown: Tensor, init: dict[str, Tensor] | None
    ) -> int:
        """`_reassign` for whole lines: keep the lines whose deltas have the largest norm.

        Sorting and matching work on lines, not entries: only the final per-entry ``source``
        (and seeds) is O(k).
        """
        axis = delta.line_axis
        assert axis is not None
        width = line_length(delta.shape, axis)
        active = delta.lines()
        n_lines, n = active.numel(), grown.numel()
        # A regrown line that was active (only a full reselection picks one) keeps its deltas,
        # and is never kept a second time (a full reselection may regrow fewer than all lines).
        slot = torch.searchsorted(active, grown).clamp_(max=n_lines - 1)
        was_active = active[slot] == grown
        norms = delta.values_by_line().detach().float().norm(dim=1)
        norms[slot[was_active]] = float("-inf")
        kept = torch.topk(norms, n_lines - n, sorted=False).indices
        new_lines = torch.cat([active[kept], grown])
        line_source = torch.cat([kept, torch.where(was_active, slot, -1)])
        order = torch.argsort(new_lines)
        new_lines, line_source = new_lines[order], line_source[order]
        # Entry (line i, member j) sits at (i, j) of the values' (lines, width) matrix for rows,
        # at (j, i) of their (width, lines) matrix for columns.
        slots_shape = (n_lines, width) if axis == 0 else (width, n_lines)
        members = line_members(line_source.clamp(min=0), slots_shape, axis)
        by_line = torch.where(line_source[:, None] >= 0, members, -1)
        source = (by_line if axis == 0 else by_line.T).reshape(-1)
        seeds = None
        if init is not None:
            regrown = line_source < 0
            which = order[regrown] - (n_lines - n)  # position of each regrown line in `grown`
            seeds = {}
            for key, value in init.items():
                per_line = torch.zeros(n_lines, width, dtype=torch.float32, device=value.device)
                per_line[regrown] = value.float()[which]
                seeds[key] = (per_line if axis == 0 else per_line.T).reshape(-1)
        delta.reassign(line_positions(new_lines, delta.shape, axis), source)
        self.optimizer.reindex(delta.values, source, seeds)  # type: ignore[attr-defined]
        return (n - int(was_active.sum())) * width

    def _reduce_statistics(self) -> None:
        """Average every matrix's window statistics over the ranks (one all-reduce in all).

        The captured gradients and inputs are each rank's local ones (DDP averages only the
        deltas' gradients), so the mean of the ranks' sums is what a single process would have
        summed over the global batch. First checks (one small collective) that every rank has
        the same candidates and micro-batch count for every matrix, so a mismatch raises
        instead of mixing unrelated statistics.
        """
        if not self.deltas:
            return
        captures = [self.accumulators.get(name) for name in self.deltas]
        device = next(iter(self.deltas.values())).values.device
        rows = []
        for capture in captures:
            if capture is None or not capture.started:
                rows.append(torch.full((4,), -1, dtype=torch.long, device=device))
                continue
            count = torch.tensor([capture.count], dtype=torch.long, device=device)
            if isinstance(capture, GradientAccumulator):
                fingerprint = distributed.fingerprint(capture.candidates).to(device)
            else:
                fingerprint = torch.zeros(3, dtype=torch.long, device=device)
            rows.append(torch.cat([count, fingerprint]))
        same = distributed.agreement(torch.cat(rows), self.group).view(-1, 4).all(dim=1)
        if not bool(same.all()):
            bad = [n for n, ok in zip(self.deltas, same.tolist(), strict=True) if not ok]
            raise RuntimeError(
                f"SpIEL selection statistics differ across ranks at step {self.step_count} in "
                f"{bad[:3]} ({len(bad)} matrices): different candidates or numbers of "
                "micro-batches. Every rank must run the same number of micro-batches per "
                "optimizer step, and every targeted module must take part in every backward "
                "pass on every rank during statistics windows (e.g. not MoE experts that may "
                "receive no tokens: exclude them, or use regrowth='ma' with "
                "normalize_regrowth_by_input=False and structure='unstructured', which needs "
                "no windows)."
            )
        # (owner, attribute) of every tensor to average, in the same order on every rank.
        parts: list[tuple[Any, str]] = []
        for capture in captures:
            if capture is None or not capture.started:
                continue
            if isinstance(capture, LineEnergy):
                # The mean of the ranks' energies, not the energy of their mean gradient: an
                # upper estimate, but the same on every rank, so the ranks select alike.
                parts.append((capture, "energy"))
                continue
            if isinstance(capture, GradientAccumulator):
                parts.append((capture, "grad_sum"))
                capture = capture.inputs
            if capture is not None and capture.ms_sum is not None:
                parts.append((capture, "ms_sum"))
        if not parts:
            return
        tensors = [getattr(owner, attr) for owner, attr in parts]
        flat = distributed.all_reduce_mean_(torch.cat([t.reshape(-1) for t in tensors]), self.group)
        for (owner, attr), t, part in zip(
            parts, tensors, flat.split([t.numel() for t in tensors]), strict=True
        ):
            setattr(owner, attr, part.view_as(t).clone())

    def _check_consistent(self, at_start: bool = False) -> None:
        """Fail loudly, on every rank, if ranks hold different indices (one collective).

        Compares a fingerprint of every matrix's index set (and the schedule position).
        """
        device = next(iter(self.deltas.values())).values.device if self.deltas else "cpu"
        schedule = torch.tensor([self.step_count, self.num_updates], device=device)
        rows = [distributed.fingerprint(d.indices).to(device) for d in self.deltas.values()]
        same = distributed.agreement(torch.cat([schedule, *rows]), self.group)
        if bool(same.all()):
            return
        if not bool(same[:2].all()):
            raise RuntimeError(
                f"SpIEL selectors are out of step across ranks (this rank: step "
                f"{self.step_count}, {self.num_updates} updates): every rank must call "
                "selector.step() once per optimizer step."
            )
        per_module = same[2:].view(-1, 3).all(dim=1).tolist()
        bad = [n for n, ok in zip(self.deltas, per_module, strict=True) if not ok]
        if at_start:
            raise RuntimeError(
                f"SpIEL indices differ across ranks at start-up in {bad[:3]} ({len(bad)} "
                "matrices): every process must build the same adapter (same base model, same "
                "SpielConfig.seed, same loaded adapter) before training."
            )
        raise RuntimeError(
            f"SpIEL selection diverged across ranks at step {self.step_count} in {bad[:3]} "
            f"({len(bad)} matrices): indices differ between processes."
        )

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "num_updates": self.num_updates,
            "total_steps": self.total_steps,
            "accumulators": {
                n: a.state_dict() for n, a in self.accumulators.items() if a.started
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.num_updates = int(state["num_updates"])
        self.total_steps = int(state.get("total_steps", self.total_steps))
        self.accumulators.clear()
        self._arm()
        for name, acc_state in state.get("accumulators", {}).items():
            if name in self.accumulators:
                self.accumulators[name].load_state_dict(acc_state)
