"""The policy-level face of the cache engine: one verb, one handle.

    handle = pa.accelerate(policy, pa.UniformConfig(interval=5))   # any registered config
    pa.accelerate(policy, "bac_taylor5o1f@ddim20")                 # or a method string (policy_accel/recipes.py)
    pa.cache_stats(policy)                                         # per block computed/skipped, FLOPs saved
    pa.remove_acceleration(policy)                                 # exact original behaviour again

`accelerate` attaches the cache to the policy's denoiser and clock, bound to the policy's weights
and current sampler (`policy.binding()`); a BAC config with `budget` and `observations` is
calibrated first.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from policy_accel.cache import BACConfig, CacheHandle, CarryConfig, PerBranchConfig, attach
from policy_accel.cache.stats import CacheStats
from policy_accel.recipes import parse_method


def accelerate(policy, config, *, allow_unbound: bool = False, checkpoint_dir=None) -> CacheHandle | None:
    """Attach `config`'s cache to `policy`; returns the handle (also `policy.cache`).
    `config` may be a method string: it sets the sampler, builds the config and finds the calibrated
    file under the policy's checkpoint (`checkpoint_dir`, default the folder it was loaded from);
    "uncached" / "ddimK" / "compile" attach no cache and return None.
    `allow_unbound`: accept a schedule that names no checkpoint."""
    if policy.cache is not None or policy.recipe is not None:
        now = policy.recipe.spec if policy.recipe is not None else policy.cache.tag
        raise RuntimeError(f"policy is already accelerated with {now}; call remove_acceleration first")
    if policy.chunk_graph is not None:
        raise RuntimeError("the whole chunk is compiled (policy.compile_chunk()) for the policy as it was: call "
                           "policy.compile_chunk(False), accelerate, then compile_chunk() again")
    if isinstance(config, str):
        return _accelerate_recipe(policy, parse_method(config), checkpoint_dir, allow_unbound)
    if policy.compiled_model is not None:
        raise RuntimeError("the whole denoiser is compiled (policy.compile()): call policy.compile(False) and "
                           "set compile=True in the method config instead (per-block compile, no recompiles)")
    if isinstance(config, PerBranchConfig) and policy.config.guidance_scale is None:
        raise ValueError(f"{config.tag}: a per-branch config needs classifier-free guidance, and this policy has "
                         "none (guidance_scale=None): there is no unconditional branch")
    if isinstance(config, BACConfig) and config.schedule is None:
        if not config.observations:
            raise ValueError(f"{type(config).__name__}(budget={config.budget}) needs calibration observations=[...] "
                             "(or a schedule made by pa.calibrate)")
        from policy_accel.calibration import calibrate

        schedule = calibrate(policy, config.observations, budget=config.budget,
                             bubble_blocks=config.bubble_blocks, blocks=config.blocks)
        config = dataclasses.replace(config, schedule=schedule, budget=None, observations=None)
    policy.cache = attach(policy.model, config, policy.clock, policy.binding(), allow_unbound=allow_unbound)
    policy.episode_noise = isinstance(config, CarryConfig) and config.episode_noise
    return policy.cache


def _accelerate_recipe(policy, method, checkpoint_dir, allow_unbound) -> CacheHandle | None:
    checkpoint_dir = checkpoint_dir or policy.path
    if checkpoint_dir is None and method.reads_file:
        raise ValueError(f"method {method.spec!r} reads a calibrated file from the policy's checkpoint, but this "
                         "policy was not loaded from one: pass checkpoint_dir=")
    native = policy.config.sampler
    config = method.config(checkpoint_dir, native, policy.checkpoint_hash)
    if method.compiled and config is None and policy.compiled_model is not None:
        raise RuntimeError("the policy is compiled already: call policy.compile(False) first")
    before = policy.sampler
    policy.set_sampler(method.sampler(native))
    try:
        if config is not None:
            accelerate(policy, config, allow_unbound=allow_unbound)
        elif method.compiled:
            policy.compile()
    except BaseException:
        policy.set_sampler(before)
        raise
    policy.recipe = RecipeState(method.spec, before, compiled=config is None and method.compiled)
    return policy.cache


@dataclass(frozen=True)
class RecipeState:
    """What a method string changed on a policy, for remove_acceleration to undo."""

    spec: str
    sampler_before: object
    compiled: bool


def remove_acceleration(policy) -> None:
    """Take the cache off (and undo a method string's sampler and compile, and drop a whole-chunk
    graph, which was compiled with the cache); the policy behaves exactly as before `accelerate`."""
    policy.compile_chunk(False)
    if policy.cache is not None:
        policy.cache.remove()
        policy.cache = None
    policy.episode_noise = False
    if policy.recipe is not None:
        if policy.recipe.compiled:
            policy.compile(False)
        policy.set_sampler(policy.recipe.sampler_before)
        policy.recipe = None


def cache_stats(policy) -> CacheStats:
    """Counts since `accelerate` and the bytes the cache holds now (our block caches)."""
    if policy.cache is None:
        raise ValueError("policy is not accelerated: call pa.accelerate(policy, config) first")
    if not hasattr(policy.cache, "stats"):
        raise ValueError(f"{policy.cache.tag} keeps no per-block counts")
    return policy.cache.stats()


def chunk_flops(policy, obs: np.ndarray, seed: int = 0) -> float:
    """FLOPs of one `predict_action_chunk(obs)` as the policy is now (skipped blocks cost nothing); with
    cross-chunk reuse the mean over one cycle of consecutive chunks from a new episode.
    The noise comes from `seed`, since what a data-driven cache (First Block Cache) skips depends on
    it; the policy's generator is left as it was."""
    state = policy.generator.get_state()
    policy.generator.manual_seed(seed)
    policy.reset()
    chunks = getattr(policy.cache, "chunks_per_cycle", 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _ in range(chunks):
            policy.predict_action_chunk(obs)
    policy.reset()
    policy.generator.set_state(state)
    return counter.get_total_flops() / chunks
