"""Peers we did not write, run on our policies: diffusers' own cache hooks.

    handle = apply_diffusers_taylorseer(policy, interval=4, order=1, warmup=3)
    handle = apply_diffusers_first_block_cache(policy, threshold=0.05)
    ...
    handle.remove()

TaylorSeer (`apply_taylorseer_cache`) wraps our sub-blocks by name. diffusers' conventions, mapped
to ours (tests/test_cache_dp_t.py checks the mapping):
- refresh steps: k < warmup, then k with (k - warmup - 1) % interval == 0 (it forecasts step `warmup`
  right after the warm-up; ours refreshes at warmup, warmup + N, ...);
- derivatives are backward differences in step-index units divided by the latest gap, and the
  forecast is a Taylor series around the latest computed step: ``differences="backward"`` in ours.
  For samplers whose t is affine in the step index (DDPM, DDIM), step units and t units agree.

First Block Cache (`apply_first_block_cache`) works on whole layers (`hidden_states -> hidden_states`,
found as the `layers` ModuleList of the model's `block_stack` module): at each step the first layer
runs; if its residual changed by less than `threshold` (relative mean |.|) since the last full
step, the other layers are skipped and their summed residual from that step is added instead.
Its decision is data dependent (one host sync per step) and taken over the whole batch (one mean),
so the policy samples each row of a batch on its own with it (`batch_coupled`): batched rollouts
then measure what a batch-1 deployment does.

MagCache (`apply_mag_cache`) also works on whole layers: it skips the whole stack (adding the last
computed stack residual) while the error accumulated from per-step residual-norm ratios stays under
`threshold`, at most `max_skip_steps` in a row, never in the first `retention_ratio` of the steps.
The ratios come from its own calibration mode, run once per checkpoint, sampler and step count on
demo observations (`calibrate_mag_ratios`; `python -m policy_accel.cache.calibrate ... magcache=true`
writes <checkpoint>/schedules/magcache_<sampler><steps>.json). Its decisions depend on the ratios
and the step only, not on the batch.

All count their own calls to know the step, so their state is reset for every chunk.

Not applicable to DP-T: PyramidAttentionBroadcast and FasterCache find attention layers by
diffusers' Attention classes (and FasterCache needs a classifier-free-guidance batch; DP-T has no
guidance); SeaCache's indicator is a spectrum of video latents (C, T, H, W).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.cache_utils import CacheMixin

from policy_accel.cache.hooks import find_blocks
from policy_accel.cli import read_json, write_json


def diffusers_refresh_steps(num_steps: int, interval: int, warmup: int) -> list[int]:
    """The steps on which diffusers' TaylorSeer hook computes."""
    return [k for k in range(num_steps) if k < warmup or (k - warmup - 1) % interval == 0]


class DiffusersCache:
    """Sampling hook around one of diffusers' cache hooks on `policy.model`: keeps diffusers' cache
    context set while a chunk is sampled, resets its state per chunk and takes its hooks off."""

    def __init__(self, policy, tag: str, hook_names: tuple[str, ...], batch_coupled: bool = False):
        self.policy, self.model, self.tag, self.hook_names = policy, policy.model, tag, hook_names
        self.batch_coupled = batch_coupled  # decisions over the whole batch: the policy samples rows alone
        self._context = None
        # as diffusers' enable_cache does: the root's cached list of hooked submodules is stale now
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
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
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        for name in self.hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
        self.policy.sampling_hooks.remove(self)


def _check_free(policy) -> None:
    if getattr(policy, "acceleration", None) is not None:
        raise RuntimeError("remove our acceleration before applying diffusers' cache")
    if any(isinstance(h, DiffusersCache) for h in policy.sampling_hooks):
        raise RuntimeError("a diffusers cache is already applied; remove() it first")


def apply_diffusers_taylorseer(policy, interval: int = 4, order: int = 1, warmup: int = 3,
                               blocks: str | None = None) -> DiffusersCache:
    """diffusers' TaylorSeer on the policy's cache blocks (our sub-blocks); `.remove()` takes it off."""
    _check_free(policy)
    names = [b.name for b in find_blocks(policy.model, blocks)]
    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[n.replace(".", r"\.") for n in names],
    )
    apply_taylorseer_cache(policy.model, config)
    return DiffusersCache(policy, f"diffusers_taylorseer_n{interval}_o{order}_w{warmup}", ("taylorseer_cache",))


