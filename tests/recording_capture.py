"""A `spielft.ops.GradCapture` that records what backward hands it."""

from torch import Tensor


class RecordingCapture:
    def __init__(self, dense: bool = True, inputs: bool = False, factors: bool = False) -> None:
        self.wants_dense_grad, self.wants_input_stats = dense, inputs
        self.wants_factors = factors
        self.dense: list[Tensor | None] = []
        self.input_ms: list[Tensor | None] = []
        self.factors: list[tuple[Tensor, Tensor] | None] = []

    def __call__(
        self,
        dense_grad: Tensor | None,
        input_ms: Tensor | None,
        factors: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.dense.append(dense_grad)
        self.input_ms.append(input_ms)
        self.factors.append(factors)
