"""policy_accel: faster transformer diffusion/flow robot policies through block-wise caching."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("policy_accel")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.0.0+local"

from policy_accel.acceleration import accelerate, cache_stats, chunk_flops, remove_acceleration  # noqa: E402
from policy_accel.async_policy import AsyncPolicy  # noqa: E402
from policy_accel.cache import (  # noqa: E402
    BACConfig,
    BACTaylorConfig,
    Binding,
    CarryConfig,
    DiffusersFBCConfig,
    DiffusersMagCacheConfig,
    DiffusersTaylorSeerConfig,
    EveryStepConfig,
    PerBranchConfig,
    Schedule,
    TaylorSeerConfig,
    UniformConfig,
    attach,
    config_from_dict,
    config_to_dict,
    find_blocks,
)
from policy_accel.calibration import calibrate  # noqa: E402
from policy_accel.checkpoint import load_policy  # noqa: E402
from policy_accel.clock import StepClock  # noqa: E402
from policy_accel.denoiser import Context, Denoiser  # noqa: E402
from policy_accel.models import ConditionCache, DPTransformer, DPTransformerConfig  # noqa: E402
from policy_accel.policy import Policy, PolicyConfig  # noqa: E402
from policy_accel.sampling import Guidance, SamplerConfig, sample  # noqa: E402

__all__ = [
    "AsyncPolicy", "BACConfig", "BACTaylorConfig", "Binding", "CarryConfig", "ConditionCache", "Context",
    "DPTransformer", "DPTransformerConfig",
    "Denoiser", "DiffusersFBCConfig", "DiffusersMagCacheConfig", "DiffusersTaylorSeerConfig", "EveryStepConfig",
    "Guidance", "PerBranchConfig", "Policy", "PolicyConfig", "SamplerConfig", "Schedule", "StepClock",
    "TaylorSeerConfig", "UniformConfig", "accelerate", "attach", "cache_stats", "calibrate", "chunk_flops",
    "config_from_dict", "config_to_dict", "find_blocks", "load_policy", "remove_acceleration", "sample",
]