def _layer_stack(model) -> torch.nn.Module:
    """The module whose `layers` ModuleList holds the model's whole transformer layers."""
    stack = getattr(model, getattr(model, "block_stack", ""), None)
    layers = getattr(stack, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) < 2:
        raise ValueError(f"{type(model).__name__} names no stack of >= 2 whole layers (`block_stack` attribute "
                         f"pointing at a module with a `layers` ModuleList); diffusers' block-level caches need one")
    # diffusers' own models register their block classes the same way (diffusers/hooks/_helpers.py)
    TransformerBlockRegistry.register(type(layers[0]), TransformerBlockMetadata(return_hidden_states_index=None))
    return stack


def apply_diffusers_first_block_cache(policy, threshold: float = 0.05) -> DiffusersCache:
    """diffusers' First Block Cache on the policy's whole layers; `.remove()` takes it off."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    _check_free(policy)
    apply_first_block_cache(_layer_stack(policy.model), FirstBlockCacheConfig(threshold=threshold))
    return DiffusersCache(policy, f"diffusers_fbc_t{threshold:g}", ("fbc_leader_block_hook", "fbc_block_hook"),
                          batch_coupled=True)


MAG_HOOKS = ("mag_cache_leader_block_hook", "mag_cache_block_hook")


@dataclass
class MagRatios:
    """MagCache's per-step ratios |residual_k| / |residual_k-1| for one checkpoint and sampler."""

    ratios: list[float]
    sampler: str
    num_steps: int
    checkpoint_hash: str
    calibration: str = ""

    def check_compatible(self, policy) -> None:
        problems = []
        if self.checkpoint_hash != policy.checkpoint_hash:
            problems.append(f"made for checkpoint {self.checkpoint_hash[:12]}, policy is {policy.checkpoint_hash[:12]}")
        if (self.sampler, self.num_steps) != (policy.sampler.kind, policy.sampler.num_steps):
            problems.append(f"made for {self.sampler} with {self.num_steps} steps, policy samples "
                            f"{policy.sampler.kind} with {policy.sampler.num_steps}")
        if len(self.ratios) != self.num_steps or not np.isfinite(self.ratios).all():
            problems.append(f"needs {self.num_steps} finite ratios, has {len(self.ratios)}")
        if problems:
            raise ValueError("MagCache ratios do not match this policy: " + "; ".join(problems))

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "MagRatios":
        data = read_json(path, "MagCache ratios")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"MagCache ratios file {path} has the wrong fields: {e}") from e


def mag_ratios_name(sampler: str, num_steps: int) -> str:
    """File stem under <checkpoint>/schedules/."""
    return f"magcache_{sampler}{num_steps}"


def calibrate_mag_ratios(policy, observations: np.ndarray, description: str = "") -> MagRatios:
    """MagCache's calibration mode on a batch of observation histories (B, n_obs_steps, obs_dim)."""
    _check_free(policy)
    steps = policy.sampler.num_steps
    # one step more than the sampler takes: at its last step MagCache clears the ratios it recorded
    stack = _layer_stack(policy.model)
    apply_mag_cache(stack, MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    handle = DiffusersCache(policy, "diffusers_magcache_calibration", MAG_HOOKS)
    try:
        policy.predict_action_chunk(np.asarray(observations))
        tail_hook = stack.layers[-1]._diffusers_hook.get_hook(MAG_HOOKS[1])
        ratios = [float(r) for r in tail_hook.state_manager.get_state().calibration_ratios]
    finally:
        handle.remove()
    return MagRatios(ratios, policy.sampler.kind, steps, policy.checkpoint_hash, description)


def apply_diffusers_mag_cache(policy, ratios: MagRatios, threshold: float = 0.06, max_skip_steps: int = 3,
                              retention_ratio: float = 0.2) -> DiffusersCache:
    """diffusers' MagCache on the policy's whole layers with calibrated `ratios`; `.remove()` takes it off."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if not 0 <= retention_ratio < 1:
        raise ValueError(f"retention_ratio must be in [0, 1), got {retention_ratio}")
    _check_free(policy)
    ratios.check_compatible(policy)
    config = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio,
                            num_inference_steps=ratios.num_steps, mag_ratios=torch.tensor(ratios.ratios))
    apply_mag_cache(_layer_stack(policy.model), config)
    tag = f"diffusers_magcache_t{threshold:g}_k{max_skip_steps}_r{retention_ratio:g}"
    return DiffusersCache(policy, tag, MAG_HOOKS)
