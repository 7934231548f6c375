"""The fully cached step: when every wrapped block of a step is skipped, do not enter the layer stack.

A denoiser with the `skip_stack` seam (policy_accel/denoiser.py) has a pure residual stack: the stream
after it is the stream before it plus the sum of every block's branch output. On a step on which the
static schedule skips every block, each block would return its forecast

    F_b(t) = c_b0 + w_1(t) c_b1 + ... + w_m(t) c_bm      (order 0: c_b0, the last computed output)

whose weights w_j depend only on the t of the block's stored points (Forecaster). Blocks whose stored
points sit at the same t share the weights, so their sum is the forecast of their summed differences:
Σ_b F_b(t) = Σ_j w_j(t) Σ_b c_bj. `StackShortcut` replaces the denoiser's forward on the instance (as
a BlockHook does a block's) and, on such a step, calls `skip_stack(x, t, ctx, residual=...)` with that sum:
one group per distinct set of stored t (one for uniform and TaylorSeer; a few for BAC), summed once per
run of fully skipped steps and guidance branch, then m + 1 tensor operations per group and step. No
per-block Python work, no host sync; the decision is the schedule's, a Python bool per step.

It equals the per-block path up to float rounding: the per-block path adds the forecasts to the stream
one by one, ((h + F_1) + F_2) + ..., this adds their sum once, h + (F_1 + F_2 + ...).
"""

import functools

import torch
import torch.nn as nn

from policy_accel.cache.forecast import Forecaster
from policy_accel.cache.hooks import BlockHook
from policy_accel.clock import COND, StepClock


def fully_skipped_steps(hooks: list[BlockHook], branch: str = COND) -> list[bool]:
    """Per step: True when no wrapped block computes (on guidance branch `branch`)."""
    return [not any(step) for step in zip(*(h.mask_of(branch) for h in hooks), strict=True)]


class StackShortcut:
    """Replaces one denoiser instance's forward: `skip_stack` on fully skipped steps, the forward otherwise.
    `enabled = False` turns it off (every step through the per-block hooks, as before it existed)."""

    def __init__(self, denoiser: nn.Module, hooks: list[BlockHook], clock: StepClock):
        self.module, self.hooks, self.clock = denoiser, hooks, clock
        self.refresh()
        self.enabled = True
        self.calls = 0  # denoiser calls that skipped the stack (each one a skip of every block)
        self.sums: dict[str, list[Forecaster]] = {}  # per guidance branch: the summed forecasts, per group
        self.instance_forward = denoiser.__dict__.get("forward")
        self.original_forward = denoiser.forward
        denoiser.forward = functools.update_wrapper(functools.partial(StackShortcut.forward, self),
                                                    self.original_forward)

    def forward(self, *args, **kwargs):
        clock = self.clock
        if not clock.running:
            return self.original_forward(*args, **kwargs)
        if not (self.enabled and self.skip_by_branch.get(clock.branch_key, self.skip)[clock.step]):
            self.sums.pop(clock.branch_key, None)  # blocks compute on this step: the sums go stale
            return self.original_forward(*args, **kwargs)
        groups = self.sums.get(clock.branch_key)
        if groups is None:
            groups = self._summed(clock.branch_key)
            if groups is None:  # a branch no block has computed for: the hooks raise the error
                return self.original_forward(*args, **kwargs)
            self.sums[clock.branch_key] = groups
        residual = _forecast(groups, clock.t)
        if not torch.compiler.is_compiling():  # traced: the hooks count every skip from the masks (count_chunk)
            self.calls += 1
        return self.module.skip_stack(*args, residual=residual, **kwargs)

    def refresh(self) -> None:
        """Read the hooks' masks again (after a change of schedule): `skip` for the conditional branch and
        for branches without a schedule of their own, `skip_by_branch` for those with one."""
        self.skip = fully_skipped_steps(self.hooks)
        own = {branch for h in self.hooks for branch in h.branches}
        self.skip_by_branch = {branch: fully_skipped_steps(self.hooks, branch) for branch in own}

    def _summed(self, branch: str) -> list[Forecaster] | None:
        """One Forecaster per group of blocks whose stored points sit at the same t, holding their summed
        differences (block order within a group, groups in the order of their first block)."""
        groups: dict[tuple, Forecaster] = {}
        for hook in self.hooks:
            f = hook.forecasters.get(branch)
            if f is None or not f.coeffs:
                return None
            key = (tuple(f.nodes), len(f.coeffs))
            total = groups.get(key)
            if total is None:
                total = groups[key] = Forecaster(f.order, f.differences)
                total.nodes, total.coeffs = list(f.nodes), [c.clone() for c in f.coeffs]
            else:
                for acc, c in zip(total.coeffs, f.coeffs, strict=True):
                    acc.add_(c)
        return list(groups.values())

    def reset(self) -> None:
        self.sums.clear()

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for groups in self.sums.values() for f in groups)

    def remove(self) -> None:
        if self.instance_forward is None:
            del self.module.forward
        else:
            self.module.forward = self.instance_forward
        self.reset()


def _forecast(groups: list[Forecaster], t: float) -> torch.Tensor:
    if len(groups) == 1 and len(groups[0].coeffs) == 1:
        return groups[0].coeffs[0]  # reuse: the stored sum itself (skip_stack does not change it in place)
    out = groups[0].predict(t)  # a new tensor
    for g in groups[1:]:
        out.add_(g.predict(t))
    return out
