"""Attach per-block wrappers to module instances and take them off again.

A wrapped block computes on the steps its compute mask marks (recording its residual-branch output)
and returns a forecast from its stored outputs otherwise. The step index, t and guidance branch come
from the sampling loop's `StepClock` (plain Python values, so the static-schedule path has no host
sync). With `compile=True` each block's computation goes through torch.compile while the hook
itself stays in Python. Traced into a whole-chunk graph (policy_accel/chunk_graph.py) the hook is
traced too: its step is a trace-time constant, and its decision is fixed in the graph.
"""

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from policy_accel.cache.forecast import Forecaster
from policy_accel.clock import StepClock

FFN_KINDS = ("ff", "ffn", "mlp", "feed_forward")


@dataclass
class BlockInfo:
    name: str  # qualified module name inside the denoiser
    layer: int  # first integer in the name (its layer index)
    kind: str  # last component of the name, e.g. "self_attn", "ff"

    @property
    def is_ffn(self) -> bool:
        return self.kind in FFN_KINDS


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[BlockInfo]:
    """Blocks whose qualified name fully matches `pattern` (default: the model's `cache_blocks`)."""
    pattern = pattern or getattr(model, "cache_blocks", None)
    if not pattern:
        raise ValueError(
            f"{type(model).__name__} has no `cache_blocks` pattern; pass blocks=<regex> in the cache config"
        )
    blocks = []
    for name, _ in model.named_modules():
        if name and re.fullmatch(pattern, name):
            digits = re.search(r"\d+", name)
            blocks.append(BlockInfo(name, int(digits.group()) if digits else 0, name.rsplit(".", 1)[-1]))
    if not blocks:
        raise ValueError(f"no module of {type(model).__name__} matches the block pattern {pattern!r}")
    return blocks


class BlockHook:
    """Replaces one module instance's forward: compute-and-record, or forecast, as the compute mask
    says for the clock's step. State is kept per guidance branch (one Forecaster each). Outside a
    sampling pass the block computes exactly and records nothing."""

    def __init__(self, module: nn.Module, info: BlockInfo, mask: list[bool], order: int, differences: str,
                 clock: StepClock, compile: bool = False, branches: dict | None = None):
        """`branches`: guidance branch -> (mask, order, differences) of a branch on a schedule of its own."""
        self.branches = dict(branches or {})
        for m, o, d in [(mask, order, differences), *self.branches.values()]:
            if not m[0]:
                raise ValueError(f"block {info.name}: step 0 must compute (nothing to reuse before it)")
            Forecaster(o, d)  # validates
        self.module, self.info, self.mask, self.clock = module, info, mask, clock
        self.order, self.differences = order, differences
        self.forecasters: dict[str, Forecaster] = {}
        self.computed = 0
        self.skipped = 0
        self.flops_per_call: int | None = None  # measured on the first computed call (for cache_stats)
        self.original_forward = module.forward
        self.instance_forward = module.__dict__.get("forward")  # another wrapper already on this instance
        # Compiling the block's own computation (not the hook, whose Python step logic would make
        # dynamo guard on the step and recompile) gives one graph per block kind, shared by all layers.
        self.compute = torch.compile(self.original_forward) if compile else self.original_forward
        module.forward = functools.update_wrapper(functools.partial(BlockHook.forward, self),
                                                  self.original_forward)

    def forward(self, *args, **kwargs):
        clock = self.clock
        if not clock.running:
            return self.original_forward(*args, **kwargs)
        own = self.branches.get(clock.branch_key)
        forecaster = self.forecasters.get(clock.branch_key)
        if forecaster is None:
            forecaster = self.forecasters[clock.branch_key] = (Forecaster(*own[1:]) if own else
                                                               Forecaster(self.order, self.differences))
        if torch.compiler.is_compiling():  # traced into a whole-chunk graph: the step is known at trace time
            return self._traced(forecaster, *args, **kwargs)
        if (own[0] if own else self.mask)[clock.step]:
            self.computed += 1
            if self.flops_per_call is None:  # once per attach: count this call's FLOPs
                with FlopCounterMode(display=False) as counter:
                    out = self.original_forward(*args, **kwargs)
                self.flops_per_call = int(counter.get_total_flops())
            else:
                out = self.compute(*args, **kwargs)
            forecaster.update(clock.t, out)
            return out
        self.skipped += 1
        return forecaster.predict(clock.t)

    def _traced(self, forecaster: Forecaster, *args, **kwargs):
        """The same decision without the counters (they would make dynamo guard on their values and
        recompile every chunk; the chunk graph adds the counts from the masks) or the FLOP probe."""
        own = self.branches.get(self.clock.branch_key)
        if (own[0] if own else self.mask)[self.clock.step]:
            out = self.original_forward(*args, **kwargs)
            forecaster.update(self.clock.t, out)
            return out
        return forecaster.predict(self.clock.t)

    def mask_of(self, branch: str) -> list[bool]:
        own = self.branches.get(branch)
        return own[0] if own else self.mask

    def count_chunk(self, branches: tuple[str, ...] = ("cond",)) -> None:
        """Add what one traced chunk computed and skipped (on these guidance branches) to the counters."""
        for branch in branches:
            computed = sum(self.mask_of(branch))
            self.computed += computed
            self.skipped += len(self.mask) - computed

    def reset(self) -> None:
        self.forecasters.clear()

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.forecasters.values())

    def remove(self) -> None:
        if self.instance_forward is None:
            del self.module.forward  # the instance attribute goes; the class's forward is back
        else:
            self.module.forward = self.instance_forward
        self.reset()
