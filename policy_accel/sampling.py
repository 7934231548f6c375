"""Denoising loops: DDPM and DDIM (epsilon prediction, diffusers' schedules) and flow-matching Euler.

    ctx = denoiser.prepare(cond, SamplerConfig("ddim", 10).timesteps())
    x0 = sample(denoiser, ctx, noise, SamplerConfig("ddim", 10), clock=clock, generator=generator)
    # denoiser(x, t, ctx.at_step(k)) -> epsilon (ddpm/ddim) or velocity (flow)

DDPM and DDIM take their schedules from diffusers' `DDPMScheduler` / `DDIMScheduler` configured as
in Diffusion Policy (100 train steps, squaredcos_cap_v2, fixed_small variance, clipped x0, epsilon
prediction; DDIM with set_alpha_to_one, eta 0), so one trained model serves both. Their per-step
update is precomputed here as Python floats: the same arithmetic as `scheduler.step` (the tests
compare them) without its per-step index search and small-tensor bookkeeping, which cost as much as
a cached denoiser step. Flow: x_t = t * noise + (1 - t) * x0, velocity v = noise - x0, Euler from
t = 1 to 0 in `num_steps` equal steps.

The loop owns the step clock (policy_accel/clock.py): step index, t and guidance branch go to the
cache as Python numbers, and the loop never syncs the device.
"""

import functools
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from policy_accel.clock import UNCOND, StepClock
from policy_accel.denoiser import Context

KINDS = ("ddpm", "ddim", "flow")
BETA_SCHEDULE = "squaredcos_cap_v2"


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "ddpm"  # "ddpm" | "ddim" (epsilon models) | "flow" (velocity models)
    num_steps: int = 100
    num_train_steps: int = 100  # diffusion steps the model was trained with (ddpm/ddim)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown sampler kind {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if self.kind != "flow" and self.num_steps > self.num_train_steps:
            raise ValueError(f"{self.kind} with num_steps={self.num_steps} > num_train_steps={self.num_train_steps}: "
                             "a diffusion model can only be sampled on the steps it was trained with")

    @property
    def prediction(self) -> str:
        """What the denoiser must predict: "epsilon" or "velocity"."""
        return "velocity" if self.kind == "flow" else "epsilon"

    def check_fits(self, prediction: str) -> None:
        """Raise unless this sampler can sample a denoiser that predicts `prediction`."""
        if prediction != self.prediction:
            fits = "ddpm or ddim" if prediction == "epsilon" else "flow" if prediction == "velocity" else "none here"
            raise ValueError(f"sampler {self.kind!r} needs a denoiser that predicts {self.prediction}; this one "
                             f"predicts {prediction} (samplers that fit: {fits})")

    def timesteps(self) -> list[float]:
        """The t passed to the denoiser at each step, in order (train-step index for ddpm/ddim, 1 -> 0 for flow)."""
        return list(build_sampler(self).timesteps)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_steps": self.num_steps, "num_train_steps": self.num_train_steps}


def ddpm_scheduler(num_train_steps: int = 100) -> DDPMScheduler:
    """The training noise schedule of Diffusion Policy (also used for `add_noise` during training)."""
    return DDPMScheduler(num_train_timesteps=num_train_steps, beta_schedule=BETA_SCHEDULE, variance_type="fixed_small",
                         clip_sample=True, prediction_type="epsilon")


def ddim_scheduler(num_train_steps: int = 100) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=num_train_steps, beta_schedule=BETA_SCHEDULE, clip_sample=True,
                         set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")


@dataclass(frozen=True)
class _Step:
    t: float
    x0_from_x: float  # x0 = x0_from_x * x - x0_from_eps * eps   (then clipped to [-1, 1])
    x0_from_eps: float
    prev_from_x0: float  # x_prev = prev_from_x0 * x0 + prev_from_x * x + prev_from_eps * eps + std * noise
    prev_from_x: float
    prev_from_eps: float
    std: float


