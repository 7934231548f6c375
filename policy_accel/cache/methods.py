"""Acceleration methods: one config dataclass each, registered by config type, one verb.

    handle = attach(denoiser, UniformConfig(interval=5), clock, binding)
    handle = attach(denoiser, BACTaylorConfig(schedule="checkpoints/lift_dp_t/schedules/bac_s10....json"), ...)
    handle.remove()

(`pa.accelerate(policy, config)` is the same for a policy.) A planner turns a config into a `Plan`:
a static per-block compute schedule plus the forecast used on skipped steps; other methods (the
diffusers peers) register an attach function of their own. Adding a method means adding a config
and a planner; nothing central changes. Configs round-trip through plain dicts (`config_to_dict`).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from policy_accel.cache.forecast import Forecaster
from policy_accel.cache.handle import CacheHandle
from policy_accel.cache.hooks import BlockHook, BlockInfo, find_blocks
from policy_accel.cache.schedule import Binding, Schedule, uniform_steps
from policy_accel.cache.stack import StackShortcut, fully_skipped_steps
from policy_accel.cache.stats import BlockStats, CacheStats
from policy_accel.clock import UNCOND, StepClock


def _suffix(cfg) -> str:
    return "+compile" if cfg.compile else ""


@dataclass
class UniformConfig:
    """Reuse ("FORA"): every block recomputes on steps 0, N, 2N, ... and reuses in between."""

    interval: int = 5
    blocks: str | None = None  # regex over module names; default: the model's `cache_blocks`
    compile: bool = False  # torch.compile each block's computation (the hook logic stays eager)

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")

    @property
    def tag(self) -> str:
        return f"uniform_n{self.interval}" + _suffix(self)


@dataclass
class TaylorSeerConfig:
    """Taylor forecasting with uniform refresh: full steps 0..warmup-1, then every `interval` steps."""

    interval: int = 4
    order: int = 2
    warmup: int = 1
    differences: str = "newton"  # "backward" = the public implementations' latest-gap rule
    blocks: str | None = None
    compile: bool = False

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        Forecaster(self.order, self.differences)  # validates order and differences

    @property
    def tag(self) -> str:
        diff = "" if self.differences == "newton" else "_bw"
        return f"taylorseer_n{self.interval}_o{self.order}_w{self.warmup}{diff}" + _suffix(self)


@dataclass
class BACConfig:
    """BAC: per-block static schedule (ACS + Bubbling Union), reuse in the gaps.

    Give `schedule` (a Schedule or the path of its JSON file, read when attached), or `budget` with
    calibration `observations` for `pa.accelerate(policy, ...)` to calibrate first.
    """

    schedule: Schedule | str | Path | None = None
    budget: int | None = None
    bubble_blocks: int = 5
    observations: list | None = field(default=None, repr=False)
    blocks: str | None = None
    compile: bool = False

    def __post_init__(self):
        if self.schedule is None and self.budget is None:
            raise ValueError(f"{type(self).__name__} needs schedule=<Schedule or path> or budget=<steps>")
        if self.schedule is not None and self.budget is not None:
            raise ValueError(f"{type(self).__name__}: give schedule or budget, not both")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if self.bubble_blocks < 0:
            raise ValueError(f"bubble_blocks must be >= 0, got {self.bubble_blocks}")
        if isinstance(self.schedule, Path):
            self.schedule = str(self.schedule)

    def load_schedule(self) -> Schedule:
        if self.schedule is None:
            raise ValueError(f"{type(self).__name__}(budget={self.budget}) has no schedule yet: calibrate it "
                             "(pa.calibrate, or pa.accelerate(policy, config) with observations=[...])")
        return self.schedule if isinstance(self.schedule, Schedule) else Schedule.load(self.schedule)

    @property
    def tag(self) -> str:
        return self._base_tag() + _suffix(self)

    def _base_tag(self) -> str:
        if isinstance(self.schedule, Schedule):
            return f"bac_s{self.schedule.budget}_b{self.schedule.bubble_blocks}"
        if self.schedule is not None:
            return "bac_" + Path(self.schedule).stem.removeprefix("bac_")
        return f"bac_s{self.budget}_b{self.bubble_blocks}"


@dataclass
class BACTaylorConfig(BACConfig):
    """Ours: the BAC schedule decides where each block computes; Taylor forecasting fills the gaps."""

    order: int = 2
    differences: str = "newton"

    def __post_init__(self):
        super().__post_init__()
        Forecaster(self.order, self.differences)  # validates order and differences

    @property
    def tag(self) -> str:
        diff = "" if self.differences == "newton" else "_bw"
        return self._base_tag().replace("bac_", "bac_taylor_") + f"_o{self.order}{diff}" + _suffix(self)


@dataclass
class EveryStepConfig:
    """Every block computes every step through the hooks: outputs unchanged, measures hook overhead."""

    blocks: str | None = None
    compile: bool = False

    @property
    def tag(self) -> str:
        return "every_step" + _suffix(self)


@dataclass
class PerBranchConfig:
    """Classifier-free guidance with each branch on its own static schedule, e.g. the unconditional branch
    refreshed more coarsely than the conditional one: PerBranchConfig(UniformConfig(2), UniformConfig(5))."""

    cond: object  # one of our static-schedule configs, for the conditional branch
    uncond: object  # the same for the unconditional branch

    def __post_init__(self):
        for name in ("cond", "uncond"):
            kind = type(getattr(self, name))
            if kind not in _PLANNERS:
                raise TypeError(f"PerBranchConfig.{name} must be a static-schedule config "
                                f"({', '.join(t.__name__ for t in _PLANNERS)}), got {kind.__name__}")
        if self.cond.blocks != self.uncond.blocks or self.cond.compile != self.uncond.compile:
            raise ValueError("both branches must wrap the same blocks with the same compile setting")

    @property
    def blocks(self):
        return self.cond.blocks

    @property
    def compile(self) -> bool:
        return self.cond.compile

    @property
    def tag(self) -> str:
        return f"cond_{self.cond.tag}+uncond_{self.uncond.tag}"


@dataclass
class Plan:
    schedule: Schedule
    order: int = 0
    differences: str = "newton"
    branches: dict = field(default_factory=dict)  # guidance branch -> Plan of a branch on its own schedule


_ATTACH: dict[type, Callable] = {}
_PLANNERS: dict[type, Callable] = {}


def register_attach(config_type: type):
    """Register `attach_fn(denoiser, config, clock, binding, allow_unbound) -> CacheHandle` for `config_type`."""

    def decorator(fn):
        _ATTACH[config_type] = fn
        return fn

    return decorator


def register_method(config_type: type):
    """Register `planner(config, binding, blocks) -> Plan` as the handler of a static-schedule method."""

    def decorator(planner):
        def attach_planned(denoiser, config, clock, binding, allow_unbound):
            blocks = find_blocks(denoiser, config.blocks)
            plan = planner(config, binding, blocks)
            for p in [plan, *plan.branches.values()]:
                p.schedule.check_compatible([b.name for b in blocks], binding, allow_unbound)
            return BlockCache(denoiser, config, plan, blocks, clock, binding)

        _ATTACH[config_type] = attach_planned
        _PLANNERS[config_type] = planner
        return planner

    return decorator


def _uniform_schedule(binding: Binding, blocks: list[BlockInfo], steps: list[int], method: str) -> Schedule:
    return Schedule(blocks={b.name: steps for b in blocks}, num_steps=binding.num_steps, sampler=binding.sampler,
                    checkpoint_hash=binding.checkpoint_hash, method=method, budget=len(steps))


@register_method(UniformConfig)
def _plan_uniform(cfg: UniformConfig, binding, blocks) -> Plan:
    return Plan(_uniform_schedule(binding, blocks, uniform_steps(binding.num_steps, cfg.interval), "uniform"))


@register_method(TaylorSeerConfig)
def _plan_taylorseer(cfg: TaylorSeerConfig, binding, blocks) -> Plan:
    steps = uniform_steps(binding.num_steps, cfg.interval, cfg.warmup)
    return Plan(_uniform_schedule(binding, blocks, steps, "taylorseer"), cfg.order, cfg.differences)


@register_method(EveryStepConfig)
def _plan_every_step(cfg: EveryStepConfig, binding, blocks) -> Plan:
    return Plan(_uniform_schedule(binding, blocks, list(range(binding.num_steps)), "every_step"))


@register_method(BACConfig)
def _plan_bac(cfg: BACConfig, binding, blocks) -> Plan:
    return Plan(cfg.load_schedule())


@register_method(BACTaylorConfig)
def _plan_bac_taylor(cfg: BACTaylorConfig, binding, blocks) -> Plan:
    return Plan(cfg.load_schedule(), cfg.order, cfg.differences)


@register_method(PerBranchConfig)
def _plan_per_branch(cfg: PerBranchConfig, binding, blocks) -> Plan:
    cond = _PLANNERS[type(cfg.cond)](cfg.cond, binding, blocks)
    return dataclasses.replace(cond, branches={UNCOND: _PLANNERS[type(cfg.uncond)](cfg.uncond, binding, blocks)})


class BlockCache(CacheHandle):
    """Our static-schedule methods: one BlockHook per wrapped block, all listening to one clock. On a
    denoiser with the `skip_stack` seam whose every residual block is wrapped, a step that skips every
    block skips the stack (`self.stack`, a StackShortcut; `stack.enabled = False` runs it per block)."""

    def __init__(self, denoiser: nn.Module, config, plan: Plan, blocks: list[BlockInfo], clock: StepClock,
                 binding: Binding):
        super().__init__(config, config.tag, clock, binding)
        self.plan = plan
        modules = dict(denoiser.named_modules())
        self.hooks = []
        self.stack: StackShortcut | None = None
        try:
            for b in blocks:
                own = {branch: (p.schedule.mask(b.name), p.order, p.differences) for branch, p in plan.branches.items()}
                self.hooks.append(BlockHook(modules[b.name], b, plan.schedule.mask(b.name), plan.order,
                                            plan.differences, clock, compile=config.compile, branches=own))
            # the seam promises a pure residual stack over the blocks `cache_blocks` names: all must be wrapped
            if (hasattr(denoiser, "skip_stack") and config.blocks in (None, denoiser.cache_blocks)
                    and any(fully_skipped_steps(self.hooks))):
                self.stack = StackShortcut(denoiser, self.hooks, clock)
        except BaseException:
            self._detach()
            raise
        self._attach()

    def reset(self) -> None:
        for hook in self.hooks:
            hook.reset()
        if self.stack is not None:
            self.stack.reset()

    def end_chunk(self) -> None:
        if torch.compiler.is_compiling():  # a whole-chunk graph keeps its cache inside: no tensor outlives it
            self.reset()

    def _detach(self) -> None:
        if self.stack is not None:
            self.stack.remove()
        for hook in self.hooks:
            hook.remove()

    def stats(self) -> CacheStats:
        """Counts since attach (a skipped stack counts as a skip of every block) and the bytes held now."""
        stack_skips = 0 if self.stack is None else self.stack.calls
        stack_bytes = 0 if self.stack is None else self.stack.nbytes
        return CacheStats(self.tag, {h.info.name: BlockStats(h.computed, h.skipped + stack_skips, h.flops_per_call or 0)
                                     for h in self.hooks}, sum(h.nbytes for h in self.hooks) + stack_bytes)


def attach(denoiser: nn.Module, config, clock: StepClock, binding: Binding, *,
           allow_unbound: bool = False) -> CacheHandle:
    """Wrap `denoiser`'s blocks according to `config`, driven by `clock`, for the checkpoint and sampler
    in `binding`. One cache per clock: remove() the handle before attaching another."""
    fn = _ATTACH.get(type(config))
    if fn is None:
        known = ", ".join(t.__name__ for t in _ATTACH)
        raise TypeError(f"unknown acceleration config {type(config).__name__}; known: {known}")
    other = next((x for x in clock.listeners if isinstance(x, CacheHandle)), None)
    if other is not None:
        raise RuntimeError(f"already accelerated with {other.tag}; remove it first")
    if clock.running:
        raise RuntimeError("cannot attach a cache in the middle of a sampling pass")
    return fn(denoiser, config, clock, binding, allow_unbound)


def config_to_dict(config) -> dict:
    """A registered config as a plain dict ({"type": <class name>, field: value, ...})."""
    if type(config) not in _ATTACH:
        raise TypeError(f"unknown acceleration config {type(config).__name__}")
    out = {"type": type(config).__name__}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Schedule):
            raise ValueError(f"{type(config).__name__}.{f.name} is a Schedule object: save it and give its path")
        if f.name == "observations" and value is not None:
            raise ValueError(f"{type(config).__name__}.observations does not serialise: calibrate and give the path")
        out[f.name] = config_to_dict(value) if type(value) in _ATTACH else value  # a wrapped method's config
    return out


def config_from_dict(data: dict):
    """The inverse of config_to_dict; unknown types or fields raise."""
    data = dict(data)
    name = data.pop("type", None)
    types = {t.__name__: t for t in _ATTACH}
    if name not in types:
        raise ValueError(f"unknown acceleration config type {name!r}; known: {', '.join(types)}")
    data = {k: config_from_dict(v) if isinstance(v, dict) and "type" in v else v for k, v in data.items()}
    try:
        return types[name](**data)
    except TypeError as e:
        raise ValueError(f"bad fields for {name}: {e}") from None
