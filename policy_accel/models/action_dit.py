"""Action DiTs of VLA policies, nanoGPT-style: GR00T N1.5's flow-matching action head and CogACT's diffusion
action model, one denoiser (`model_type="action_dit"`) switched by `ActionDiTConfig.mode`.

GR00T N1.5 (LeRobot 0.4.4 `groot/action_head/`; tests/fixtures/vla/README.md), velocity:
    tokens = [state_encoder(state) (1) | future_tokens (F) | action_encoder(x, t) + position_embedding (T)]
    block i: h += attn(AdaLN(h; temb)) (even: cross-attention to the VL tokens, odd: self); h += ff(LN(h))
    out = action_decoder(proj_out_2(LN(h) * (1 + scale) + shift))[-T:]   (shift, scale from temb)
CogACT (microsoft/CogACT `action_model/models.py`), epsilon:
    tokens = [t_embedder(t) + z_embedder(cognition) (1) | x_embedder(x) (T)] + positional_embedding
    block i: h += attn(LN(h)); h += ff(LN(h));  out = final_layer(h)[1:]
  or, with `adaln_zero` (DiT): c = t_emb + z_emb, h = x_emb + pos-emb, each branch modulated and gated by
  shift/scale/gate = adaLN_modulation(c) (zero-initialised: every block starts as the identity).

    ctx = model.prepare(cond, timesteps)   # once per chunk: VL tokens + their K/V, state, per-step modulations
    out = model(x, t, ctx.at_step(k))      # per sampler step; ctx.uncond(): CogACT's learned null condition

Our flow sampler runs t from 1 (noise) to 0 with velocity noise - x0; GR00T runs t_g = 1 - t with v_g = x0 -
noise and integer buckets int(t_g * 1000), so this model returns -v_g; sampling buckets are upstream's
int(k / N * 1000) (step k of N), computed in `prepare` from the sampler's timesteps (Python floats, no sync).
"""

from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from policy_accel.denoiser import Context
from policy_accel.models import register_family
from policy_accel.models.action_dit_config import ActionDiTConfig
from policy_accel.models.action_dit_io import (
    AdaLayerNorm,
    CategorySpecificLinear,
    CategorySpecificMLP,
    LabelEmbedder,
    MultiEmbodimentActionEncoder,
    TimestepEncoder,
    action_time_features,
    cogact_time_features,
    modulate,
)
from policy_accel.models.blocks import KV, decay_groups, family_config


def _heads(z: torch.Tensor, h: int) -> torch.Tensor:  # (B, S, h*d) -> (B, h, S, d)
    return z.view(z.shape[0], z.shape[1], h, -1).transpose(1, 2)


class Attention(nn.Module):
    """Residual branch: norm1 -> multi-head attention (self, or cross to memory) -> to_out [-> gate].
    norm: "ada" (GR00T AdaLayerNorm), "affine" / "plain" (LayerNorm with / without affine), "zero"
    (plain LayerNorm, then shift/scale/gate from `mod`, DiT adaLN-Zero)."""

    def __init__(self, dim, heads, head_dim, *, kv_dim=None, norm="plain", eps=1e-5, dropout=0.0):
        super().__init__()
        self.heads, self.style, self.is_cross = heads, norm, kv_dim is not None
        self.norm1 = AdaLayerNorm(dim, eps) if norm == "ada" else nn.LayerNorm(dim, eps, norm == "affine")
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(kv_dim or dim, heads * head_dim)
        self.to_v = nn.Linear(kv_dim or dim, heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Dropout(dropout)])
        self.final_dropout = nn.Dropout(dropout)

    def kv(self, memory: torch.Tensor) -> KV:  # (B, S, kv_dim) -> keys, values (B, H, S, hd)
        return _heads(self.to_k(memory), self.heads), _heads(self.to_v(memory), self.heads)

    def forward(self, x, mod=None, memory=None):  # x (B, T, C); memory: VL tokens (B, S, D) or their KV
        if self.style == "zero":
            shift, scale, gate = mod.chunk(3, dim=-1)
            h = modulate(self.norm1(x), shift, scale)
        else:
            h = self.norm1(x, mod) if self.style == "ada" else self.norm1(x)
        q = _heads(self.to_q(h), self.heads)  # (B, H, T, hd)
        k, v = (memory if isinstance(memory, tuple) else self.kv(memory)) if self.is_cross else self.kv(h)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        y = self.final_dropout(self.to_out[1](self.to_out[0](y.transpose(1, 2).flatten(2))))  # (B, T, C)
        return gate[:, None] * y if self.style == "zero" else y


