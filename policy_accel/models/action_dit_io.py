"""The action DiTs' input and output embedders, as upstream names them: GR00T N1.5's per-embodiment state and
action encoders and action decoder, its timestep encoder and action time features; CogACT's condition
embedder (with its learned null condition) and time features; GR00T's AdaLayerNorm. Used by models/action_dit.py.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def action_time_features(bucket: torch.Tensor, width: int) -> torch.Tensor:
    """GR00T action-encoder time features: [sin(b f), cos(b f)], f = exp(-i ln(1e4) / (C/2)). (N,) -> (N, C)"""
    half = width // 2
    f = (-torch.arange(half, dtype=torch.float, device=bucket.device) * (torch.log(torch.tensor(10000.0)) / half)).exp()
    a = bucket.float()[:, None] * f
    return torch.cat([a.sin(), a.cos()], dim=-1)


def cogact_time_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:  # (N,) -> (N, 256): [cos, sin]
    f = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    a = t[:, None].float() * f[None]
    return torch.cat([a.cos(), a.sin()], dim=-1)


class CategorySpecificLinear(nn.Module):
    """Per-embodiment Linear: W [E, in, out], b [E, out]; y = x @ W[e] + b[e] per row."""

    def __init__(self, num: int, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Parameter(0.02 * torch.randn(num, d_in, d_out))
        self.b = nn.Parameter(torch.zeros(num, d_out))

    def forward(self, x, ids_or_selected):  # x (B, T, in): embodiment ids (B,) or (W[ids], b[ids]) from prepare
        W, b = ids_or_selected if isinstance(ids_or_selected, tuple) else (self.W[ids_or_selected],
                                                                           self.b[ids_or_selected])
        return torch.bmm(x, W) + b.unsqueeze(1)


class CategorySpecificMLP(nn.Module):
    def __init__(self, num, d_in, d_hidden, d_out):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num, d_in, d_hidden)
        self.layer2 = CategorySpecificLinear(num, d_hidden, d_out)

    def forward(self, x, sel):  # sel: ids (B,) or {"layer1": (W, b), "layer2": (W, b)}
        s1, s2 = (sel["layer1"], sel["layer2"]) if isinstance(sel, dict) else (sel, sel)
        return self.layer2(F.relu(self.layer1(x, s1)), s2)


class MultiEmbodimentActionEncoder(nn.Module):
    def __init__(self, action_dim, width, num):
        super().__init__()
        self.W1 = CategorySpecificLinear(num, action_dim, width)
        self.W2 = CategorySpecificLinear(num, 2 * width, width)
        self.W3 = CategorySpecificLinear(num, width, width)

    def forward(self, x, tau, sel):  # x (B, T, Da), tau (B|1, C) time features, sel {"W1": (W, b), ...}
        a = self.W1(x, sel["W1"])  # (B, T, C)
        h = self.W2(torch.cat([a, tau[:, None].expand(a.shape)], dim=-1), sel["W2"])
        return self.W3(h * torch.sigmoid(h), sel["W3"])  # swish


class TimestepEncoder(nn.Module):
    """GR00T temb: diffusers Timesteps(256, flip_sin_to_cos, shift 1) -> Linear, SiLU, Linear."""

    def __init__(self, width: int, channels: int = 256):
        super().__init__()
        half = channels // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32)
                                                / (half - 1)), persistent=False)
        self.timestep_embedder = nn.ModuleDict(dict(linear_1=nn.Linear(channels, width),
                                                    linear_2=nn.Linear(width, width)))

    def forward(self, bucket: torch.Tensor) -> torch.Tensor:  # (N,) int64 -> (N, C)
        e = bucket[:, None].float() * self.freqs[None]
        e = torch.cat([e.cos(), e.sin()], dim=-1).to(self.timestep_embedder.linear_1.weight.dtype)
        return self.timestep_embedder.linear_2(F.silu(self.timestep_embedder.linear_1(e)))


class LabelEmbedder(nn.Module):  # CogACT's z_embedder: Linear over the condition, learned null condition
    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.linear = nn.Linear(d_in, width)
        self.uncondition = nn.Parameter(0.02 * torch.randn(1, d_in))


def modulate(x, shift, scale):  # x (B, T, C); shift, scale (B|1, C)
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNorm(nn.Module):
    """GR00T's norm1: LayerNorm (no affine) * (1 + scale) + shift, (scale, shift) = linear(SiLU(temb))."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:  # mod = linear(SiLU(temb)) (B|1, 2C)
        scale, shift = mod.chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)