class Sampler:
    """Per-step update coefficients of one SamplerConfig (build with `build_sampler`, which caches)."""

    def __init__(self, config: SamplerConfig):
        self.config = config
        K = config.num_steps
        if config.kind == "flow":
            self.timesteps = tuple(1.0 - k / K for k in range(K))
            self.steps = ()
            return
        sched = ddpm_scheduler(config.num_train_steps) if config.kind == "ddpm" else ddim_scheduler(
            config.num_train_steps)
        sched.set_timesteps(K)
        ts = [int(t) for t in sched.timesteps]
        alphas = sched.alphas_cumprod.double()
        steps = []
        for i, t in enumerate(ts):
            a_t = float(alphas[t])
            x0 = dict(x0_from_x=1 / math.sqrt(a_t), x0_from_eps=math.sqrt((1 - a_t) / a_t))
            if config.kind == "ddpm":  # posterior mean and fixed_small variance (DDPM eq. 6-7)
                prev = ts[i + 1] if i + 1 < K else -1
                a_prev = float(alphas[prev]) if prev >= 0 else 1.0
                beta = 1 - a_t / a_prev
                var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20) if t > 0 else 0.0
                steps.append(_Step(float(t), **x0, prev_from_x0=math.sqrt(a_prev) * beta / (1 - a_t),
                                   prev_from_x=math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t),
                                   prev_from_eps=0.0, std=math.sqrt(var)))
            else:  # DDIM, eta = 0
                prev = t - config.num_train_steps // K
                a_prev = float(alphas[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
                steps.append(_Step(float(t), **x0, prev_from_x0=math.sqrt(a_prev), prev_from_x=0.0,
                                   prev_from_eps=math.sqrt(1 - a_prev), std=0.0))
        self.timesteps = tuple(s.t for s in steps)
        self.steps = tuple(steps)

    def step(self, k: int, model_output: torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x at step k -> x at step k + 1, from the denoiser's output at step k. A stochastic step
        (DDPM) draws its noise from `generator` unless `noise` (shaped like x) is given."""
        if self.config.kind == "flow":
            t_next = self.timesteps[k + 1] if k + 1 < len(self.timesteps) else 0.0
            return x + (t_next - self.timesteps[k]) * model_output
        s = self.steps[k]
        x0 = (s.x0_from_x * x - s.x0_from_eps * model_output).clamp_(-1.0, 1.0)
        out = s.prev_from_x0 * x0
        if s.prev_from_x:
            out = out + s.prev_from_x * x
        if s.prev_from_eps:
            out = out + s.prev_from_eps * model_output
        if s.std:
            out = out + s.std * (_noise_like(x, generator) if noise is None else noise)
        return out

    def draw_step_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """The noise `sample` would draw for x, per step (None for a deterministic step), drawn now."""
        if self.config.kind == "flow":
            return [None] * len(self.timesteps)
        return [_noise_like(x, generator) if s.std else None for s in self.steps]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@functools.lru_cache(maxsize=64)
def build_sampler(config: SamplerConfig) -> Sampler:
    return Sampler(config)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: out = uncond + scale * (cond - uncond), the uncond branch run on
    `ctx.uncond()` under the clock's "uncond" branch key (its own cache state)."""

    scale: float = 1.5

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"guidance scale must be finite, got {self.scale}")


def sample(denoiser: Callable, ctx: Context, noise: torch.Tensor, sampler: SamplerConfig | Sampler, *,
           clock: StepClock | None = None, guidance: Guidance | None = None,
           generator: torch.Generator | None = None, step_noise: list | None = None) -> torch.Tensor:
    """Run the denoising loop from `noise`; returns x0. Step k calls `denoiser(x, t_k, ctx.at_step(k))`
    with t_k a 0-dim tensor on the noise's device (one copy per chunk, none per step) and drives
    `clock` (step index, t and guidance branch as Python values). Per-step noise comes from
    `generator`, or from `step_noise` (as made by `Sampler.draw_step_noise`)."""
    if isinstance(sampler, SamplerConfig):
        sampler = build_sampler(sampler)
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a Context made by the denoiser's prepare(), got {type(ctx).__name__}")
    if guidance is not None:
        ctx.at_step(0).uncond()  # a denoiser without a null condition refuses before any model call
    t_values = torch.tensor(sampler.timesteps, dtype=torch.float32, device=noise.device)
    if clock is not None:
        clock.begin_chunk(noise.shape[0], sampler.config.kind, sampler.timesteps)
    try:
        x = noise
        for k, t in enumerate(sampler.timesteps):
            if clock is not None:
                clock.at(k, t)
            step_ctx = ctx.at_step(k)
            out = denoiser(x, t_values[k], step_ctx)
            if guidance is not None:
                with clock.branch(UNCOND) if clock is not None else nullcontext():
                    uncond = denoiser(x, t_values[k], step_ctx.uncond())
                out = uncond + guidance.scale * (out - uncond)
            x = sampler.step(k, out, x, generator, None if step_noise is None else step_noise[k])
    finally:
        if clock is not None:
            clock.end_chunk()
    return x
