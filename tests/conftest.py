"""Shared test setup: one-thread torch, and the model families the cache contract suite runs on."""


import numpy as np
import pytest
import torch
import torch.nn as nn

import policy_accel as pa
from policy_accel.cache import Binding


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP barriers make them crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- a second family: a tiny guided flow DiT
class GuidedContext(pa.Context):
    def __init__(self, token: torch.Tensor, null: torch.Tensor):
        self.token, self.null = token, null  # (B, 1, C) condition token; (1, 1, C) learned null token

    def uncond(self) -> "GuidedContext":
        return GuidedContext(self.null.expand_as(self.token), self.null)


class Branch(nn.Module):
    def __init__(self, width: int, attn: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True) if attn else None
        self.mlp = None if attn else nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):  # (B, T, C) -> (B, T, C) residual-branch output
        h = self.norm(x)
        return self.attn(h, h, h, need_weights=False)[0] if self.attn is not None else self.mlp(h)


class TinyBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn, self.mlp = Branch(width, True), Branch(width, False)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyGuidedDiT(nn.Module):
    """A velocity model over [condition token ; action tokens], with a null token for guidance."""

    prediction = "velocity"
    cache_blocks = r"blocks\.\d+\.(attn|mlp)"

    def __init__(self, action_dim=3, cond_dim=4, width=16, depth=3):
        super().__init__()
        self.inp = nn.Linear(action_dim + 1, width)
        self.cond = nn.Linear(cond_dim, width)
        self.null = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.ModuleList(TinyBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, action_dim)

    def prepare(self, cond, timesteps=None) -> GuidedContext:
        return GuidedContext(self.cond(cond)[:, None], self.null)

    def forward(self, x, t, ctx: GuidedContext):  # x (B, T, Da), t 0-dim or (B,) -> velocity (B, T, Da)
        h = self._embed(x, t, ctx)
        for block in self.blocks:
            h = block(h)
        return self.out(h[:, 1:])

    def skip_stack(self, x, t, ctx: GuidedContext, residual):  # the Denoiser's optional seam: a pure residual stack
        return self.out((self._embed(x, t, ctx) + residual)[:, 1:])

    def _embed(self, x, t, ctx: GuidedContext):  # (B, T, Da) -> stream (B, 1 + T, C)
        B, T, _ = x.shape
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1).expand(B, T, 1)
        return torch.cat([ctx.token, self.inp(torch.cat([x, tt], dim=-1))], dim=1)


class Family:
    """One model family at the engine level: its denoiser, a clock, a binding, and one chunk."""

    def __init__(self, name, denoiser, cond_shape, action_shape, sampler, guidance=None):
        self.name, self.denoiser, self.sampler, self.guidance = name, denoiser.eval(), sampler, guidance
        self.cond_shape, self.action_shape = cond_shape, action_shape
        self.clock = pa.StepClock()
        self.binding = Binding("tiny-" + name, sampler.kind, sampler.num_steps)
        self.block_names = [b.name for b in pa.find_blocks(self.denoiser)]

    def inputs(self, batch: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.cond_shape, generator=g), torch.randn(batch, *self.action_shape, generator=g)

    @torch.no_grad()
    def chunk(self, cond, noise, sampler=None):
        sampler = sampler or self.sampler
        ctx = self.denoiser.prepare(cond, sampler.timesteps())
        return pa.sample(self.denoiser, ctx, noise, sampler, clock=self.clock, guidance=self.guidance)

    def attach(self, config, **kwargs):
        return pa.attach(self.denoiser, config, self.clock, self.binding, **kwargs)

    def schedule(self, steps) -> pa.Schedule:
        """Every block on `steps`; steps past the sampler's end are dropped (the suite's step lists are written
        for 10+ step samplers, GR00T's native sampler has 4)."""
        steps = [s for s in steps if s < self.sampler.num_steps]
        return pa.Schedule(blocks={n: steps for n in self.block_names}, num_steps=self.sampler.num_steps,
                           sampler=self.sampler.kind, checkpoint_hash=self.binding.checkpoint_hash)


def make_family(name: str) -> Family:
    torch.manual_seed(0)
    if name == "dp_t":
        cfg = pa.DPTransformerConfig(input_dim=3, output_dim=3, horizon=8, n_obs_steps=2, cond_dim=5, n_layer=3,
                                     n_head=2, n_emb=32)
        return Family(name, pa.DPTransformer(cfg), (2, 5), (8, 3), pa.SamplerConfig("ddim", 12, 12))
    if name == "guided_dit":
        return Family(name, TinyGuidedDiT(), (4,), (5, 3), pa.SamplerConfig("flow", 10), pa.Guidance(1.5))
    if name in ("flow_smolvla", "flow_pi05"):  # VLA action experts over the built-in prefix encoder (obs history)
        from policy_accel.models.flow_expert import FlowExpert, FlowExpertConfig
        cfg = FlowExpertConfig(mode=name.removeprefix("flow_"), action_dim=3, horizon=8, n_layer=3, width=32, n_head=4,
                               n_kv_head=2, head_dim=8, mlp_dim=48, obs_dim=5, n_obs_steps=2, prefix_width=24,
                               prefix_mlp_dim=40)
        return Family(name, FlowExpert(cfg), (2, 5), (8, 3), pa.SamplerConfig("flow", 10))
    if name in ("groot_n15", "cogact"):  # action DiTs over a Linear stand-in for the VLM (obs history)
        from policy_accel.models.action_dit import ActionDiT
        arch = dict(mode=name, num_layers=3, num_heads=2, head_dim=8)
        if name == "groot_n15":
            arch |= dict(cross_attention_dim=16, vl_heads=2, vl_head_dim=8, hidden_size=16, num_future_tokens=2,
                         max_seq_len=8)
            return Family(name, ActionDiT(ActionDiT.config_for(5, 3, 8, 2, arch)), (2, 5), (8, 3),
                          pa.SamplerConfig("flow", 4))
        model = ActionDiT(ActionDiT.config_for(5, 3, 8, 2, arch | dict(cond_dim=16)))
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.5)  # zero-initialised as in DiT
        return Family(name, model, (2, 5), (8, 3), pa.SamplerConfig("ddim", 10), pa.Guidance(1.5))
    raise ValueError(name)


FAMILIES = ["dp_t", "guided_dit", "flow_smolvla", "flow_pi05", "groot_n15", "cogact"]


@pytest.fixture(params=FAMILIES)
def family(request) -> Family:
    return make_family(request.param)


# ---------------------------------------------------------------- a tiny DP-T policy
OBS_DIM, ACT_DIM, HORIZON, STEPS = 5, 3, 8, 12


def make_dp_t_policy(sampler=None) -> pa.Policy:
    torch.manual_seed(0)
    cfg = pa.PolicyConfig(obs_dim=OBS_DIM, action_dim=ACT_DIM, horizon=HORIZON, n_obs_steps=2, n_action_steps=4,
                          model=dict(n_layer=3, n_head=2, n_emb=32),
                          sampler=sampler or pa.SamplerConfig("ddpm", STEPS, STEPS))
    policy = pa.Policy(cfg, seed=0)
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-2, 2, (100, OBS_DIM)), rng.uniform(-1, 1, (100, ACT_DIM)))
    return policy


@pytest.fixture
def dp_t_policy() -> pa.Policy:
    return make_dp_t_policy()

