"""The engine on a model it has never seen: a tiny flow denoiser with `blocks.{i}.attn|mlp` branches,
driven by a minimal policy that honours the engine's contract (model, sampler, checkpoint_hash,
sampling_hooks, reset, predict_action_chunk)."""

import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import policy_accel as pa
from policy_accel.cache import Schedule


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


class TinyFlowDenoiser(nn.Module):
    cache_blocks = r"blocks\.\d+\.(attn|mlp)"

    def __init__(self, action_dim=3, cond_dim=4, width=16, depth=3):
        super().__init__()
        self.inp = nn.Linear(action_dim + cond_dim + 1, width)
        self.blocks = nn.ModuleList(TinyBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, action_dim)

    def forward(self, x, t, cond):  # x (B, T, Da), t float, cond (B, Dc) -> velocity (B, T, Da)
        B, T, _ = x.shape
        tt = torch.full((B, T, 1), float(t), dtype=x.dtype, device=x.device)
        h = self.inp(torch.cat([x, cond[:, None].expand(B, T, -1), tt], dim=-1))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class TinyFlowPolicy:
    def __init__(self, num_steps=10, horizon=5):
        torch.manual_seed(0)
        self.model = TinyFlowDenoiser().eval()
        self.sampler = SimpleNamespace(kind="flow", num_steps=num_steps)
        self.checkpoint_hash = "tiny-flow"
        self.sampling_hooks, self.acceleration, self.horizon = [], None, horizon

    def reset(self):
        for h in self.sampling_hooks:
            h.reset()

    @torch.no_grad()
    def predict_action_chunk(self, obs, noise=None):
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(-1, 4)
        g = torch.Generator().manual_seed(1)
        x = noise.clone() if noise is not None else torch.randn(obs.shape[0], self.horizon, 3, generator=g)
        ts = [1 - k / self.sampler.num_steps for k in range(self.sampler.num_steps)]
        for h in self.sampling_hooks:
            h.begin_chunk(obs.shape[0], ts)
        for k, t in enumerate(ts):
            for h in self.sampling_hooks:
                h.begin_step(k, t)
            x = x - self.model(x, t, obs) / self.sampler.num_steps
        return x


@pytest.fixture
def policy():
    return TinyFlowPolicy()


OBS = torch.linspace(-1, 1, 12).reshape(3, 4)


def test_compute_every_step_equals_uncached_exactly(policy):
    ref = policy.predict_action_chunk(OBS)
    pa.accelerate(policy, pa.LosslessConfig())
    assert torch.equal(policy.predict_action_chunk(OBS), ref)
    stats = pa.cache_stats(policy)
    assert all(b.computed == 10 and b.skipped == 0 for b in stats.blocks.values()) and len(stats.blocks) == 6


def test_remove_restores_exact_behaviour_and_signature(policy):
    module = policy.model.blocks[1].mlp
    sig = inspect.signature(module.forward)
    ref = policy.predict_action_chunk(OBS)
    pa.accelerate(policy, pa.UniformConfig(interval=3))
    assert not torch.equal(policy.predict_action_chunk(OBS), ref)
    assert "forward" in module.__dict__ and inspect.signature(module.forward) == sig
    pa.remove_acceleration(policy)
    assert "forward" not in module.__dict__ and policy.sampling_hooks == [] and policy.acceleration is None
    assert inspect.signature(module.forward) == sig
    assert torch.equal(policy.predict_action_chunk(OBS), ref)


def test_uniform_counts_and_cache_memory_bound(policy):
    pa.accelerate(policy, pa.UniformConfig(interval=4))
    policy.predict_action_chunk(OBS)
    stats = pa.cache_stats(policy)
    assert all((b.computed, b.skipped) == (3, 7) for b in stats.blocks.values())  # steps 0, 4, 8
    one = 3 * 5 * 16 * 4  # one (B, T, C) float32 branch output
    assert stats.cache_bytes == 6 * one  # order 0: one tensor per block
    pa.remove_acceleration(policy)
    pa.accelerate(policy, pa.TaylorSeerConfig(interval=4, order=2))
    policy.predict_action_chunk(OBS)
    assert pa.cache_stats(policy).cache_bytes == 6 * 3 * one  # order + 1 tensors per block
    acc = policy.acceleration
    pa.remove_acceleration(policy)
    assert all(h.forecaster.nbytes == 0 for h in acc.hooks)


