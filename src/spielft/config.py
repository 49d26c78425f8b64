"""`SpielConfig`: every knob of a SpIEL adapter, validated up front."""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GRAD_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
STRUCTURES = ("unstructured", "rows", "columns")
ALL_LINEAR = "all-linear"  # peft's keyword: every supported linear layer but the output head
# peft's task types, and the heads each trains in full (peft's PeftModelFor<Task> classes).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _is_int(value: Any) -> bool:
    """An integer, but not a bool (``True`` would silently mean 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_names(field_name: str, value: Any) -> None:
    """A module-name selector: None, a regex string, or a list of name strings."""
    if value is None:
        return
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(
                f"SpielConfig.{field_name}={value!r} is not a valid regex: {err}."
            ) from err
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"SpielConfig.{field_name} must be a list of module names, a regex string or None, "
            f"got {value!r}."
        )


@dataclass
class SpielConfig:
    """Configuration of a SpIEL sparse-delta adapter.

    Attributes:
        density: Fraction of the targeted parameters that are trainable at any time, in (0, 1].
        num_tunable_weights: Absolute number of trainable deltas over all targeted matrices.
            Overrides `density` when set.
        target_modules: Which modules get deltas: a list of module-name suffixes (``"q_proj"``
            matches ``model.layers.0.self_attn.q_proj``) or a regular expression matched
            against the full name. ``None`` targets every supported linear layer (``nn.Linear``,
            bitsandbytes 4-bit/8-bit, transformers' ``Conv1D``) except the output head;
            embeddings are only targeted when named. ``"all-linear"`` (peft's keyword) means
            the same as ``None``.
        exclude_modules: Modules never targeted, matched as `target_modules` is: a list of
            names or name suffixes, or a regex for the full name; ``None`` excludes nothing.
            Default: ``["lm_head"]``.
        regrowth: How dropped indices are replaced: ``"ag"`` (accumulated gradients, trained
            with SparseAdamW) or ``"ma"`` (momentum approximation from SM3's row and column
            accumulators: no dense gradient is ever computed).
        reselection_steps: Optimizer steps between two drop-and-regrow updates (20 in the paper).
        first_reselection_step: Optimizer step of the first update (default: ``reselection_steps``);
            later ones follow every ``reselection_steps``.
        accumulation_steps: How many optimizer steps before each update collect statistics
            (all their micro-batches): for ``"ag"`` the full-weight gradients, and with
            `normalize_regrowth_by_input` the input features' mean squares. Must be at most
            ``reselection_steps``.
        initial_reselection_rate: Fraction p of each matrix's active indices dropped at the
            first update; p then decays to 0 at ``total_steps``.
        reselection_rate_policy: ``"linear"`` or ``"cosine"`` decay of p.
        full_first_reselection: If true, the first update drops *every* active index (p = 1)
            and regrows the whole budget from the gradient (AG) or accumulator (MA) scores,
            as the reference implementation does: the random start only warms up the
            statistics. Off by default: on GSM8K (``bench/quality.py``) it discarded the first
            cycle's training and made SpIEL fragile at higher learning rates (validation loss
            0.861 against 0.804 for AG at 3e-3, 0.830 against 0.786 for MA at 1.5e-2).
        normalize_regrowth_by_input: Divide each regrowth score by the RMS of the input feature
            the position multiplies (MA: by its mean square), measured over the window. Raw
            scores favour positions on loud inputs, where an Adam step moves the output most;
            normalised, the chosen positions are no louder than random ones
            (``bench/index_columns.py``; see `spielft.selection`). Linear layers only: embedding
            scores stay raw. ``None`` (the default) means on for ``"ma"`` and off for ``"ag"``.
            On GSM8K it gained MA 0.012 of test loss over four seeds. AG gained in the 24-step
            benchmarks at LoRA-sized budgets (0.010 at r=16's count), but lost the 1%-density
            main job (``spielft train``) on both seeds tried (``bench/README.md``).
        ag_seed_optimizer_state: For ``"ag"``: seed the Adam moments of regrown deltas with the
            mean and square of the mean of their accumulated gradients instead of zeros. Off by
            default: on GSM8K at LoRA r=64's count it cost 0.026 of test loss on both seeds
            (regrown deltas take full Adam steps at once; zeroed moments start at about half).
        delta_dtype: dtype of the trainable deltas (``"float32"``, ``"bfloat16"``,
            ``"float16"``). Optimizer state is always float32.
        weight_grad_dtype: dtype of the GEMM behind a linear layer's weight gradient, from
            which the deltas' gradient is gathered (from 5% density up) and AG's scores are
            accumulated. ``"auto"`` (default): bfloat16 when the layer computes in bfloat16,
            as autograd does for any bf16 layer, exact otherwise. ``"bfloat16"``: always
            rounds the two operands to bfloat16, as mixed-precision training does; on a
            float32 model it halved that GEMM's time on an AMD EPYC with AVX512-BF16 but
            doubled it on an Intel Xeon with the same flag (``bench/speed.py``; spielft
            measures it and warns where it is not faster). ``"float32"``: always
            exact. The forward pass and the gradients flowing to the rest of the model do not
            depend on it.
        modules_to_save: Modules trained in full next to the deltas, as in peft: a list of
            module names or dotted name suffixes (``["score"]``; ``"norm"`` is ``model.norm``,
            not ``input_layernorm`` as peft's plain string suffix would also take). Each gets a
            trainable copy per adapter, in the module's own dtype, saved in the adapter file;
            the original stays frozen and runs under `disable_adapter`. For heads a task adds
            to a pretrained model (a classifier) or a norm worth training whole; a module must
            not share weights with another (untie first). Targets inside it are skipped.
        task_type: peft's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``,
            ``"QUESTION_ANS"``, ...). As in peft, ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` add the
            model's ``classifier``/``score`` head to `modules_to_save`, and ``"QUESTION_ANS"``
            its ``qa_outputs``: those heads start random and must train.
        structure: Which entries may be trainable. ``"unstructured"`` (default, the paper's
            SpIEL): any. ``"rows"``: whole rows of each matrix (its output features; an
            embedding's rows are its tokens), ``"columns"``: whole columns (input features).
            Drop keeps the lines whose deltas have the largest norm; AG regrows the lines whose
            accumulated gradient has the largest norm, MA those with the largest squared
            gradient over the window, estimated from random projections (SM3's accumulators
            only cover active lines). The deltas' gradient of a linear layer is then one small
            dense GEMM over the chosen lines instead of a sampled matmul, and its weight is
            patched line by line: cheaper at LoRA-like budgets (``bench/speed.py``; columns
            also keep only their own input features for backward), a
            coarser method than SpIEL's single weights (quality: ``bench/README.md``). Each
            matrix gets its share of the budget rounded to whole lines (at least one; a warning
            says when that moves the total by over 10%), and an update swaps
            ``int(rate * lines)`` lines, so a matrix of fewer than ``1 / rate`` lines keeps its
            lines.
        seed: Seed of the random initial index sets (identical on every rank).
    """

    density: float | None = 0.01
    num_tunable_weights: int | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = field(default_factory=lambda: ["lm_head"])
    regrowth: Literal["ag", "ma"] = "ag"
    reselection_steps: int = 20
    first_reselection_step: int | None = None
    accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    reselection_rate_policy: Literal["linear", "cosine"] = "linear"
    full_first_reselection: bool = False
    normalize_regrowth_by_input: bool | None = None
    ag_seed_optimizer_state: bool = False
    delta_dtype: str = "float32"
    weight_grad_dtype: str = "auto"
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    structure: Literal["unstructured", "rows", "columns"] = "unstructured"
    seed: int = 42

    def __post_init__(self) -> None:
        if isinstance(self.delta_dtype, torch.dtype):
            self.delta_dtype = str(self.delta_dtype).removeprefix("torch.")
        if isinstance(self.weight_grad_dtype, torch.dtype):
            self.weight_grad_dtype = str(self.weight_grad_dtype).removeprefix("torch.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type is not None and isinstance(getattr(self.task_type, "value", None), str):
            self.task_type = self.task_type.value  # peft's TaskType enum
        if self.normalize_regrowth_by_input is None:
            self.normalize_regrowth_by_input = self.regrowth == "ma"
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the field and the reason for any invalid value."""
        if self.num_tunable_weights is None:
            if not _is_real(self.density) or not 0.0 < float(self.density) <= 1.0:
                raise ValueError(
                    f"SpielConfig.density must be in (0, 1], got {self.density!r}; "
                    "or set num_tunable_weights to an absolute budget."
                )
        elif not _is_int(self.num_tunable_weights) or self.num_tunable_weights < 1:
            raise ValueError(
                f"SpielConfig.num_tunable_weights must be a positive integer, got "
                f"{self.num_tunable_weights!r}."
            )
        if self.regrowth not in ("ag", "ma"):
            raise ValueError(f"SpielConfig.regrowth must be 'ag' or 'ma', got {self.regrowth!r}.")
        if self.reselection_rate_policy not in ("linear", "cosine"):
            raise ValueError(
                "SpielConfig.reselection_rate_policy must be 'linear' or 'cosine', got "
                f"{self.reselection_rate_policy!r}."
            )
        if not _is_int(self.reselection_steps) or self.reselection_steps < 1:
            raise ValueError(
                "SpielConfig.reselection_steps must be an integer >= 1, got "
                f"{self.reselection_steps!r}."
            )
        if self.first_reselection_step is not None and (
            not _is_int(self.first_reselection_step) or self.first_reselection_step < 1
        ):
            raise ValueError(
                "SpielConfig.first_reselection_step must be a positive integer or None, got "
                f"{self.first_reselection_step!r}."
            )
        if not _is_int(self.accumulation_steps) or not (
            1 <= self.accumulation_steps <= self.reselection_steps
        ):
            raise ValueError(
                f"SpielConfig.accumulation_steps must be an integer in [1, reselection_steps="
                f"{self.reselection_steps}], got {self.accumulation_steps!r}."
            )
        if not _is_real(self.initial_reselection_rate) or not (
            0.0 <= float(self.initial_reselection_rate) <= 1.0
        ):
            raise ValueError(
                "SpielConfig.initial_reselection_rate must be in [0, 1], got "
                f"{self.initial_reselection_rate!r}."
            )
        for name in ("full_first_reselection", "normalize_regrowth_by_input",
                     "ag_seed_optimizer_state"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SpielConfig.{name} must be a bool, got {getattr(self, name)!r}.")
        if self.ag_seed_optimizer_state and self.regrowth != "ag":
            raise ValueError(
                "SpielConfig.ag_seed_optimizer_state seeds Adam moments, so it needs "
                f"regrowth='ag' (SM3 has none), got regrowth={self.regrowth!r}; drop the option."
            )
        if not isinstance(self.delta_dtype, str) or self.delta_dtype not in _DTYPES:
            raise ValueError(
                f"SpielConfig.delta_dtype must be one of {sorted(_DTYPES)}, got "
                f"{self.delta_dtype!r}."
            )
        if not isinstance(self.weight_grad_dtype, str) or self.weight_grad_dtype not in _GRAD_DTYPES:
            raise ValueError(
                f"SpielConfig.weight_grad_dtype must be one of {sorted(_GRAD_DTYPES)}, got "
                f"{self.weight_grad_dtype!r}."
            )
        if self.structure not in STRUCTURES:
            raise ValueError(
                f"SpielConfig.structure must be one of {list(STRUCTURES)}, got "
                f"{self.structure!r}."
            )
        if not _is_int(self.seed):
            raise ValueError(f"SpielConfig.seed must be an integer, got {self.seed!r}.")
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(v, str) and v for v in self.modules_to_save)
        ):
            raise ValueError(
                "SpielConfig.modules_to_save must be a list of module names (or name suffixes) "
                f"or None, got {self.modules_to_save!r}."
            )
        if self.task_type is not None and self.task_type not in TASK_HEADS:
            raise ValueError(
                f"SpielConfig.task_type must be one of {sorted(TASK_HEADS)} or None, got "
                f"{self.task_type!r}."
            )

    @property
    def targets_all_linear(self) -> bool:
        """Whether the default targets apply (every supported linear layer but the head)."""
        return self.target_modules is None or self.target_modules == ALL_LINEAR

    @property
    def task_heads(self) -> tuple[str, ...]:
        """The head names `task_type` trains in full (a model has one of them)."""
        return TASK_HEADS[self.task_type] if self.task_type else ()

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        return _DTYPES[self.delta_dtype]

    @property
    def torch_weight_grad_dtype(self) -> torch.dtype | None:
        """What the ops take as ``grad_dtype`` (None: auto, see `spielft.ops.gemm_dtype_for`)."""
        return _GRAD_DTYPES[self.weight_grad_dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpielConfig:
        """Build from a dict (e.g. ``adapter_config.json``), rejecting unknown fields.

        Saved configs list every field; one written before ``normalize_regrowth_by_input``
        existed trained with raw scores, so a resumed run keeps them.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown SpielConfig field(s) {unknown}; known fields are {sorted(known)}."
            )
        return cls(**{"normalize_regrowth_by_input": False, **data})
