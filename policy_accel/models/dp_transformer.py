"""DP-T: the transformer denoiser of Diffusion Policy (Chi et al. 2023, `TransformerForDiffusion`),
re-implemented nanoGPT-style with obs-as-condition and n_cond_layers=0.

    action tokens (B, T, Da) -> Linear + learned pos-emb                      -> x (B, T, C)
    memory = [time token ; obs tokens] (B, 1+To, C) + learned cond pos-emb -> per-token MLP
    n_layer pre-norm layers: x += self_attn(x); x += cross_attn(x, memory); x += ff(x)
    final LayerNorm + Linear -> epsilon (B, T, Da)

The memory MLP works token by token, so the obs tokens (and their cross-attention keys/values in
every layer) do not change across denoising steps: `prepare` computes them once per chunk (and,
given the sampler's timesteps, the time token's K/V of every step), and `forward` runs the layers.

    ctx = model.prepare(cond, timesteps)              # once per chunk (the Denoiser seam)
    eps = model(x, t, ctx.at_step(k))                 # per sampling step
    eps = model(x, t_batch, model.prepare(cond))      # training: one t per row
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from policy_accel.denoiser import Context
from policy_accel.models.blocks import (
    KV,
    CrossAttention,
    FeedForward,
    SelfAttention,
    decay_groups,
    family_config,
    init_linear,
)


@dataclass
class DPTransformerConfig:
    input_dim: int  # action dim
    output_dim: int  # action dim (epsilon)
    horizon: int = 16
    n_obs_steps: int = 2
    cond_dim: int = 0  # obs dim
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.3
    causal_attn: bool = True
    n_cond_layers: int = 0

    def __post_init__(self):
        for name in ("input_dim", "output_dim", "horizon", "n_obs_steps", "cond_dim", "n_layer", "n_head", "n_emb"):
            if getattr(self, name) < 1:
                raise ValueError(f"DPTransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_emb % self.n_head:
            raise ValueError(f"n_emb {self.n_emb} must be divisible by n_head {self.n_head}")
        if self.n_cond_layers != 0:
            raise ValueError("only n_cond_layers=0 (per-token condition MLP) is implemented: the per-chunk "
                             "condition cache relies on the memory tokens not mixing")


@dataclass
class ConditionCache(Context):
    """Per-chunk condition: obs memory tokens after the MLP and every layer's cross-attention K/V;
    optionally the time token's per-layer K/V for each timestep the sampler will visit."""

    tokens: torch.Tensor  # (B, To, C)
    kv: list[KV]  # per layer: (B, H, To, hd) keys and values
    time_kv: list[list[KV]] | None = None  # per sampler step: per layer (1, H, 1, hd) keys and values
    step_kv: list[KV] | None = None  # time_kv[step] in a view made by at_step(step)

    def at_step(self, step: int) -> "ConditionCache":
        """A view for sampler step `step`: the forward uses that step's precomputed time K/V (no int
        in the view, so a compiled denoiser does not specialise on the step)."""
        return replace(self, step_kv=self.time_kv[step])

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def _frequencies(dim: int, device=None) -> torch.Tensor:
    half = dim // 2
    return torch.exp(torch.arange(half, device=device) * -(math.log(10000) / (half - 1)))


