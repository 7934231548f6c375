"""Forecast a block's skipped output from its last computed outputs.

Order 0 reuses the last value. Order m fits the polynomial through the last m+1 computed points
with Newton divided differences over their actual positions in the sampler's t, so it is exact for
polynomials of degree <= m whatever the spacing. ``differences="backward"`` reproduces the rule of
the public TaylorSeer code (derivatives divided by the latest gap only, Taylor series around the
latest point); it is kept for cross-checks and is wrong under uneven spacing.

All coefficients are Python floats computed from known t values: no host sync per step. Stored
values are copies, and `predict` returns a new tensor, so a model that changes a block's output in
place cannot corrupt the store.
"""

import math

import torch

DIFFERENCES = ("newton", "backward")


class Forecaster:
    """Holds at most order+1 tensors for one block; `update` on computed steps, `predict` on skipped."""

    def __init__(self, order: int, differences: str = "newton"):
        if order < 0:
            raise ValueError(f"forecast order must be >= 0, got {order}")
        if differences not in DIFFERENCES:
            raise ValueError(f"differences must be one of {DIFFERENCES}, got {differences!r}")
        self.order = order
        self.differences = differences
        self.reset()

    def reset(self) -> None:
        self.nodes: list[float] = []  # t of the stored points, newest first
        self.coeffs: list[torch.Tensor] = []  # divided differences (newton) or derivatives (backward)

    def update(self, t: float, value: torch.Tensor) -> None:
        if self.nodes and t == self.nodes[0]:
            raise ValueError(f"two computed points at the same t={t}: cannot take differences")
        new = [value.detach().clone()]  # a model that changes its output in place must not change the store
        for j in range(1, min(self.order, len(self.coeffs)) + 1):
            gap = t - (self.nodes[j - 1] if self.differences == "newton" else self.nodes[0])
            new.append(torch.sub(new[j - 1], self.coeffs[j - 1]).div_(gap))
        self.nodes = [t, *self.nodes][: self.order + 1]
        self.coeffs = new

    def predict(self, t: float) -> torch.Tensor:
        if not self.coeffs:
            raise RuntimeError("forecast requested before any computed step (step 0 must compute)")
        out = self.coeffs[0]
        if len(self.coeffs) == 1:
            return out.clone()  # never hand out the stored tensor itself
        weight = 1.0
        for j in range(1, len(self.coeffs)):
            if self.differences == "newton":
                weight *= t - self.nodes[j - 1]
            else:
                weight = (t - self.nodes[0]) ** j / math.factorial(j)
            # one fused kernel per term (the tensors are small: per-op overhead dominates)
            out = torch.add(out, self.coeffs[j], alpha=weight) if j == 1 else out.add_(self.coeffs[j], alpha=weight)
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.coeffs)
