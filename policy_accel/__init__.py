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
    find_blocks,
    remove_acceleration,
)