@pytest.mark.parametrize("config", [pa.UniformConfig(interval=3), pa.TaylorSeerConfig(interval=3, order=2)])
def test_batch_equals_per_sample_under_static_schedule(policy, config):
    noise = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(7))
    pa.accelerate(policy, config)
    batch = policy.predict_action_chunk(OBS, noise)
    single = torch.cat([policy.predict_action_chunk(OBS[i:i + 1], noise[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)


def test_no_state_leaks_across_chunks_episodes_or_batch_sizes(policy):
    pa.accelerate(policy, pa.TaylorSeerConfig(interval=3, order=2))
    first_b = policy.predict_action_chunk(OBS[:2])
    policy.predict_action_chunk(OBS)  # another chunk, another batch size
    policy.reset()
    again = policy.predict_action_chunk(OBS[:2])
    assert torch.equal(first_b, again)


def test_taylor_beats_reuse_on_smooth_trajectory(policy):
    ref = policy.predict_action_chunk(OBS)
    errors = {}
    for cfg in [pa.UniformConfig(interval=3), pa.TaylorSeerConfig(interval=3, order=1)]:
        pa.accelerate(policy, cfg)
        errors[cfg.tag] = (policy.predict_action_chunk(OBS) - ref).abs().max().item()
        pa.remove_acceleration(policy)
    assert 0 < errors["taylorseer_n3_o1_w1"] < errors["uniform_n3"]


def test_schedule_for_other_policy_or_step_count_is_rejected(policy):
    names = [b.name for b in pa.find_blocks(policy.model)]
    good = Schedule(blocks={n: [0, 5] for n in names}, num_steps=10, sampler="flow", checkpoint_hash="tiny-flow",
                    budget=2)
    pa.accelerate(policy, pa.BACConfig(schedule=good))
    pa.remove_acceleration(policy)
    with pytest.raises(ValueError, match="checkpoint"):
        pa.accelerate(policy, pa.BACConfig(schedule=Schedule(**{**good.__dict__, "checkpoint_hash": "other"})))
    with pytest.raises(ValueError, match="made for 10 steps"):
        policy.sampler.num_steps = 20
        pa.accelerate(policy, pa.BACConfig(schedule=good))


def test_sampler_changed_after_accelerate_is_rejected(policy):
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    policy.sampler.num_steps = 5
    with pytest.raises(ValueError, match="configured for 10 denoising steps"):
        policy.predict_action_chunk(OBS)


def test_bad_configs_raise_clear_errors(policy):
    with pytest.raises(TypeError, match="unknown acceleration config"):
        pa.accelerate(policy, SimpleNamespace(blocks=None))
    with pytest.raises(ValueError, match="interval"):
        pa.UniformConfig(interval=0)
    with pytest.raises(ValueError, match="order"):
        pa.TaylorSeerConfig(order=-1)
    with pytest.raises(ValueError, match="schedule=.*or budget"):
        pa.BACConfig()
    with pytest.raises(ValueError, match="needs calibration observations"):
        pa.accelerate(policy, pa.BACConfig(budget=3))
    with pytest.raises(ValueError, match=r"budget must be in \[1, 10\]"):
        pa.calibrate(policy, [OBS[0].numpy()], budget=11)
    with pytest.raises(ValueError, match="matches the block pattern"):
        pa.accelerate(policy, pa.UniformConfig(interval=2, blocks=r"nothing\.here"))
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    with pytest.raises(RuntimeError, match="already accelerated"):
        pa.accelerate(policy, pa.UniformConfig(interval=3))


def test_calibrate_builds_a_valid_schedule_and_bac_taylor_runs(policy):
    obs = [o.numpy() for o in torch.randn(6, 4, generator=torch.Generator().manual_seed(3))]
    sched = pa.calibrate(policy, obs, budget=4, bubble_blocks=2, batch_size=4)
    assert set(sched.blocks) == {b.name for b in pa.find_blocks(policy.model)}
    assert all(s[0] == 0 and len(s) >= 4 for s in sched.blocks.values())
    assert sched.calibration["n_observations"] == 6
    assert 0 <= sched.calibration["mean_jaccard_to_aggregate"] <= 1
    # the union: FFN sets stay as ACS chose them; each chosen (most volatile) block at layer L computes
    # on every step on which an FFN at layer >= L computes, and only gains steps
    acs, vol = sched.calibration["acs_steps_before_union"], sched.calibration["volatility"]
    infos = {b.name: b for b in pa.find_blocks(policy.model)}
    chosen = sorted(vol, key=lambda b: -vol[b])[:2]
    for name, steps in sched.blocks.items():
        if infos[name].is_ffn or name not in chosen:
            assert steps == acs[name], name
        else:
            assert set(acs[name]) <= set(steps), name
            for ffn in (b for b in infos.values() if b.is_ffn and b.layer >= infos[name].layer):
                assert set(sched.blocks[ffn.name]) <= set(steps), (name, ffn.name)
    assert any(sched.blocks[n] != acs[n] for n in chosen)  # this calibration makes the union do something
    ref = policy.predict_action_chunk(OBS)
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=1))
    out = policy.predict_action_chunk(OBS)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_diffusers_taylorseer_peer_matches_ours_with_its_conventions(policy):
    from policy_accel.cache.peers import apply_diffusers_taylorseer, diffusers_refresh_steps

    names = [b.name for b in pa.find_blocks(policy.model)]
    steps = diffusers_refresh_steps(10, interval=3, warmup=2)
    assert steps == [0, 1, 3, 6, 9]
    handle = apply_diffusers_taylorseer(policy, interval=3, order=2, warmup=2)
    theirs = policy.predict_action_chunk(OBS)
    again = policy.predict_action_chunk(OBS)  # state reset per chunk
    handle.remove()
    assert torch.equal(theirs, again)
    sched = Schedule(blocks={n: steps for n in names}, num_steps=10, sampler="flow", checkpoint_hash="tiny-flow")
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=2, differences="backward"))
    ours = policy.predict_action_chunk(OBS)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
