"""The acceleration engine: block hooks, static schedules, forecasting, calibration, stats.

Works on any denoiser whose sub-blocks it is told about (a name pattern); never imports models/.
"""

from policy_accel.cache.calibration import calibrate
from policy_accel.cache.forecast import Forecaster
from policy_accel.cache.hooks import find_blocks
from policy_accel.cache.methods import (
    BACConfig,
    BACTaylorConfig,
    LosslessConfig,
    TaylorSeerConfig,
    UniformConfig,
    accelerate,
    register_method,
    remove_acceleration,
)
from policy_accel.cache.schedule import Schedule, acs_steps, bubbling_union, uniform_steps
from policy_accel.cache.stats import cache_stats, chunk_flops

__all__ = [
    "BACConfig", "BACTaylorConfig", "Forecaster", "LosslessConfig", "Schedule", "TaylorSeerConfig",
    "UniformConfig", "accelerate", "acs_steps", "bubbling_union", "cache_stats", "calibrate", "chunk_flops",
    "find_blocks", "register_method", "remove_acceleration", "uniform_steps",
]
