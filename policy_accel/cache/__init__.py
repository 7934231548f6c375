"""The acceleration engine: block hooks, static schedules, forecasting, the diffusers peers.

Attaches to any nn.Module whose sub-blocks it is told about (a name pattern) and listens to the
sampling loop's StepClock; never imports models/, the policy or the data.
"""

from policy_accel.cache.carry import CarryCache, CarryConfig
from policy_accel.cache.forecast import Forecaster
from policy_accel.cache.handle import CacheHandle
from policy_accel.cache.hooks import find_blocks
from policy_accel.cache.methods import (
    BACConfig,
    BACTaylorConfig,
    EveryStepConfig,
    PerBranchConfig,
    TaylorSeerConfig,
    UniformConfig,
    attach,
    config_from_dict,
    config_to_dict,
    register_attach,
    register_method,
)
from policy_accel.cache.peers import DiffusersFBCConfig, DiffusersMagCacheConfig, DiffusersTaylorSeerConfig, MagRatios
from policy_accel.cache.schedule import Binding, Schedule, acs_steps, bubbling_union, uniform_steps

__all__ = [
    "BACConfig", "BACTaylorConfig", "Binding", "CacheHandle", "CarryCache", "CarryConfig",
    "DiffusersFBCConfig", "DiffusersMagCacheConfig",
    "DiffusersTaylorSeerConfig", "EveryStepConfig", "Forecaster", "MagRatios", "PerBranchConfig", "Schedule",
    "TaylorSeerConfig",
    "UniformConfig", "acs_steps", "attach", "bubbling_union", "config_from_dict", "config_to_dict", "find_blocks",
    "register_attach", "register_method", "uniform_steps",
]
