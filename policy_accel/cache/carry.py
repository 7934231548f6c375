"""Cross-chunk reuse (opt-in): a chunk's blocks start from the previous chunk's step-0 outputs.

    pa.accelerate(policy, pa.CarryConfig(pa.UniformConfig(10), carry=r"decoder\\.layers\\.\\d+\\.(self_attn|ff)"))
    pa.accelerate(policy, "carry0.2+uniform10@ddim10")   # the blocks whose calibrated error is <= 0.2

Consecutive chunks of an episode see nearly the same observation. With one noise draw per episode
(the policy's `episode_noise`, which `pa.accelerate` turns on for this config), their step-0 inputs
differ only by that observation, and the step-0 outputs of blocks that do not read it directly stay
close (measured per block by `carry_errors`). On every chunk but each `refresh`-th of an episode, a
carried block skips step 0 and starts from its stored step-0 output, held as if computed there; the
rest of the chunk follows the base method's schedule. A new episode (`policy.reset()`), or a batch
of another size, starts over with a full step 0: nothing crosses episodes.
"""

import re
from dataclasses import dataclass

import torch

from policy_accel.cache.forecast import Forecaster
from policy_accel.cache.handle import CacheHandle
from policy_accel.cache.methods import attach, register_attach
from policy_accel.clock import StepClock


@dataclass
class CarryConfig:
    """`base`: one of our static-schedule configs (Uniform, TaylorSeer, BAC, BAC+Taylor). `carry`: regex
    over block names (full match) of the blocks carried. `refresh`: every refresh-th chunk computes step 0."""

    base: object
    carry: str
    refresh: int = 2
    episode_noise: bool = True  # the policy draws its initial noise once per episode

    def __post_init__(self):
        if self.refresh < 2:
            raise ValueError(f"refresh must be >= 2 (1 would never carry), got {self.refresh}")
        try:
            re.compile(self.carry)
        except re.error as e:
            raise ValueError(f"carry is not a valid regex: {self.carry!r} ({e})") from None

    @property
    def blocks(self):
        return getattr(self.base, "blocks", None)

    @property
    def tag(self) -> str:
        return f"{self.base.tag}+carry_r{self.refresh}"


class CarryCache(CacheHandle):
    """Wraps the base method's BlockCache (`inner`); records carried blocks' step-0 outputs per guidance
    branch and seeds the next chunk's forecasters with them."""

    def __init__(self, inner, config: CarryConfig, clock: StepClock, binding):
        super().__init__(config, config.tag, clock, binding)
        hooks = getattr(inner, "hooks", None)
        if hooks is None:
            inner.remove()
            raise TypeError(f"carry applies to our static-schedule methods, not {type(config.base).__name__}")
        self.inner = inner
        self.carried = [h for h in hooks if re.fullmatch(config.carry, h.info.name)]
        if not self.carried:
            inner.remove()
            raise ValueError(f"carry pattern {config.carry!r} matches no cached block "
                             f"(blocks: {', '.join(h.info.name for h in hooks[:3])}, ...)")
        if any(h.branches for h in self.carried):
            inner.remove()
            raise ValueError("carry does not combine with per-branch schedules (PerBranchConfig)")
        self.masks = {id(h): list(h.mask) for h in self.carried}  # the base schedule's
        self.stored: dict[str, dict[str, torch.Tensor]] = {}  # block -> branch -> step-0 output
        self.chunk = 0  # chunks since the episode began
        self.carrying = False
        self.chunks_per_cycle = config.refresh  # FLOPs and latency repeat over this many chunks
        self.records = [h.module.register_forward_hook(self._recorder(h.info.name)) for h in self.carried]
        self._attach()

    @property
    def batch_coupled(self) -> bool:
        return self.inner.batch_coupled

    @property
    def hooks(self):
        return self.inner.hooks

    @property
    def stack(self):  # the inner cache's StackShortcut (None without one)
        return self.inner.stack

    def _recorder(self, name: str):
        def record(module, args, output):
            clock = self.clock
            if clock.running and clock.step == 0 and not self.carrying:
                if torch.compiler.is_compiling():
                    raise RuntimeError("cross-chunk reuse keeps state between chunks: it cannot run inside a "
                                       "whole-chunk graph (compile_chunk)")
                self.stored.setdefault(name, {})[clock.branch_key] = output.detach().clone()

        return record

    def begin_chunk(self, batch_size: int, sampler_kind: str, timesteps: tuple[float, ...]) -> None:
        self.check_sampler(sampler_kind, timesteps)  # and keeps what was stored (no reset)
        ready = all(h.info.name in self.stored for h in self.carried) and all(
            v.shape[0] == batch_size for s in self.stored.values() for v in s.values())
        self.carrying = self.chunk % self.config.refresh != 0 and ready
        if not ready:
            self.chunk = 0  # a batch of another size starts a new cycle with a full step 0
        for h in self.carried:
            h.mask = [False, *self.masks[id(h)][1:]] if self.carrying else list(self.masks[id(h)])
            if self.carrying:  # the inner cache cleared the forecasters: seed them with step 0 of before
                for branch, value in self.stored[h.info.name].items():
                    f = h.forecasters[branch] = Forecaster(h.order, h.differences)
                    f.update(timesteps[0], value)
        if self.inner.stack is not None:
            self.inner.stack.refresh()
        self.chunk += 1

    def reset(self) -> None:
        """A new episode (clock.reset): forget every stored output; the next chunk computes step 0."""
        self.stored.clear()
        self.chunk = 0
        self.carrying = False

    def _detach(self) -> None:
        for r in getattr(self, "records", []):
            r.remove()
        for h in getattr(self, "carried", []):
            h.mask = list(self.masks[id(h)])
        self.stored = {}
        if getattr(self, "inner", None) is not None:
            self.inner.remove()

    def stats(self):
        return self.inner.stats()


@register_attach(CarryConfig)
def _attach_carry(denoiser, config: CarryConfig, clock: StepClock, binding, allow_unbound: bool) -> CarryCache:
    inner = attach(denoiser, config.base, clock, binding, allow_unbound=allow_unbound)
    return CarryCache(inner, config, clock, binding)
