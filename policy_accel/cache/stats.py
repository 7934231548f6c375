"""What a block cache did: per-block computed/skipped counts, estimated FLOPs saved, bytes held."""

from dataclasses import dataclass


@dataclass
class BlockStats:
    computed: int
    skipped: int
    flops_per_call: int  # of one computed eager call, at the batch size of the first one (0 if none yet)

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
        measured = all(b.flops_per_call or not b.skipped for b in self.blocks.values())
        saved = f"~{self.flops_saved / 1e9:.2f} GFLOP saved" if measured else "FLOPs not measured (no eager chunk)"
        return (f"{self.method}: {len(self.blocks)} blocks, {computed} computed, {skipped} skipped "
                f"({self.skipped_fraction:.0%}), {saved}, cache {self.cache_bytes / 1024:.1f} KiB")
