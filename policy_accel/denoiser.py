"""The Denoiser seam: the one contract the policy, the sampling loop and the cache agree on.

    ctx = denoiser.prepare(cond, timesteps)     # once per chunk: everything that does not change
                                                # across denoising steps (DP-T: obs-token K/V and
                                                # per-step time K/V; a VLA: the prefix K/V)
    out = denoiser(x, t, ctx.at_step(k))        # once per step and guidance branch

A denoiser declares what it predicts (`prediction`: "epsilon" | "sample" | "velocity"); samplers
and training losses follow it. It names the sub-blocks a cache may wrap (`cache_blocks`, a regex
fully matched against module names); each such block returns one tensor shaped like its input.

Optional, for a denoiser whose layer stack is a pure residual stream (`h = h + block(h)` for every
block `cache_blocks` matches, in order, and nothing else touches h between the first and the last):

    out = denoiser.skip_stack(x, t, ctx, residual=r)   # forward() with the stack replaced by h + r

`residual` is the sum of every cached block's branch output (passed by keyword; skip_stack must not
change it in place: the cache reuses it on the next fully skipped step). A cache uses it on a step on which every block
is skipped: the per-block dispatch is replaced by one addition (equal to the per-block path up to the
float rounding of the changed summation order).
"""

from typing import Protocol, runtime_checkable

import torch

PREDICTIONS = ("epsilon", "sample", "velocity")


class Context:
    """What `prepare` computed for one chunk. `at_step(k)` is the view the denoiser gets at step k;
    `uncond()` the context of the unconditional guidance branch (for denoisers trained with
    condition dropout)."""

    def at_step(self, step: int) -> "Context":
        return self

    def uncond(self) -> "Context":
        raise ValueError(f"{type(self).__name__} has no unconditional branch: this denoiser cannot run guidance")


@runtime_checkable
class Denoiser(Protocol):
    prediction: str
    cache_blocks: str

    def prepare(self, cond, timesteps=None) -> Context: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ctx: Context) -> torch.Tensor: ...


@runtime_checkable
class ResidualStack(Protocol):
    """The optional seam above: a denoiser whose whole stack can be replaced by adding one residual."""

    def skip_stack(self, x: torch.Tensor, t: torch.Tensor, ctx: Context, residual: torch.Tensor) -> torch.Tensor: ...


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    return prediction
