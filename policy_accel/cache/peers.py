"""Peers we did not write, run on our policies: diffusers' TaylorSeer cache hook.

    handle = apply_diffusers_taylorseer(policy, interval=4, order=1, warmup=3)
    ...
    handle.remove()

diffusers' conventions, mapped to ours (tests/test_cache_dp_t.py checks the mapping):
- refresh steps: k < warmup, then k with (k - warmup - 1) % interval == 0 (it forecasts step `warmup`
  right after the warm-up; ours refreshes at warmup, warmup + N, ...);
- derivatives are backward differences in step-index units divided by the latest gap, and the
  forecast is a Taylor series around the latest computed step: ``differences="backward"`` in ours.
  For samplers whose t is affine in the step index (DDPM, DDIM), step units and t units agree.
- it counts its own calls to know the step, so its state must be reset for every chunk.
"""

import torch
from diffusers.hooks import HookRegistry, TaylorSeerCacheConfig, apply_taylorseer_cache
from diffusers.models.cache_utils import CacheMixin

from policy_accel.cache.hooks import find_blocks


def diffusers_refresh_steps(num_steps: int, interval: int, warmup: int) -> list[int]:
    """The steps on which diffusers' TaylorSeer hook computes."""
    return [k for k in range(num_steps) if k < warmup or (k - warmup - 1) % interval == 0]


class DiffusersTaylorSeer:
    """Sampling hook that keeps diffusers' cache context set and resets its state per chunk."""

    tag_prefix = "diffusers_taylorseer"

    def __init__(self, policy, interval: int, order: int, warmup: int, blocks: str | None = None):
        if getattr(policy, "acceleration", None) is not None:
            raise RuntimeError("remove our acceleration before applying diffusers' cache")
        self.policy, self.model = policy, policy.model
        self.tag = f"{self.tag_prefix}_n{interval}_o{order}_w{warmup}"
        names = [b.name for b in find_blocks(self.model, blocks)]
        config = TaylorSeerCacheConfig(
            cache_interval=interval,
            disable_cache_before_step=warmup,
            max_order=order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[n.replace(".", r"\.") for n in names],
        )
        apply_taylorseer_cache(self.model, config)
        self.hooked = [m for n, m in self.model.named_modules() if n in names]
        self._context = None
        policy.sampling_hooks.append(self)

    def _exit_context(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def begin_chunk(self, batch_size: int, timesteps: list[float]) -> None:
        self.reset()
        # CacheMixin.cache_context is a context manager over a plain module; enter it for the chunk
        self._exit_context()
        self._context = CacheMixin.cache_context(self.model, "cond")
        self._context.__enter__()

    def begin_step(self, step_index: int, t: float) -> None:
        pass

    def reset(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()

    def remove(self) -> None:
        self._exit_context()
        for module in self.hooked:
            module._diffusers_hook.remove_hook("taylorseer_cache", recurse=False)
        self.policy.sampling_hooks.remove(self)


def apply_diffusers_taylorseer(policy, interval: int = 4, order: int = 1, warmup: int = 3,
                               blocks: str | None = None) -> DiffusersTaylorSeer:
    return DiffusersTaylorSeer(policy, interval, order, warmup, blocks)