class SinusoidalPosEmb(nn.Module):
    """fp32 whatever the model's dtype: t * freq reaches ~100 rad at t = 99, and a bf16 frequency or
    product there is off by up to ~0.4 rad (the caller casts the embedding to the model's dtype)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", _frequencies(dim), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:  # cast with the model: recompute in fp32 rather than upcast
            self.freqs = _frequencies(2 * self.freqs.shape[0], self.freqs.device)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim) fp32
        emb = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([emb.sin(), emb.cos()], dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, n_emb: int, n_head: int, dropout: float):
        super().__init__()
        self.self_attn = SelfAttention(n_emb, n_head, dropout)
        self.cross_attn = CrossAttention(n_emb, n_head, dropout)
        self.ff = FeedForward(n_emb, dropout)

    # `hidden_states` (not `x`): diffusers' block-level cache hooks look the input up by that name
    def forward(self, hidden_states: torch.Tensor, memory: list[KV], causal_mask: torch.Tensor | None,
                memory_mask: torch.Tensor | None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = hidden_states
        x = x + self.self_attn(x, causal_mask)
        x = x + self.cross_attn(x, memory, memory_mask)
        return x + self.ff(x)


class Decoder(nn.Module):
    def __init__(self, n_layer: int, n_emb: int, n_head: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(n_emb, n_head, dropout) for _ in range(n_layer))


class DPTransformer(nn.Module):
    prediction = "epsilon"
    cache_blocks = r"decoder\.layers\.\d+\.(self_attn|cross_attn|ff)"  # what the cache engine may wrap
    block_stack = "decoder"  # its `layers` are the whole layers (diffusers' block-level caches wrap those)

    @classmethod
    def config_for(cls, obs_dim: int, action_dim: int, horizon: int, n_obs_steps: int, arch: dict
                   ) -> DPTransformerConfig:
        """The config of a DP-T denoising `action_dim` actions over `horizon` steps from `n_obs_steps`
        observations of `obs_dim`; `arch` holds the architecture fields (n_layer, n_emb, p_drop_attn...)."""
        fixed = dict(input_dim=action_dim, output_dim=action_dim, horizon=horizon, n_obs_steps=n_obs_steps,
                     cond_dim=obs_dim)
        return family_config(DPTransformerConfig, "dp_t", fixed, arch)

    def __init__(self, config: DPTransformerConfig):
        super().__init__()
        self.config = cfg = config
        T, S, C = cfg.horizon, 1 + cfg.n_obs_steps, cfg.n_emb
        self.input_emb = nn.Linear(cfg.input_dim, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, T, C))
        self.time_emb = SinusoidalPosEmb(C)
        self.cond_obs_emb = nn.Linear(cfg.cond_dim, C)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, S, C))
        self.drop = nn.Dropout(cfg.p_drop_emb)
        self.cond_mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.Mish(), nn.Linear(4 * C, C))
        self.decoder = Decoder(cfg.n_layer, C, cfg.n_head, cfg.p_drop_attn)
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.output_dim)

        # Additive masks (0 = may attend, -inf = may not; bool masks cost a conversion in every
        # attention call). Action token t sees action tokens <= t, and memory token s
        # (0 = time, s >= 1 = obs step s-1) when s <= t + 1, as in the original.
        t, s = torch.arange(T)[:, None], torch.arange(S)[None, :]
        self.register_buffer("causal_mask", _additive(t >= torch.arange(T)[None, :]) if cfg.causal_attn else None,
                             persistent=False)
        self.register_buffer("memory_mask", _additive(t >= s - 1) if cfg.causal_attn else None, persistent=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module):
        if not init_linear(module) and isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as in Diffusion Policy: decay Linear weights only (not biases, norms, pos-embs)."""
        return decay_groups(self, weight_decay)

    def _time_memory(self, t: torch.Tensor) -> torch.Tensor:
        """Time tokens after pos-emb and MLP: (N,) -> (N, 1, C)."""
        tok = self.time_emb(t).to(self.cond_pos_emb.dtype)[:, None, :] + self.cond_pos_emb[:, :1]
        return self.cond_mlp(self.drop(tok))

    def _time_kv(self, t: torch.Tensor) -> list[KV]:
        """Per layer (N, H, 1, hd) keys and values of the time tokens for timesteps t (N,)."""
        mem = self._time_memory(t)
        return [layer.cross_attn.kv(mem) for layer in self.decoder.layers]

    def _obs_memory(self, cond: torch.Tensor) -> torch.Tensor:
        """Obs tokens after pos-emb and MLP: (B, To, cond_dim) -> (B, To, C)."""
        To = self.config.n_obs_steps
        if cond.ndim != 3 or cond.shape[1:] != (To, self.config.cond_dim):
            raise ValueError(f"cond must be (B, {To}, {self.config.cond_dim}), got {tuple(cond.shape)}")
        tok = self.cond_obs_emb(cond) + self.cond_pos_emb[:, 1:]
        return self.cond_mlp(self.drop(tok))

    def prepare(self, cond: torch.Tensor, timesteps: list[float] | None = None) -> ConditionCache:
        """Everything about the condition that stays fixed across denoising steps (once per chunk).

        With `timesteps` (the sampler's t values) the time token's K/V are also computed for all
        steps in one batch, used through `ctx.at_step(k)`: less work per step, equal to per-step
        computation up to float rounding (a batched matmul rounds differently).
        """
        tokens = self._obs_memory(cond)
        cache = ConditionCache(tokens, [layer.cross_attn.kv(tokens) for layer in self.decoder.layers])
        if timesteps is not None:
            per_layer = self._time_kv(torch.tensor(timesteps, device=cond.device))  # (K, H, 1, hd) each
            cache.time_kv = [[(k[i:i + 1], v[i:i + 1]) for k, v in per_layer] for i in range(len(timesteps))]
        return cache

    def forward(self, sample: torch.Tensor, timestep, cond: ConditionCache) -> torch.Tensor:
        """sample (B, T, Da), timestep scalar or (B,), cond made by `prepare` -> epsilon (B, T, Da)."""
        B, T = self._check(sample, cond)
        if cond.step_kv is not None:
            time_kv = cond.step_kv
        else:
            t = torch.as_tensor(timestep, device=sample.device)
            if t.ndim == 0:
                t = t[None]
            elif t.shape != (B,):
                raise ValueError(f"timestep must be a scalar or shape ({B},), got {tuple(t.shape)}")
            time_kv = self._time_kv(t)  # per layer (B or 1, H, 1, hd)

        x = self._embed(sample)  # (B, T, C)
        causal = self.causal_mask[:T, :T] if self.causal_mask is not None else None
        mem_mask = self.memory_mask[:T] if self.memory_mask is not None else None
        for layer, obs_kv, t_kv in zip(self.decoder.layers, cond.kv, time_kv, strict=True):
            x = layer(x, [t_kv, obs_kv], causal, mem_mask)  # memory = [time token ; obs tokens]
        return self._head(x)

    def skip_stack(self, sample: torch.Tensor, timestep, cond: ConditionCache, residual: torch.Tensor
                   ) -> torch.Tensor:
        """forward() with the decoder replaced by adding `residual` (the sum of every sub-block's branch
        output) to the embedded actions: what a cache runs on a step on which it skips every block. The
        time token enters only through the layers' cross-attention, so t is not needed here."""
        self._check(sample, cond)
        return self._head(self._embed(sample) + residual)

    def _check(self, sample: torch.Tensor, cond: ConditionCache) -> tuple[int, int]:
        B, T, _ = sample.shape
        if not isinstance(cond, ConditionCache):
            raise TypeError(f"cond must be the ConditionCache made by prepare(), got {type(cond).__name__}")
        if cond.batch_size != B:
            raise ValueError(f"condition cache is for batch {cond.batch_size}, sample has batch {B}")
        return B, T

    def _embed(self, sample: torch.Tensor) -> torch.Tensor:  # (B, T, Da) -> residual stream (B, T, C)
        return self.drop(self.input_emb(sample) + self.pos_emb[:, :sample.shape[1]])

    def _head(self, x: torch.Tensor) -> torch.Tensor:  # residual stream (B, T, C) -> epsilon (B, T, Da)
        return self.head(self.ln_f(x))
