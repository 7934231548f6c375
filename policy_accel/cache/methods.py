"""Acceleration methods: one config dataclass each, a planner registered by config type, one verb.

    pa.accelerate(policy, pa.UniformConfig(interval=5))
    pa.accelerate(policy, pa.TaylorSeerConfig(interval=4, order=2))
    pa.accelerate(policy, pa.BACConfig(schedule="checkpoints/lift_dp_t/schedules/bac_s10.json"))
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=..., order=2))
    pa.remove_acceleration(policy)

A planner turns a config into a `Plan`: a static per-block compute schedule plus the forecast
used on skipped steps. Adding a method means adding a config and a planner; nothing central changes.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from policy_accel.cache.forecast import DIFFERENCES, Forecaster
from policy_accel.cache.hooks import BlockHook, BlockInfo, StepContext, find_blocks
from policy_accel.cache.schedule import Schedule, uniform_steps


def _suffix(cfg) -> str:
    return ("" if cfg.lossless else "_exact") + ("+compile" if cfg.compile else "")


@dataclass
class UniformConfig:
    """Reuse ("FORA"): every block recomputes on steps 0, N, 2N, ... and reuses in between."""

    interval: int = 5
    blocks: str | None = None  # regex over module names; default: the model's `cache_blocks`
    lossless: bool = True  # per-chunk condition K/V where the model supports it
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
    lossless: bool = True
    compile: bool = False

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.order < 0:
            raise ValueError(f"order must be >= 0, got {self.order}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.differences not in DIFFERENCES:
            raise ValueError(f"differences must be one of {DIFFERENCES}, got {self.differences!r}")

    @property
    def tag(self) -> str:
        diff = "" if self.differences == "newton" else "_bw"
        return f"taylorseer_n{self.interval}_o{self.order}_w{self.warmup}{diff}" + _suffix(self)


@dataclass
class BACConfig:
    """BAC: per-block static schedule (ACS + Bubbling Union), reuse in the gaps.

    Give `schedule` (a Schedule or the path of its JSON file), or `budget` with calibration
    `observations` to calibrate now.
    """

    schedule: Schedule | str | Path | None = None
    budget: int | None = None
    bubble_blocks: int = 5
    observations: list | None = field(default=None, repr=False)
    blocks: str | None = None
    lossless: bool = True
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
        if isinstance(self.schedule, (str, Path)):
            self.schedule = Schedule.load(self.schedule)

    @property
    def tag(self) -> str:
        return self._base_tag() + _suffix(self)

    def _base_tag(self) -> str:
        if self.schedule is not None:
            return f"bac_s{self.schedule.budget}_b{self.schedule.bubble_blocks}"
        return f"bac_s{self.budget}_b{self.bubble_blocks}"


@dataclass
class BACTaylorConfig(BACConfig):
    """Ours: the BAC schedule decides where each block computes; Taylor forecasting fills the gaps."""

    order: int = 2
    differences: str = "newton"

    def __post_init__(self):
        super().__post_init__()
        if self.order < 0:
            raise ValueError(f"order must be >= 0, got {self.order}")
        if self.differences not in DIFFERENCES:
            raise ValueError(f"differences must be one of {DIFFERENCES}, got {self.differences!r}")

    @property
    def tag(self) -> str:
        diff = "" if self.differences == "newton" else "_bw"
        return self._base_tag().replace("bac_", "bac_taylor_") + f"_o{self.order}{diff}" + _suffix(self)


@dataclass
class LosslessConfig:
    """Only the exact savings (per-chunk condition K/V): every block computes every step."""

    blocks: str | None = None
    lossless: bool = True
    compile: bool = False

    @property
    def tag(self) -> str:
        return ("lossless" if self.lossless else "every_step") + ("+compile" if self.compile else "")


@dataclass
class Plan:
    schedule: Schedule
    order: int = 0
    differences: str = "newton"


_PLANNERS: dict[type, Callable] = {}


def register_method(config_type: type):
    """Register `planner(config, policy, blocks) -> Plan` as the handler of `config_type`."""

    def decorator(planner):
        _PLANNERS[config_type] = planner
        return planner

    return decorator


def _uniform_schedule(policy, blocks: list[BlockInfo], steps: list[int], method: str) -> Schedule:
    return Schedule(
        blocks={b.name: steps for b in blocks},
        num_steps=policy.sampler.num_steps,
        sampler=policy.sampler.kind,
        checkpoint_hash=policy.checkpoint_hash,
        method=method,
        budget=len(steps),
    )


@register_method(UniformConfig)
def _plan_uniform(cfg: UniformConfig, policy, blocks) -> Plan:
    steps = uniform_steps(policy.sampler.num_steps, cfg.interval)
    return Plan(_uniform_schedule(policy, blocks, steps, "uniform"))


@register_method(TaylorSeerConfig)
def _plan_taylorseer(cfg: TaylorSeerConfig, policy, blocks) -> Plan:
    steps = uniform_steps(policy.sampler.num_steps, cfg.interval, cfg.warmup)
    return Plan(_uniform_schedule(policy, blocks, steps, "taylorseer"), cfg.order, cfg.differences)


@register_method(LosslessConfig)
def _plan_lossless(cfg: LosslessConfig, policy, blocks) -> Plan:
    return Plan(_uniform_schedule(policy, blocks, list(range(policy.sampler.num_steps)), "lossless"))


def _bac_schedule(cfg: BACConfig, policy) -> Schedule:
    if cfg.schedule is not None:
        return cfg.schedule
    if not cfg.observations:
        raise ValueError(
            f"{type(cfg).__name__}(budget={cfg.budget}) needs calibration observations=[...] "
            "(or a schedule made by pa.calibrate)"
        )
    from policy_accel.cache.calibration import calibrate

    return calibrate(policy, cfg.observations, budget=cfg.budget, bubble_blocks=cfg.bubble_blocks,
                     blocks=cfg.blocks)


@register_method(BACConfig)
def _plan_bac(cfg: BACConfig, policy, blocks) -> Plan:
    return Plan(_bac_schedule(cfg, policy))


@register_method(BACTaylorConfig)
def _plan_bac_taylor(cfg: BACTaylorConfig, policy, blocks) -> Plan:
    return Plan(_bac_schedule(cfg, policy), cfg.order, cfg.differences)


@dataclass
class Acceleration:
    """What `accelerate` attached to a policy; `remove_acceleration` undoes exactly this."""

    config: object
    plan: Plan
    ctx: StepContext
    hooks: list[BlockHook]
    lossless_before: bool | None


def accelerate(policy, config) -> "Acceleration":
    """Wrap the policy's denoiser blocks according to `config` (one of the registered configs)."""
    planner = _PLANNERS.get(type(config))
    if planner is None:
        known = ", ".join(t.__name__ for t in _PLANNERS)
        raise TypeError(f"unknown acceleration config {type(config).__name__}; known: {known}")
    if getattr(policy, "acceleration", None) is not None:
        raise RuntimeError(
            f"policy is already accelerated with {policy.acceleration.config}; call remove_acceleration first"
        )
    if getattr(policy, "compiled_model", None) is not None:
        raise RuntimeError("the whole denoiser is compiled (policy.compile()): call policy.compile(False) and "
                           "set compile=True in the method config instead (per-block compile, no recompiles)")
    blocks = find_blocks(policy.model, config.blocks)
    plan = planner(config, policy, blocks)
    plan.schedule.check_compatible([b.name for b in blocks], policy.sampler.kind, policy.sampler.num_steps,
                                   policy.checkpoint_hash)
    ctx = StepContext(policy.sampler.num_steps)
    modules = dict(policy.model.named_modules())
    hooks = [
        BlockHook(modules[b.name], b, plan.schedule.mask(b.name), Forecaster(plan.order, plan.differences), ctx,
                  compile=config.compile)
        for b in blocks
    ]
    lossless_before = getattr(policy, "precompute_condition", None)
    if lossless_before is not None:
        policy.precompute_condition = config.lossless
    policy.sampling_hooks.append(ctx)
    policy.acceleration = Acceleration(config, plan, ctx, hooks, lossless_before)
    return policy.acceleration


def remove_acceleration(policy) -> None:
    """Take every wrapper off and free the cache; the policy behaves exactly as before `accelerate`."""
    acc = getattr(policy, "acceleration", None)
    if acc is None:
        return
    for hook in acc.hooks:
        hook.remove()
    policy.sampling_hooks.remove(acc.ctx)
    if acc.lossless_before is not None:
        policy.precompute_condition = acc.lossless_before
    policy.acceleration = None
