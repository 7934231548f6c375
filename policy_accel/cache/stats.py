"""What the cache did: per-block computed/skipped counts, estimated FLOPs saved, bytes held;
and FLOPs measured per chunk."""

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class BlockStats:
    computed: int
    skipped: int
    flops_per_call: int  # of one computed call, at the batch size of the first one (0 if none yet)

    @property
    def flops_saved(self) -> int:
        return self.skipped * self.flops_per_call


@dataclass
class CacheStats:
    method: str
    blocks: dict[str, BlockStats]
    cache_bytes: int

    @property
    def skipped_fraction(self) -> float:
        total = sum(b.computed + b.skipped for b in self.blocks.values())
        return sum(b.skipped for b in self.blocks.values()) / max(total, 1)

    @property
    def flops_saved(self) -> int:
        """Estimated FLOPs not spent in the wrapped blocks since `accelerate`."""
        return sum(b.flops_saved for b in self.blocks.values())

    def __str__(self) -> str:
        computed = sum(b.computed for b in self.blocks.values())
        skipped = sum(b.skipped for b in self.blocks.values())
        return (f"{self.method}: {len(self.blocks)} blocks, {computed} computed, {skipped} skipped "
                f"({self.skipped_fraction:.0%}), ~{self.flops_saved / 1e9:.2f} GFLOP saved, "
                f"cache {self.cache_bytes / 1024:.1f} KiB")


def cache_stats(policy) -> CacheStats:
    """Counts since `accelerate` and the bytes the cache holds now."""
    acc = getattr(policy, "acceleration", None)
    if acc is None:
        raise ValueError("policy is not accelerated: call pa.accelerate(policy, config) first")
    return CacheStats(
        method=acc.config.tag,
        blocks={h.info.name: BlockStats(h.computed, h.skipped, h.flops_per_call or 0) for h in acc.hooks},
        cache_bytes=sum(h.forecaster.nbytes for h in acc.hooks),
    )


def chunk_flops(policy, obs: np.ndarray, seed: int = 0) -> int:
    """FLOPs of one `predict_action_chunk(obs)` as the policy is now (skipped blocks cost nothing).
    The noise comes from `seed`, since what a data-driven cache (First Block Cache) skips depends on it; the policy's
    generator is left as it was."""
    state = policy.generator.get_state()
    policy.generator.manual_seed(seed)
    policy.reset()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy.predict_action_chunk(obs)
    policy.reset()
    policy.generator.set_state(state)
    return int(counter.get_total_flops())
