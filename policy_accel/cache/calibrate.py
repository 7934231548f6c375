"""Profile every block's output at every denoising step over calibration observations and build
BAC schedules from it.

    sched = pa.calibrate(policy, observations, budget=10, bubble_blocks=5)
    sched.save("checkpoints/lift_dp_t/schedules/bac_s10.json")

CLI (observations from the checkpoint's demo dataset):
    python -m policy_accel.cache.calibrate checkpoint=checkpoints/lift_dp_t budget=10 [bubble_blocks=5]
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from policy_accel.cache.hooks import BlockInfo, find_blocks
from policy_accel.cache.schedule import Schedule, acs_steps, bubbling_union


@dataclass
class BlockProfile:
    """Per-block statistics over calibration observations."""

    similarity: dict[str, np.ndarray]  # (K, K) mean pairwise cosine similarity of branch outputs
    volatility: dict[str, float]  # mean over step pairs of mean |F_i - F_j|
    per_sample_similarity: dict[str, list[np.ndarray]]  # one (K, K) matrix per observation
    n_observations: int


class _StepRecorder:
    """Sampling hook + forward hooks collecting each block's output per step: feats[name][k] = (B, D)."""

    def __init__(self, model: torch.nn.Module, blocks: list[BlockInfo]):
        self.step = 0
        self.feats: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
        modules = dict(model.named_modules())
        self.handles = [modules[b.name].register_forward_hook(self._hook(b.name)) for b in blocks]

    def _hook(self, name):
        def record(module, args, output):
            self.feats[name].append(output.detach().flatten(1).float().cpu())

        return record

    def begin_chunk(self, batch_size, timesteps):
        for f in self.feats.values():
            f.clear()

    def begin_step(self, step_index, t):
        self.step = step_index

    def reset(self):
        pass

    def remove(self):
        for h in self.handles:
            h.remove()


def _cosine_matrix(f: torch.Tensor) -> torch.Tensor:
    f = torch.nn.functional.normalize(f.double(), dim=-1)  # (K, D)
    return f @ f.T


def profile_blocks(policy, observations: list, blocks: list[BlockInfo], batch_size: int = 8) -> BlockProfile:
    """Run the uncached policy on `observations` and collect per-block similarity and volatility."""
    if not observations:
        raise ValueError("calibration needs at least one observation")
    recorder = _StepRecorder(policy.model, blocks)
    policy.sampling_hooks.append(recorder)
    sims = {b.name: [] for b in blocks}
    vol_sum = {b.name: 0.0 for b in blocks}
    try:
        for start in tqdm(range(0, len(observations), batch_size), desc="calibrate", unit="batch"):
            batch = np.stack([np.asarray(o) for o in observations[start:start + batch_size]])
            policy.reset()
            policy.predict_action_chunk(batch)
            for name, steps in recorder.feats.items():
                feats = torch.stack(steps, dim=1)  # (B, K, D)
                K, D = feats.shape[1], feats.shape[2]
                for f in feats:
                    sims[name].append(_cosine_matrix(f).numpy())
                    dist = torch.cdist(f.double(), f.double(), p=1) / D  # (K, K) mean |F_i - F_j|
                    vol_sum[name] += float(dist.sum() / (K * (K - 1))) if K > 1 else 0.0
    finally:
        recorder.remove()
        policy.sampling_hooks.remove(recorder)
        policy.reset()
    n = len(observations)
    return BlockProfile(
        similarity={name: np.mean(s, axis=0) for name, s in sims.items()},
        volatility={name: v / n for name, v in vol_sum.items()},
        per_sample_similarity=sims,
        n_observations=n,
    )


def _jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def calibrate(policy, observations: list, budget: int, bubble_blocks: int = 5, blocks: str | None = None,
              batch_size: int = 8, description: str = "") -> Schedule:
    """BAC schedule for `policy`: ACS per block on the mean similarity, then the Bubbling Union.

    The schedule records how stable each block's chosen steps are across observations
    (mean Jaccard index between the per-observation ACS steps and the aggregate ones).
    """
    if getattr(policy, "acceleration", None) is not None:
        raise RuntimeError("calibrate an uncached policy: call pa.remove_acceleration(policy) first")
    num_steps = policy.sampler.num_steps
    if not 1 <= budget <= num_steps:
        raise ValueError(f"budget must be in [1, {num_steps}] for a {num_steps}-step sampler, got {budget}")
    infos = find_blocks(policy.model, blocks)
    profile = profile_blocks(policy, observations, infos, batch_size)
    acs = {b.name: acs_steps(profile.similarity[b.name], budget) for b in infos}
    steps = bubbling_union(acs, profile.volatility, {b.name: b.layer for b in infos},
                           {b.name for b in infos if b.is_ffn}, bubble_blocks)
    stability = {
        name: float(np.mean([_jaccard(acs_steps(s, budget), acs[name]) for s in per_sample]))
        for name, per_sample in profile.per_sample_similarity.items()
    }
    from policy_accel import __version__

    return Schedule(
        blocks=steps,
        num_steps=num_steps,
        sampler=policy.sampler.kind,
        checkpoint_hash=policy.checkpoint_hash,
        method="bac",
        budget=budget,
        bubble_blocks=bubble_blocks,
        calibration={
            "description": description,
            "n_observations": profile.n_observations,
            "mean_jaccard_to_aggregate": float(np.mean(list(stability.values()))),
            "jaccard_per_block": stability,
            "volatility": profile.volatility,
            "acs_steps_before_union": acs,
        },
        package_version=__version__,
    )


def main(argv: list[str] | None = None) -> None:
    from policy_accel.cache.calibrate_cli import run

    run(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
