"""Flow-matching action experts over a VLM prefix K/V: SmolVLA, π0 and π0.5 (LeRobot's re-implementations of
openpi / SmolVLA), nanoGPT-style, one config switching the three modes.

    prefix K/V per layer (keys after RoPE) + pad mask     (a VLM's prefix pass; stand_ins.PrefixEncoder from obs)
    actions x_t (B, H, Da) -> action_in_proj -> SmolVLA / π0: MLP(cat[a, sin-cos(t)]); π0.5: adaptive RMSNorms
    n_layer pre-norm layers: x += layers[i].attn(x, prefix K/V of layer i); x += layers[i].mlp(x)
    final RMSNorm -> action_out_proj -> velocity (noise - x0); t runs from 1 (noise) to 0

Every π0 / π0.5 layer and SmolVLA's even layers attend jointly to [VLM layer i's prefix K/V ; own K/V] (SmolVLA:
causal among actions); SmolVLA's odd layers cross-attend to the prefix K/V re-projected by their own k/v_proj.
π0's state token sees only the prefix and itself: its K/V are fixed per chunk, computed in `prepare` with the
masks, RoPE tables, cross-layer K/V and per-step time features (π0.5: every norm's modulation).

    ctx = model.prepare(prefix_or_obs, timesteps)     # once per chunk (the Denoiser seam)
    v = model(x, t, ctx.at_step(k))                   # per sampling step; training: t of shape (B,)
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from policy_accel.denoiser import Context
from policy_accel.models import register_family
from policy_accel.models.blocks import decay_groups, family_config, init_linear
from policy_accel.models.flow_expert_config import FlowExpertConfig
from policy_accel.models.flow_expert_io import additive, rope_table, rotate, time_embedding

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Prefix:
    """The VLM side of one chunk (what a VLM prefix pass produces)."""

    kv: list[KV]  # per VLM layer: keys (after RoPE) and values, (B, n_kv_head, Lp, head_dim)
    pad_mask: torch.Tensor  # (B, Lp) bool, True = valid token
    state: torch.Tensor | None = None  # (B, state_dim): π0's state token


@dataclass
class FlowContext(Context):
    """Per chunk: each layer's K/V (joint layers: prefix [+ π0 state] keys after RoPE; cross layers: re-projected),
    additive masks, RoPE tables; optionally per-step time features (`time`, one row per sampler step)."""

    kv: list[KV]
    mask: torch.Tensor  # (B, 1, H, L + H) joint layers: prefix (+ state) and action keys
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, 1, H, head_dim / 2) of the action positions
    cross_mask: torch.Tensor | None = None  # (B, 1, 1, Lp) cross layers
    cross_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, 1, H, head_dim / 2): positions from 0
    time: torch.Tensor | None = None  # (K, C) time embeddings, π0.5: (K, 2 n_layer + 1, 3C) norm modulations
    step_time: torch.Tensor | None = None  # time[k:k+1], set by at_step(k)

    def at_step(self, step: int) -> "FlowContext":
        """The view for sampler step `step` (a tensor slice: no int reaches the forward)."""
        if self.time is None:
            return self
        if not 0 <= step < len(self.time):
            raise IndexError(f"step {step}: this context was prepared for {len(self.time)} sampler steps")
        return replace(self, step_time=self.time[step:step + 1])


def gated(out: torch.Tensor, mod: torch.Tensor | None) -> torch.Tensor:  # π0.5: branch output × gate
    return out if mod is None else out * mod.chunk(3, dim=-1)[2]


class RMSNorm(nn.Module):
    """style "llama": w·x/rms (SmolVLA); "gemma": (1 + w)·x/rms (π0); "ada": (1 + scale)·x/rms + shift (π0.5),
    with (scale, shift, gate) = dense(time condition), precomputed and passed in as `mod` (N, 1, 3C)."""

    def __init__(self, dim: int, eps: float, style: str):
        super().__init__()
        self.eps, self.style = eps, style
        if style == "ada":
            self.dense = nn.Linear(dim, 3 * dim)
        else:
            self.weight = nn.Parameter(torch.ones(dim) if style == "llama" else torch.zeros(dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.style == "llama":
            return self.weight * h.to(x.dtype)
        if self.style == "gemma":
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        scale, shift, _ = mod.chunk(3, dim=-1)
        return (h * (1 + scale) + shift).to(x.dtype)


class Attention(nn.Module):
    """Pre-norm attention block; returns the residual-branch output o_proj(...) (π0.5: × gate)."""

    def __init__(self, cfg: FlowExpertConfig, width: int, style: str, eps: float, cross: bool):
        super().__init__()
        self.cross, self.n_head, self.n_kv_head, self.head_dim = cross, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_width = cfg.n_kv_head * cfg.head_dim
        self.input_layernorm = RMSNorm(width, eps, style)
        self.q_proj = nn.Linear(width, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(kv_width if cross else width, kv_width, bias=False)  # cross: re-projects prefix K
        self.v_proj = nn.Linear(kv_width if cross else width, kv_width, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, width, bias=False)

    def heads(self, z: torch.Tensor) -> torch.Tensor:  # (B, T, h * hd) -> (B, h, T, hd)
        return z.view(*z.shape[:2], -1, self.head_dim).transpose(1, 2)

    def qkv(self, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed tokens (B, T, C) -> q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd); q and k rotated."""
        return rotate(self.heads(self.q_proj(h)), rope), rotate(self.heads(self.k_proj(h)), rope), \
            self.heads(self.v_proj(h))

    def cross_kv(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Prefix K/V (B, kvh, Lp, hd) -> this cross layer's K/V: k_proj/v_proj over the head-major flattening."""
        flat = [z.transpose(1, 2).reshape(z.shape[0], z.shape[2], -1) for z in (k, v)]  # (B, Lp, kvh * hd)
        return self.heads(self.k_proj(flat[0])), self.heads(self.v_proj(flat[1]))

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """q (B, n_head, T, hd), k/v (B, n_kv_head, L, hd), additive mask (B, 1, T|1, L) -> o_proj out (B, T, C)."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None, rope, mod: torch.Tensor | None = None
                ) -> torch.Tensor:  # x (B, T, C) residual stream -> (B, T, C) branch output
        h = self.input_layernorm(x, mod)
        if self.cross:  # K/V re-projected once per chunk; queries rotated from position 0
            q, (k, v) = rotate(self.heads(self.q_proj(h)), rope), kv
        else:  # joint: [prefix ; own tokens]
            q, k, v = self.qkv(h, rope)
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        return gated(self.attend(q, k, v, mask), mod)


class MLP(nn.Module):
    """Pre-norm gated MLP: down(act(gate(h)) * up(h)), SwiGLU (SmolVLA) or GeGLU-tanh (π0); π0.5: × gate."""

    def __init__(self, width: int, mlp_dim: int, style: str, eps: float, gelu: bool):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(width, eps, style)
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)
        self.act_fn = nn.GELU(approximate="tanh") if gelu else nn.SiLU()

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = self.post_attention_layernorm(x, mod)
        return gated(self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h)), mod)


class Layer(nn.Module):
    def __init__(self, cfg: FlowExpertConfig, width: int, mlp_dim: int, style: str, cross: bool = False):
        super().__init__()
        eps = 1e-5 if cfg.mode == "smolvla" else 1e-6  # Llama (SmolVLM text config) / Gemma rms_norm_eps
        self.attn = Attention(cfg, width, style, eps, cross)
        self.mlp = MLP(width, mlp_dim, style, eps, gelu=cfg.mode != "smolvla")


def collect_kv(layers, h: torch.Tensor, rope, mask: torch.Tensor | None, past: list[KV] | None = None) -> list[KV]:
    """Run tokens h (B, T, C) through joint layers (after `past` K/V if given) and return every layer's
    [past ;] own K/V. The blocks' class forward is used, so a cache hook on an instance never sees these calls."""
    kv = []
    for i, layer in enumerate(layers):
        q, k, v = layer.attn.qkv(layer.attn.input_layernorm(h), rope)  # (B, h, T, hd)
        if past is not None:
            k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
        kv.append((k, v))
        if i + 1 < len(layers):  # the last layer's outputs are not needed
            h = h + layer.attn.attend(q, k, v, mask)
            h = h + MLP.forward(layer.mlp, h)
    return kv


@register_family("flow_expert")
class FlowExpert(nn.Module):
    prediction = "velocity"
    cache_blocks = r"layers\.\d+\.(attn|mlp)"

    @classmethod
    def config_for(cls, obs_dim: int, action_dim: int, horizon: int, n_obs_steps: int, arch: dict
                   ) -> FlowExpertConfig:
        """A flow expert over the stand-in prefix encoder of `n_obs_steps` observations of `obs_dim` (π0: the
        current observation is also the state token); `arch` holds mode and sizes (width, n_layer, ...)."""
        fixed = dict(obs_dim=obs_dim, action_dim=action_dim, horizon=horizon, n_obs_steps=n_obs_steps)
        fixed |= {"state_dim": obs_dim - arch.get("instruction_dim", 0)} if arch.get("mode") == "pi0" else {}
        return family_config(FlowExpertConfig, "flow_expert", fixed, arch)

    def __init__(self, config: FlowExpertConfig):
        super().__init__()
        self.config = cfg = config
        C, style = cfg.width, {"smolvla": "llama", "pi0": "gemma", "pi05": "ada"}[cfg.mode]
        self.action_in_proj = nn.Linear(cfg.action_dim, C)
        if cfg.mode == "pi05":  # time -> adaptive-norm condition
            self.time_mlp_in, self.time_mlp_out = nn.Linear(C, C), nn.Linear(C, C)
        else:  # time concatenated with the action embedding
            self.action_time_mlp_in, self.action_time_mlp_out = nn.Linear(2 * C, C), nn.Linear(C, C)
        if cfg.mode == "pi0":
            self.state_proj = nn.Linear(cfg.state_dim, C)
        self.layers = nn.ModuleList(Layer(cfg, C, cfg.mlp_dim, style, cfg.is_cross(i)) for i in range(cfg.n_layer))
        self.norm = RMSNorm(C, 1e-5 if cfg.mode == "smolvla" else 1e-6, style)
        self.action_out_proj = nn.Linear(C, cfg.action_dim)
        self.prefix_encoder = None
        if cfg.obs_dim:
            from policy_accel.models.stand_ins import PrefixEncoder  # built from this module's layers

            self.prefix_encoder = PrefixEncoder(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # adaptive norms as upstream: zero weight, default bias
        if not init_linear(module) and isinstance(module, RMSNorm) and module.style == "ada":
            nn.init.zeros_(module.dense.weight)
            bound = 1 / math.sqrt(module.dense.in_features)
            nn.init.uniform_(module.dense.bias, -bound, bound)

    def optim_groups(self, weight_decay: float) -> list[dict]:  # Linear weights decay (adaptive norms' included)
        return decay_groups(self, weight_decay)

    def _norms(self) -> list[RMSNorm]:  # in the order of π0.5's modulation rows
        return [n for layer in self.layers for n in (layer.attn.input_layernorm, layer.mlp.post_attention_layernorm)
                ] + [self.norm]

    def _time_features(self, t: torch.Tensor) -> torch.Tensor:
        """t (N,) -> time embedding (N, C); π0.5: every norm's (scale, shift, gate) (N, 2 n_layer + 1, 3C)."""
        emb = time_embedding(t, self.config.width, self.config.min_period, self.config.max_period)
        if self.config.mode != "pi05":
            return emb
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))  # (N, C)
        return torch.stack([norm.dense(cond) for norm in self._norms()], dim=1)

    def _prefix(self, cond) -> Prefix:
        """A Prefix, or an obs history through the stand-in prefix encoder; shapes checked against the expert."""
        cfg = self.config
        if isinstance(cond, torch.Tensor):
            if self.prefix_encoder is None:
                raise ValueError("this flow expert has no built-in prefix encoder (obs_dim=0): pass a Prefix")
            cond = self.prefix_encoder(cond)
        if not isinstance(cond, Prefix):
            raise TypeError(f"cond must be a Prefix or an obs tensor, got {type(cond).__name__}")
        pad = cond.pad_mask
        if not isinstance(pad, torch.Tensor) or pad.dtype != torch.bool or pad.ndim != 2:
            raise ValueError("prefix pad_mask must be a bool tensor (B, Lp)")
        if len(cond.kv) != cfg.n_layer:
            raise ValueError(f"prefix has K/V for {len(cond.kv)} layers; the expert has {cfg.n_layer}")
        want = (len(pad), cfg.n_kv_head, pad.shape[1], cfg.head_dim)
        for i, pair in enumerate(cond.kv):
            for name, z in zip(("key", "value"), pair, strict=True):
                if tuple(z.shape) != want:
                    raise ValueError(f"prefix layer {i} {name} has shape {tuple(z.shape)}; expected (B, n_kv_head, "
                                     f"Lp, head_dim) = {want} for a pad mask of shape {tuple(pad.shape)}")
        if cfg.mode == "pi0" and (cond.state is None or tuple(cond.state.shape) != (want[0], cfg.state_dim)):
            got = None if cond.state is None else tuple(cond.state.shape)
            raise ValueError(f"π0 needs the prefix's state (B, state_dim) = {(want[0], cfg.state_dim)}, got {got}")
        return cond

    def prepare(self, cond, timesteps: list[float] | None = None) -> FlowContext:
        """Everything fixed across denoising steps (once per chunk): `cond` is a Prefix (a VLM's per-layer K/V) or
        an obs history (B, n_obs_steps, obs_dim) for the stand-in prefix encoder. With `timesteps` (the sampler's
        t values) the per-step time features are computed too, used through `ctx.at_step(k)`."""
        cfg, H = self.config, self.config.horizon
        prefix = self._prefix(cond)
        pad, kv = prefix.pad_mask, list(prefix.kv)
        B, dev = pad.shape[0], pad.device
        start = pad.sum(-1, keepdim=True)  # (B, 1) the first suffix position: after the valid prefix tokens
        table = lambda pos: rope_table(pos, cfg.head_dim, cfg.rope_max_wavelength)  # noqa: E731
        if cfg.mode == "pi0":  # the state token sees the prefix and itself only: its K/V are fixed per chunk
            pad = torch.cat([pad, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
            kv = collect_kv(self.layers, self.state_proj(prefix.state)[:, None], table(start),
                            additive(pad)[:, None, None], past=kv)
            start = start + 1
        actions_see = torch.ones(H, H, dtype=torch.bool, device=dev)
        if cfg.mode == "smolvla":  # causal among action tokens
            actions_see = actions_see.tril()
        allowed = torch.cat([pad[:, None, :].expand(B, H, -1), actions_see.expand(B, H, H)], dim=2)
        ctx = FlowContext(kv, additive(allowed)[:, None], table(start + torch.arange(H, device=dev)))
        if any(layer.attn.cross for layer in self.layers):
            ctx.cross_mask = additive(prefix.pad_mask)[:, None, None]
            ctx.cross_rope = table(torch.arange(H, device=dev)[None])
            ctx.kv = [layer.attn.cross_kv(*prefix.kv[i]) if layer.attn.cross else kv[i]
                      for i, layer in enumerate(self.layers)]
        if timesteps is not None:
            ctx.time = self._time_features(torch.tensor(timesteps, dtype=torch.float32, device=dev))
        return ctx

    def forward(self, x: torch.Tensor, t, ctx: FlowContext) -> torch.Tensor:
        """x (B, H, Da) at time t (scalar or (B,)), ctx from `prepare` -> velocity (B, H, Da)."""
        h, mods = self._embed(x, t, ctx)
        for i, layer in enumerate(self.layers):
            cross = layer.attn.cross
            h = h + layer.attn(h, ctx.kv[i], ctx.cross_mask if cross else ctx.mask,
                               ctx.cross_rope if cross else ctx.rope, mods[2 * i])
            h = h + layer.mlp(h, mods[2 * i + 1])
        return self.action_out_proj(self.norm(h, mods[-1]))  # (B, H, C) -> (B, H, Da)

    def skip_stack(self, x: torch.Tensor, t, ctx: FlowContext, residual: torch.Tensor) -> torch.Tensor:
        """forward() with the layers replaced by adding `residual` (the sum of every attn / mlp output):
        what a cache runs on a step on which it skips every block."""
        h, mods = self._embed(x, t, ctx)
        return self.action_out_proj(self.norm(h + residual, mods[-1]))

    def _embed(self, x: torch.Tensor, t, ctx: FlowContext) -> tuple[torch.Tensor, list]:
        """Checks, then the action tokens entering the stack (B, H, C) and the per-norm modulations."""
        cfg = self.config
        if not isinstance(ctx, FlowContext):
            raise TypeError(f"ctx must be the FlowContext made by prepare(), got {type(ctx).__name__}")
        B, H, _ = x.shape
        if x.shape[1:] != (cfg.horizon, cfg.action_dim):
            raise ValueError(f"actions must be (B, {cfg.horizon}, {cfg.action_dim}), got {tuple(x.shape)}")
        if len(ctx.mask) != B:
            raise ValueError(f"context is for batch {len(ctx.mask)}, actions have batch {B}")
        time = ctx.step_time
        if time is None:
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)
            if t.shape[0] not in (1, B):
                raise ValueError(f"t must be a scalar or shape ({B},), got {t.shape[0]} values")
            time = self._time_features(t)  # (N, C) or π0.5 (N, 2L + 1, 3C)

        h = self.action_in_proj(x)  # (B, H, C)
        mods = [None] * (2 * cfg.n_layer + 1)
        if cfg.mode == "pi05":
            mods = time[:, :, None].unbind(1)  # 2L + 1 times (N, 1, 3C)
        else:
            h = torch.cat([h, time[:, None].expand(B, H, -1)], dim=-1)  # (B, H, 2C): action first, time second
            h = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(h)))  # (B, H, C)
        return h, mods