class FeedForward(nn.Module):
    """Residual branch: norm3 [-> shift/scale] -> Linear 4x -> GELU-tanh -> Linear [-> gate]."""

    def __init__(self, dim, mult=4, *, norm="plain", eps=1e-5, dropout=0.0):
        super().__init__()
        self.style = norm
        self.norm3 = nn.LayerNorm(dim, eps, norm == "affine")
        gelu = nn.Sequential(OrderedDict(proj=nn.Linear(dim, mult * dim), act=nn.GELU("tanh")))  # diffusers' GELU
        self.net = nn.Sequential(gelu, nn.Dropout(dropout), nn.Linear(mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x, mod=None):  # (B, T, C) -> (B, T, C)
        if self.style != "zero":
            return self.net(self.norm3(x))
        shift, scale, gate = mod.chunk(3, dim=-1)
        return gate[:, None] * self.net(modulate(self.norm3(x), shift, scale))


class Block(nn.Module):
    def __init__(self, attn: Attention, ff: FeedForward, adaln_width: int = 0):
        super().__init__()
        self.attn, self.ff = attn, ff
        if adaln_width:  # DiT adaLN-Zero: c -> (shift, scale, gate) of attn, then of ff
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_width, 6 * adaln_width))

    def forward(self, hidden_states, attn_mod=None, ff_mod=None, memory=None):  # (B, T, C) -> (B, T, C)
        x = hidden_states + self.attn(hidden_states, attn_mod, memory)
        return x + self.ff(x, ff_mod)


@dataclass
class StepTensors:
    """One step's modulations: per block (attn_mod, ff_mod); the output modulation; GR00T's action-encoder
    time features (tau); CogACT's time embedding (temb, in-context mode). Batch 1 (time only) or B."""

    mods: list
    out: torch.Tensor | None = None
    tau: torch.Tensor | None = None
    temb: torch.Tensor | None = None


@dataclass
class ActionDiTContext(Context):
    prefix: torch.Tensor  # GR00T: [state ; future tokens] (B, 1+F, C); CogACT: condition embedding z (B, 1, C)
    memory: list = field(default_factory=list)  # GR00T per block: VL K/V (cross blocks) or None
    selected: dict | None = None  # GR00T: per-row embodiment weights of the action encoder / decoder
    vl: torch.Tensor | None = None  # GR00T: VL tokens after vlln + vl_self_attention (B, S, D)
    null: torch.Tensor | None = None  # CogACT: null-condition embedding (1, 1, C)
    steps: list | None = None  # per sampler step: StepTensors (conditional branch)
    null_steps: list | None = None  # per sampler step: StepTensors of the null branch (adaLN-Zero)
    step: StepTensors | None = None  # the view of at_step(k)
    null_step: StepTensors | None = None

    def at_step(self, step: int) -> "ActionDiTContext":
        if self.steps is None:
            return self  # forward computes the step tensors from t
        return replace(self, step=self.steps[step], null_step=self.null_steps[step] if self.null_steps else None)

    def uncond(self) -> "ActionDiTContext":
        if self.null is None:
            raise ValueError("no null condition in this context (GR00T N1.5 is not trained with condition dropout, "
                             "or this is the unconditional context already): guidance is not available")
        return replace(self, prefix=self.null.expand_as(self.prefix), null=None, steps=self.null_steps or self.steps,
                       null_steps=None, step=self.null_step or self.step, null_step=None)


