"""policy_accel: faster transformer diffusion/flow robot policies through block-wise caching."""

__version__ = "0.1.0"

from policy_accel.cache import (  # noqa: E402
    BACConfig,
    BACTaylorConfig,
    LosslessConfig,
    Schedule,
    TaylorSeerConfig,
    UniformConfig,
    accelerate,
    cache_stats,
    calibrate,
    chunk_flops,
    find_blocks,
    remove_acceleration,
)
from policy_accel.models import ConditionCache, DPTransformer, DPTransformerConfig  # noqa: E402
from policy_accel.policy import Policy, PolicyConfig, load_policy  # noqa: E402
from policy_accel.sampling import SamplerConfig, sample  # noqa: E402

__all__ = [
    "BACConfig", "BACTaylorConfig", "ConditionCache", "DPTransformer", "DPTransformerConfig", "LosslessConfig",
    "Policy", "PolicyConfig", "SamplerConfig", "Schedule", "TaylorSeerConfig", "UniformConfig", "accelerate",
    "cache_stats", "calibrate", "chunk_flops", "find_blocks", "load_policy", "remove_acceleration", "sample",
]
