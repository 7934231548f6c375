"""Peers we did not write, run on our policies: diffusers' own cache hooks.

    pa.accelerate(policy, DiffusersTaylorSeerConfig(interval=4, order=1, warmup=3))
    pa.accelerate(policy, DiffusersFBCConfig(threshold=0.05))
    pa.accelerate(policy, DiffusersMagCacheConfig(ratios="<checkpoint>/schedules/magcache_ddpm100.json"))
    handle = attach(denoiser, config, clock, binding)      # the same, on a bare denoiser
    handle.remove()

They run on exactly the denoiser path ours run on (the per-chunk `prepare` with its exact K/V), and
return the same kind of handle. Their state is kept per guidance branch through diffusers' own
`cache_context(<branch>)`, switched as the clock's branch changes.

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
demo observations (`policy_accel.calibration.calibrate_mag_ratios`; `python eval/calibrate.py
... magcache=true` writes <checkpoint>/schedules/magcache_<sampler><steps>.json). Its decisions depend on the ratios
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
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.cache_utils import CacheMixin

from policy_accel.cache.handle import CacheHandle
from policy_accel.cache.hooks import find_blocks
from policy_accel.cache.methods import register_attach
from policy_accel.cache.schedule import Binding
from policy_accel.clock import COND, StepClock
from policy_accel.jsonfile import read_json, write_json


def diffusers_refresh_steps(num_steps: int, interval: int, warmup: int) -> list[int]:
    """The steps on which diffusers' TaylorSeer hook computes."""
    return [k for k in range(num_steps) if k < warmup or (k - warmup - 1) % interval == 0]


