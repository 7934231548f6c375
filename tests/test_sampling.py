"""Samplers: config validation, t values, equality with diffusers' step, oracle recovery of x0."""

import math

import pytest
import torch

from policy_accel.clock import StepClock
from policy_accel.denoiser import Context
from policy_accel.sampling import Guidance, SamplerConfig, build_sampler, ddim_scheduler, ddpm_scheduler, sample

ALPHAS = ddpm_scheduler().alphas_cumprod.double()


def x0_and_noise(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 8, 3, generator=g) * 1.8 - 0.9, torch.randn(4, 8, 3, generator=g)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown sampler kind"):
        SamplerConfig("euler", 10)
    with pytest.raises(ValueError, match="num_train_steps"):
        SamplerConfig("ddim", 101)
    with pytest.raises(ValueError, match="positive int"):
        SamplerConfig("ddpm", 0)
    assert SamplerConfig("flow", 500).num_steps == 500
    assert SamplerConfig("ddim", 10).prediction == "epsilon" and SamplerConfig("flow", 10).prediction == "velocity"


def test_timesteps_are_python_floats():
    assert SamplerConfig("ddpm", 100).timesteps() == [float(t) for t in range(99, -1, -1)]
    assert SamplerConfig("ddim", 10).timesteps() == [90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 0.0]
    assert SamplerConfig("flow", 4).timesteps() == [1.0, 0.75, 0.5, 0.25]
    assert all(type(t) is float for t in SamplerConfig("ddim", 7).timesteps())


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddpm", 25), ("ddim", 10), ("ddim", 7), ("ddim", 100)])
def test_step_equals_diffusers_scheduler_step(kind, steps):
    ours = build_sampler(SamplerConfig(kind, steps))
    theirs = ddpm_scheduler() if kind == "ddpm" else ddim_scheduler()
    theirs.set_timesteps(steps)
    assert [float(t) for t in theirs.timesteps] == list(ours.timesteps)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(ours.timesteps):
        x, eps = torch.randn(2, 8, 3, generator=g) * 1.5, torch.randn(2, 8, 3, generator=g)
        a = ours.step(k, eps, x, torch.Generator().manual_seed(k))
        b = theirs.step(eps, int(t), x, generator=torch.Generator().manual_seed(k)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def eps_oracle(x0, calls, clock):
    def denoise(x, t, ctx):
        calls.append((clock.step, clock.t))
        assert float(t) == clock.t and clock.running
        a = ALPHAS[int(t)].item()
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    return denoise


@pytest.mark.parametrize("config", [SamplerConfig("ddpm", 100), SamplerConfig("ddpm", 20)]
                         + [SamplerConfig("ddim", k) for k in (1, 2, 5, 10, 100)])
def test_exact_epsilon_oracle_recovers_x0(config):
    x0, noise = x0_and_noise()
    calls, clock = [], StepClock()
    out = sample(eps_oracle(x0, calls, clock), Context(), noise, config, clock=clock,
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert calls == list(enumerate(config.timesteps())) and not clock.running
    assert all(type(k) is int and type(t) is float for k, t in calls)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_exact_velocity_oracle_recovers_x0_with_euler(steps):
    x0, noise = x0_and_noise()
    calls = []

    clock = StepClock()

    def velocity(x, t, ctx):
        calls.append((clock.step, clock.t))
        torch.testing.assert_close(x, t * noise + (1 - t) * x0)  # the sample stays on the straight path
        return noise - x0

    out = sample(velocity, Context(), noise, SamplerConfig("flow", steps), clock=clock)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert [t for _, t in calls] == SamplerConfig("flow", steps).timesteps()


def test_ddpm_noise_comes_from_the_given_generator():
    sample_ = globals()["sample"]
    _, noise = x0_and_noise()

    def zero_eps(x, t, ctx):
        return torch.zeros_like(x)

    def sample(fn, noise, cfg, generator=None, step_noise=None):
        return sample_(fn, Context(), noise, cfg, generator=generator, step_noise=step_noise)

    cfg = SamplerConfig("ddpm", 100)
    a = sample(zero_eps, noise, cfg, torch.Generator().manual_seed(3))
    b = sample(zero_eps, noise, cfg, torch.Generator().manual_seed(3))
    c = sample(zero_eps, noise, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = sample(zero_eps, noise, SamplerConfig("ddim", 10), torch.Generator().manual_seed(4))
    assert torch.equal(d, sample(zero_eps, noise, SamplerConfig("ddim", 10)))  # DDIM (eta 0) draws no noise
    # noise drawn up front is the noise the loop would draw, and a row of it samples that row alone
    sampler = build_sampler(cfg)
    step_noise = sampler.draw_step_noise(noise, torch.Generator().manual_seed(3))
    assert sum(n is None for n in step_noise) == 1  # the last DDPM step adds no noise
    assert torch.equal(sample(zero_eps, noise, cfg, step_noise=step_noise), a)
    row = sample(zero_eps, noise[1:2], cfg, step_noise=[n if n is None else n[1:2] for n in step_noise])
    assert torch.equal(row, a[1:2])
    assert build_sampler(SamplerConfig("flow", 4)).draw_step_noise(noise) == [None] * 4


class TwoBranches(Context):
    def __init__(self, cond):
        self.cond = cond

    def uncond(self):
        return TwoBranches(torch.zeros_like(self.cond))


def test_guidance_combines_the_branches_and_the_clock_names_them():
    """Flow with v = cond - x: the uncond branch (cond 0) gives -x, so guided v = -x + s * cond."""
    clock, seen = StepClock(), []
    x0, noise = x0_and_noise()
    cond = torch.full_like(noise, 0.5)

    def velocity(x, t, ctx):
        seen.append((clock.step, clock.branch_key))
        return ctx.cond - x

    out = sample(velocity, TwoBranches(cond), noise, SamplerConfig("flow", 2), clock=clock, guidance=Guidance(3.0))
    assert seen == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")] and clock.branch_key == "cond"
    x = noise
    for t, t_next in ((1.0, 0.5), (0.5, 0.0)):  # Euler by hand
        x = x + (t_next - t) * (-x + 3.0 * cond)
    torch.testing.assert_close(out, x)
    with pytest.raises(ValueError, match="no unconditional branch"):
        sample(lambda x, t, ctx: x, Context(), noise, SamplerConfig("flow", 2), guidance=Guidance(1.5))
    with pytest.raises(TypeError, match="Context"):
        sample(velocity, cond, noise, SamplerConfig("flow", 2))
