"""Min-max normalisation to [-1, 1] per dimension, fitted on the dataset (as Diffusion Policy's
`LinearNormalizer(mode="limits")`); its buffers travel in the checkpoint with the weights."""

import numpy as np
import torch
import torch.nn as nn

RANGE_EPS = 1e-4


class MinMaxNormalizer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("min", torch.full((dim,), -1.0))
        self.register_buffer("max", torch.ones(dim))

    @torch.no_grad()
    def fit(self, data: np.ndarray | torch.Tensor) -> "MinMaxNormalizer":
        """Fit on data (N, dim). A dimension with (almost) no range maps to 0 instead of blowing up."""
        data = torch.as_tensor(np.asarray(data), dtype=torch.float64).reshape(-1, self.scale.shape[0])
        if len(data) == 0 or not torch.isfinite(data).all():
            raise ValueError("normaliser needs a non-empty, finite (N, dim) array")
        lo, hi = data.min(0).values, data.max(0).values
        span = hi - lo
        flat = span < RANGE_EPS
        scale = 2.0 / torch.where(flat, torch.full_like(span, 2.0), span)
        offset = torch.where(flat, -lo, -1.0 - scale * lo)
        for name, value in (("scale", scale), ("offset", offset), ("min", lo), ("max", hi)):
            getattr(self, name).copy_(value)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.offset) / self.scale