@register_family("action_dit")
class ActionDiT(nn.Module):
    cache_blocks = r"transformer_blocks\.\d+\.(attn|ff)"
    block_stack = "transformer_blocks"  # whole layers (hidden_states -> hidden_states): diffusers FBC / MagCache

    @classmethod
    def config_for(cls, obs_dim: int, action_dim: int, horizon: int, n_obs_steps: int, arch: dict) -> ActionDiTConfig:
        """Config for flat observations: `arch` holds mode and sizes; GR00T's state is the latest observation."""
        fixed = dict(obs_dim=obs_dim, action_dim=action_dim, horizon=horizon, n_obs_steps=n_obs_steps)
        state = obs_dim - arch.get("instruction_dim", 0)
        fixed |= {"state_dim": state} if arch.get("mode", "groot_n15") == "groot_n15" else {}
        return family_config(ActionDiTConfig, "action_dit", fixed, arch)

    def __init__(self, config: ActionDiTConfig):
        super().__init__()
        self.config = cfg = config
        self.groot = cfg.mode == "groot_n15"
        self.prediction = "velocity" if self.groot else "epsilon"
        C, T, E, D = cfg.width, cfg.horizon, cfg.num_embodiments, cfg.cross_attention_dim
        if self.groot:
            if cfg.obs_dim:  # stand-in VLM: obs step -> one VL token (and the instruction -> one, first)
                self.obs_proj = nn.Linear(cfg.obs_dim - cfg.instruction_dim, D)
                if cfg.instruction_dim:
                    self.instruction_proj = nn.Linear(cfg.instruction_dim, D)
            self.timestep_encoder = TimestepEncoder(C)
            self.transformer_blocks = nn.ModuleList(
                Block(Attention(C, cfg.num_heads, cfg.head_dim, kv_dim=None if i % 2 else D, norm="ada",
                                dropout=cfg.dropout), FeedForward(C, cfg.ff_mult, dropout=cfg.dropout))
                for i in range(cfg.num_layers))
            self.norm_out = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
            self.proj_out_1, self.proj_out_2 = nn.Linear(C, 2 * C), nn.Linear(C, cfg.hidden_size)
            self.state_encoder = CategorySpecificMLP(E, cfg.state_dim, cfg.hidden_size, C)
            self.action_encoder = MultiEmbodimentActionEncoder(cfg.action_dim, C, E)
            self.action_decoder = CategorySpecificMLP(E, cfg.hidden_size, cfg.hidden_size, cfg.action_dim)
            self.future_tokens = nn.Embedding(cfg.num_future_tokens, C)
            self.vlln = nn.LayerNorm(D)
            self.vl_self_attention = nn.ModuleDict(dict(transformer_blocks=nn.ModuleList(  # pre-LN, no final norm
                Block(Attention(D, cfg.vl_heads, cfg.vl_head_dim, norm="affine", dropout=cfg.dropout),
                      FeedForward(D, norm="affine", dropout=cfg.dropout)) for _ in range(cfg.vl_layers))))
            self.position_embedding = nn.Embedding(cfg.max_seq_len, C)
            for emb in (self.future_tokens, self.position_embedding):
                nn.init.normal_(emb.weight, std=0.02)
            return
        if cfg.obs_dim:
            self.obs_proj = nn.Linear(cfg.n_obs_steps * cfg.obs_dim, cfg.cond_dim)  # stand-in: history -> cognition
        norm, zero = ("zero", C) if cfg.adaln_zero else ("plain", 0)
        self.x_embedder = nn.ModuleDict(dict(linear=nn.Linear(cfg.action_dim, C)))
        self.t_embedder = nn.ModuleDict(dict(mlp=nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))))
        self.z_embedder = LabelEmbedder(cfg.cond_dim, C)
        self.positional_embedding = nn.Parameter(C ** -0.5 * torch.randn(T + (0 if zero else 1), C))
        self.transformer_blocks = nn.ModuleList(
            Block(Attention(C, cfg.num_heads, cfg.head_dim, norm=norm, eps=1e-6, dropout=cfg.dropout),
                  FeedForward(C, cfg.ff_mult, norm=norm, eps=1e-6, dropout=cfg.dropout), zero)
            for _ in range(cfg.num_layers))
        self.final_layer = nn.ModuleDict(dict(norm_final=nn.LayerNorm(C, 1e-6, elementwise_affine=False),
                                              linear=nn.Linear(C, cfg.action_dim)))
        if zero:
            self.final_layer["adaLN_modulation"] = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        for name, m in self.named_modules():  # CogACT / DiT initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
                if name.startswith(("x_embedder", "z_embedder", "t_embedder")):
                    nn.init.normal_(m.weight, std=0.02)
                if name.startswith("final_layer") or "adaLN" in name:
                    nn.init.zeros_(m.weight)

    def optim_groups(self, weight_decay: float) -> list[dict]:  # Linear and per-embodiment weights decay
        return decay_groups(self, weight_decay, (CategorySpecificLinear, "W"))

    # ---------------------------------------------------------------- once per chunk
    def _inputs(self, cond) -> dict:
        """Flat obs (B, To, obs_dim) or a mapping of upstream's inputs -> validated upstream inputs."""
        if isinstance(cond, torch.Tensor):
            from policy_accel.models.stand_ins import action_dit_inputs

            return action_dit_inputs(self, cond)
        cfg = self.config
        names = ("backbone_features", "state", "embodiment_id") if self.groot else ("cognition_features",)
        if set(cond) - set(names) - {"backbone_attention_mask"} or set(names) - set(cond):  # upstream ignores the mask
            raise ValueError(f"cond mapping must hold exactly {names}, got {sorted(cond)}")
        B = len(cond[names[0]])
        want = {"backbone_features": (B, None, cfg.cross_attention_dim), "state": (B, 1, cfg.state_dim),
                "embodiment_id": (B,), "cognition_features": (B, 1, cfg.cond_dim)}
        for name in names:
            shape, w = tuple(cond[name].shape), want[name]
            if len(shape) != len(w) or any(a is not None and a != s for a, s in zip(w, shape, strict=True)):
                raise ValueError(f"cond[{name!r}] must have shape {want[name]} (None: any length >= 1), got {shape}")
        if self.groot:
            ids = cond["embodiment_id"]
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or cond["backbone_features"].shape[1] == 0:
                raise ValueError("embodiment_id must be integer and backbone_features must hold >= 1 token")
            if ((ids < 0) | (ids >= cfg.num_embodiments)).any():
                raise ValueError(f"embodiment_id {ids.tolist()} out of range [0, {cfg.num_embodiments})")
        return dict(cond)

    def prepare(self, cond, timesteps=None) -> ActionDiTContext:
        """Once per chunk: condition tokens (and GR00T's VL K/V per cross block, state token, embodiment
        weights); with the sampler's `timesteps`, every step's time embedding and modulations too."""
        c = self._inputs(cond)
        if self.groot:
            ids = c["embodiment_id"]
            vl = self.vlln(c["backbone_features"])  # (B, S, D)
            for block in self.vl_self_attention.transformer_blocks:
                vl = block(vl)
            selected = {f"W{i}": (w.W[ids], w.b[ids]) for i, w in enumerate(self.action_encoder.children(), 1)}
            selected |= {name: (w.W[ids], w.b[ids]) for name, w in self.action_decoder.named_children()}
            state = self.state_encoder(c["state"], ids)  # (B, 1, C)
            prefix = torch.cat([state, self.future_tokens.weight.expand(len(vl), -1, -1)], dim=1)  # (B, 1+F, C)
            memory = [b.attn.kv(vl) if b.attn.is_cross else None for b in self.transformer_blocks]
            ctx = ActionDiTContext(prefix, memory, selected, vl)
        else:
            z = c["cognition_features"]
            if self.training and self.config.class_dropout_prob > 0:  # CogACT's condition dropout
                drop = torch.rand(len(z), device=z.device) < self.config.class_dropout_prob
                z = torch.where(drop[:, None, None], self.z_embedder.uncondition, z)
            # a copy, not the Parameter itself, as the module's input (grads still flow when enabled): FLOP
            # counting without grad cannot hook a leaf that requires grad
            null = self.z_embedder.linear(self.z_embedder.uncondition.clone())[None]  # (1, 1, C)
            ctx = ActionDiTContext(self.z_embedder.linear(z), null=null)
        if timesteps is not None:
            times = self._sampling_times(timesteps, ctx.prefix.device)  # (K,)
            ctx.steps = [self._step_tensors(times[k:k + 1], ctx.prefix) for k in range(len(times))]
            if self.config.adaln_zero:
                null = ctx.null.expand_as(ctx.prefix)
                ctx.null_steps = [self._step_tensors(times[k:k + 1], null) for k in range(len(times))]
        return ctx

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input from t (N,): CogACT's train step; GR00T's bucket int((1 - t) * buckets)."""
        return ((1 - t) * self.config.num_timestep_buckets).long() if self.groot else t

    def _sampling_times(self, timesteps, device=None) -> torch.Tensor:
        """The sampler's t values (Python floats) -> the model's time input per step (K,); GR00T: upstream's
        sampling buckets int(k / N * buckets) on the flow grid t = 1 - k/N."""
        t = [float(v) for v in timesteps]
        if self.groot:
            N, k = len(t), [round((1 - v) * len(t)) for v in t]
            if any(abs((1 - v) * N - j) > 1e-4 or not 0 <= j < N for v, j in zip(t, k, strict=True)):
                raise ValueError(f"GR00T buckets need the flow grid t = 1 - k/{N}; got timesteps {t}")
            t = [int(j / N * self.config.num_timestep_buckets) for j in k]
        return torch.tensor(t, device=device)

    def _step_tensors(self, time: torch.Tensor, z: torch.Tensor) -> StepTensors:
        """Per-step tensors from the time input (N,) with N = 1 or B (and, adaLN-Zero, the condition z)."""
        if self.groot:
            temb = F.silu(self.timestep_encoder(time))  # (N, C)
            return StepTensors([(b.attn.norm1.linear(temb), None) for b in self.transformer_blocks],
                               self.proj_out_1(temb), tau=action_time_features(time, self.config.width))
        temb = self.t_embedder.mlp(cogact_time_features(time))  # (N, C)
        if not self.config.adaln_zero:
            return StepTensors([(None, None)] * len(self.transformer_blocks), temb=temb)
        c = temb + z[:, 0]  # (B, C)
        return StepTensors([tuple(b.adaLN_modulation(c).chunk(2, dim=-1)) for b in self.transformer_blocks],
                           self.final_layer.adaLN_modulation(c))

    # ---------------------------------------------------------------- per step
    def forward(self, sample: torch.Tensor, timestep, ctx: ActionDiTContext) -> torch.Tensor:
        """sample (B, T, Da), timestep 0-dim or (B,), ctx from prepare -> velocity (GR00T) or epsilon (B, T, Da)."""
        h, step = self._embed(sample, timestep, ctx)
        if self.groot:
            for block, (mod, _), kv in zip(self.transformer_blocks, step.mods, ctx.memory, strict=True):
                h = block(h, mod, None, kv)
        elif self.config.adaln_zero:
            for block, (am, fm) in zip(self.transformer_blocks, step.mods, strict=True):
                h = block(h, am, fm)
        else:
            for block in self.transformer_blocks:
                h = block(h)
        return self._head(h, step, ctx, sample.shape[1])

    def skip_stack(self, sample: torch.Tensor, timestep, ctx: ActionDiTContext, residual: torch.Tensor
                   ) -> torch.Tensor:
        """forward() with the blocks replaced by adding `residual` (the sum of every attn / ff output):
        what a cache runs on a step on which it skips every block."""
        h, step = self._embed(sample, timestep, ctx)
        return self._head(h + residual, step, ctx, sample.shape[1])

    def _embed(self, sample: torch.Tensor, timestep, ctx: ActionDiTContext) -> tuple[torch.Tensor, StepTensors]:
        """Checks, then the tokens entering the blocks and this step's time tensors."""
        B, T, Da = sample.shape
        if not isinstance(ctx, ActionDiTContext):
            raise TypeError(f"ctx must be the ActionDiTContext made by prepare(), got {type(ctx).__name__}")
        if (T, Da) != (self.config.horizon, self.config.action_dim) or len(ctx.prefix) != B:
            raise ValueError(f"sample must be ({len(ctx.prefix)}, {self.config.horizon}, {self.config.action_dim}) "
                             f"for this context, got {tuple(sample.shape)}")
        step = ctx.step
        if step is None:
            t = torch.as_tensor(timestep, device=sample.device)
            if t.ndim > 1 or (t.ndim == 1 and len(t) != B):
                raise ValueError(f"timestep must be a scalar or shape ({B},), got {tuple(t.shape)}")
            step = self._step_tensors(self._time(t.reshape(-1)), ctx.prefix)
        if self.groot:
            a = self.action_encoder(sample, step.tau, ctx.selected) + self.position_embedding.weight[:T]
            return torch.cat([ctx.prefix, a], dim=1), step  # (B, 1+F+T, C)
        x = self.x_embedder.linear(sample)  # (B, T, C)
        if self.config.adaln_zero:
            return x + self.positional_embedding, step
        return torch.cat([step.temb[:, None] + ctx.prefix, x], dim=1) + self.positional_embedding, step  # (B, 1+T, C)

    def _head(self, h: torch.Tensor, step: StepTensors, ctx: ActionDiTContext, T: int) -> torch.Tensor:
        if self.groot:
            shift, scale = step.out.chunk(2, dim=-1)
            h = self.proj_out_2(modulate(self.norm_out(h), shift, scale))[:, -T:]  # (B, T, hidden)
            return -self.action_decoder(h, ctx.selected)  # -v_g = noise - x0
        if self.config.adaln_zero:
            shift, scale = step.out.chunk(2, dim=-1)
            return self.final_layer.linear(modulate(self.final_layer.norm_final(h), shift, scale))
        return self.final_layer.linear(self.final_layer.norm_final(h))[:, 1:]
