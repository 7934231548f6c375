"""The flow experts' encodings, as upstream computes them: the sine-cosine time embedding (float64), split-halves
RoPE tables and rotation (float32), and additive masks with finfo.min. Used by models/flow_expert.py."""

import math

import torch

NEG = torch.finfo(torch.float32).min  # masked logits, as upstream (not -inf: a fully masked row stays finite)


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of t (N,) -> (N, dim), computed in float64 as upstream, returned as float32."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.double()[:, None] * (1.0 / period * 2 * math.pi)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def rope_table(pos: torch.Tensor, head_dim: int, max_wavelength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (N, T) -> cos, sin (N, 1, T, head_dim / 2) in float32 (split-halves RoPE)."""
    exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32, device=pos.device)
    radians = pos.float()[..., None] / max_wavelength ** exponents
    return radians.cos()[:, None], radians.sin()[:, None]


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # (B, h, T, hd) -> same
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, NEG)