class DiffusersCache(CacheHandle):
    """One of diffusers' cache hooks on a denoiser, driven by the clock: diffusers' cache context is
    the clock's branch while a chunk is sampled, its state is reset per chunk, remove() takes it off."""

    def __init__(self, denoiser, config, tag: str, clock: StepClock, binding: Binding, hook_names: tuple[str, ...],
                 batch_coupled: bool = False):
        super().__init__(config, tag, clock, binding)
        self.model, self.hook_names = denoiser, hook_names
        self.batch_coupled = batch_coupled  # decisions over the whole batch: the policy samples rows alone
        self._context = None
        # as diffusers' enable_cache does: the root's cached list of hooked submodules is stale now
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        self._attach()

    def _enter(self, branch: str) -> None:
        self._exit()
        self._context = CacheMixin.cache_context(self.model, branch)  # a context manager over a plain module
        self._context.__enter__()

    def _exit(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def begin_chunk(self, batch_size: int, sampler_kind: str, timesteps) -> None:
        super().begin_chunk(batch_size, sampler_kind, timesteps)
        self._enter(COND)

    def branch_changed(self, branch: str) -> None:
        self._enter(branch)

    def end_chunk(self) -> None:
        self._exit()

    def reset(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()

    def _detach(self) -> None:
        self._exit()
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        for name in self.hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


@dataclass
class DiffusersTaylorSeerConfig:
    """diffusers' TaylorSeer on the denoiser's cache blocks (our sub-blocks)."""

    interval: int = 4
    order: int = 1
    warmup: int = 3
    blocks: str | None = None

    def __post_init__(self):
        if self.interval < 1 or self.order < 0 or self.warmup < 1:
            raise ValueError(f"need interval >= 1, order >= 0, warmup >= 1 (with 0, diffusers' hook forecasts "
                             f"step 0 from nothing); got {self}")

    @property
    def tag(self) -> str:
        return f"diffusers_taylorseer_n{self.interval}_o{self.order}_w{self.warmup}"


@register_attach(DiffusersTaylorSeerConfig)
def _attach_taylorseer(denoiser, cfg, clock, binding, allow_unbound) -> DiffusersCache:
    names = [b.name for b in find_blocks(denoiser, cfg.blocks)]
    config = TaylorSeerCacheConfig(cache_interval=cfg.interval, disable_cache_before_step=cfg.warmup,
                                   max_order=cfg.order, taylor_factors_dtype=torch.float32,
                                   cache_identifiers=[n.replace(".", r"\.") for n in names])
    apply_taylorseer_cache(denoiser, config)
    return DiffusersCache(denoiser, cfg, cfg.tag, clock, binding, ("taylorseer_cache",))


def _layer_stack(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the module holding the model's whole transformer layers as a ModuleList under one of diffusers' block
    names: the model's `block_stack` attribute names it (DP-T: "decoder", whose `layers`), or names that
    ModuleList itself on the model (the action DiT: "transformer_blocks"); and the layers)."""
    stack = getattr(model, getattr(model, "block_stack", ""), None)
    if isinstance(stack, torch.nn.ModuleList) and model.block_stack in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS:
        stack, layers = model, stack
    else:
        layers = getattr(stack, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) < 2:
        raise ValueError(f"{type(model).__name__} names no stack of >= 2 whole layers (`block_stack` attribute "
                         f"pointing at a module with a `layers` ModuleList, or at such a ModuleList); diffusers' "
                         "block-level caches need one")
    # diffusers' own models register their block classes the same way (diffusers/hooks/_helpers.py)
    TransformerBlockRegistry.register(type(layers[0]), TransformerBlockMetadata(return_hidden_states_index=None))
    return stack, layers


@dataclass
class DiffusersFBCConfig:
    """diffusers' First Block Cache on the denoiser's whole layers."""

    threshold: float = 0.05

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    @property
    def tag(self) -> str:
        return f"diffusers_fbc_t{self.threshold:g}"


@register_attach(DiffusersFBCConfig)
def _attach_fbc(denoiser, cfg, clock, binding, allow_unbound) -> DiffusersCache:
    apply_first_block_cache(_layer_stack(denoiser)[0], FirstBlockCacheConfig(threshold=cfg.threshold))
    return DiffusersCache(denoiser, cfg, cfg.tag, clock, binding, ("fbc_leader_block_hook", "fbc_block_hook"),
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

    def check_compatible(self, binding: Binding) -> None:
        problems = []
        if self.checkpoint_hash != binding.checkpoint_hash:
            problems.append(f"made for checkpoint {self.checkpoint_hash[:12]}, "
                            f"policy is {binding.checkpoint_hash[:12]}")
        if (self.sampler, self.num_steps) != (binding.sampler, binding.num_steps):
            problems.append(f"made for {self.sampler} with {self.num_steps} steps, policy samples "
                            f"{binding.sampler} with {binding.num_steps}")
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


@dataclass
class DiffusersMagCacheConfig:
    """diffusers' MagCache on the whole layer stack, with calibrated `ratios` (a MagRatios or its file)."""

    ratios: MagRatios | str | Path
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if not 0 <= self.retention_ratio < 1:
            raise ValueError(f"retention_ratio must be in [0, 1), got {self.retention_ratio}")
        if self.max_skip_steps < 1:
            raise ValueError(f"max_skip_steps must be >= 1, got {self.max_skip_steps}")
        if isinstance(self.ratios, Path):
            self.ratios = str(self.ratios)

    @property
    def tag(self) -> str:
        return f"diffusers_magcache_t{self.threshold:g}_k{self.max_skip_steps}_r{self.retention_ratio:g}"


@register_attach(DiffusersMagCacheConfig)
def _attach_mag(denoiser, cfg, clock, binding, allow_unbound) -> DiffusersCache:
    ratios = cfg.ratios if isinstance(cfg.ratios, MagRatios) else MagRatios.load(cfg.ratios)
    ratios.check_compatible(binding)
    config = MagCacheConfig(threshold=cfg.threshold, max_skip_steps=cfg.max_skip_steps,
                            retention_ratio=cfg.retention_ratio, num_inference_steps=ratios.num_steps,
                            mag_ratios=torch.tensor(ratios.ratios))
    apply_mag_cache(_layer_stack(denoiser)[0], config)
    return DiffusersCache(denoiser, cfg, cfg.tag, clock, binding, MAG_HOOKS)


class MagCalibration(DiffusersCache):
    """MagCache's calibration mode for one chunk: `ratios()` after a chunk has been sampled."""

    def __init__(self, denoiser, clock: StepClock, binding: Binding):
        # one step more than the sampler takes: at its last step MagCache clears the ratios it recorded
        self.stack, self.layers = _layer_stack(denoiser)
        apply_mag_cache(self.stack, MagCacheConfig(calibrate=True, num_inference_steps=binding.num_steps + 1))
        super().__init__(denoiser, None, "diffusers_magcache_calibration", clock, binding, MAG_HOOKS)

    def ratios(self) -> list[float]:
        tail_hook = self.layers[-1]._diffusers_hook.get_hook(MAG_HOOKS[1])
        self._enter(COND)  # diffusers keeps the state per cache context
        try:
            return [float(r) for r in tail_hook.state_manager.get_state().calibration_ratios]
        finally:
            self._exit()
