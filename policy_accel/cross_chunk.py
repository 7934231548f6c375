"""Calibration for cross-chunk reuse (policy_accel/cache/carry.py): how far each block's step-0 output
moves from one chunk to the next, on consecutive observation histories of the demos, with the same noise.

    errors = carry_errors(policy, "data/lift.zarr")          # {block: mean relative error}
    CarryErrors(errors, binding, description).save("checkpoints/lift_dp_t/schedules/carry_ddim10.json")
    pa.CarryConfig(base, carry=carry_pattern(errors, 0.2))    # carry the blocks at or under 0.2

CLI: python eval/calibrate.py checkpoint=checkpoints/lift_dp_t carry=true sampler=ddim steps=10
"""

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from policy_accel.cache.hooks import find_blocks
from policy_accel.cache.schedule import Binding
from policy_accel.jsonfile import read_json, write_json


def carry_file_name(sampler: str, num_steps: int) -> str:
    return f"carry_{sampler}{num_steps}"


def consecutive_histories(dataset, n: int, n_obs_steps: int, n_action_steps: int, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """`n` pairs of observation histories one chunk apart (n_action_steps) within a demo episode."""
    from policy_accel.data import ReplayBuffer

    buffer = ReplayBuffer.load(dataset)
    ends = buffer.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    long_enough = np.flatnonzero(ends - starts > n_obs_steps + n_action_steps)
    if not len(long_enough):
        raise ValueError(f"{dataset}: no episode longer than {n_obs_steps + n_action_steps} steps")
    rng = np.random.default_rng(seed)
    first, second = [], []
    for e in rng.choice(long_enough, n, replace=len(long_enough) < n):
        t = int(rng.integers(starts[e] + n_obs_steps - 1, ends[e] - n_action_steps))
        first.append(buffer.obs[t - n_obs_steps + 1:t + 1])
        second.append(buffer.obs[t - n_obs_steps + 1 + n_action_steps:t + 1 + n_action_steps])
    return np.stack(first), np.stack(second)


@torch.inference_mode()
def carry_errors(policy, dataset, n: int = 32, seed: int = 0) -> dict[str, float]:
    """Per block: |F0(next) - F0(this)| / |F0(next)|, the relative change of its step-0 output from a chunk
    to the next on `n` consecutive demo history pairs, both chunks with the same noise (mean over pairs)."""
    if policy.cache is not None:
        raise RuntimeError("calibrate an uncached policy: call pa.remove_acceleration(policy) first")
    cfg = policy.config
    this, nxt = consecutive_histories(dataset, n, cfg.n_obs_steps, cfg.n_action_steps, seed)
    modules = dict(policy.model.named_modules())
    names = [b.name for b in find_blocks(policy.model)]
    outputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            if policy.clock.running and policy.clock.step == 0:
                outputs[name] = output.detach().flatten(1).float().clone()

        return hook

    noise = torch.randn(n, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))
    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    try:
        policy.predict_action_chunk(this, noise)
        before = dict(outputs)
        policy.predict_action_chunk(nxt, noise)
    finally:
        for h in handles:
            h.remove()
        policy.reset()
    return {name: float(((outputs[name] - before[name]).norm(dim=1) / outputs[name].norm(dim=1).clamp_min(1e-12))
                        .mean()) for name in names}


def carry_pattern(errors: dict[str, float], threshold: float) -> str:
    """A regex matching exactly the blocks whose error is at or under `threshold`."""
    chosen = [name for name, e in errors.items() if e <= threshold]
    if not chosen:
        raise ValueError(f"no block moves by <= {threshold} from a chunk to the next (least: "
                         f"{min(errors.values()):.3f}); raise the threshold")
    return "|".join(re.escape(name) for name in chosen)


@dataclass
class CarryErrors:
    errors: dict[str, float]
    sampler: str
    num_steps: int
    checkpoint_hash: str
    description: str = ""

    @classmethod
    def measure(cls, policy, dataset, n: int = 32, seed: int = 0) -> "CarryErrors":
        b: Binding = policy.binding()
        return cls(carry_errors(policy, dataset, n, seed), b.sampler, b.num_steps, b.checkpoint_hash,
                   f"{n} consecutive history pairs from {dataset} (seed {seed}), same noise in both chunks")

    def save(self, path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path, binding: Binding | None = None) -> "CarryErrors":
        out = cls(**read_json(path, "carry calibration"))
        if binding is not None and (out.sampler, out.num_steps, out.checkpoint_hash) != (
                binding.sampler, binding.num_steps, binding.checkpoint_hash):
            raise ValueError(f"{Path(path).name} was measured for {out.sampler}-{out.num_steps} on checkpoint "
                             f"{out.checkpoint_hash[:12]}, not for {binding}")
        return out
