"""Calibrate BAC schedules (or diffusers' MagCache ratios) for a checkpoint from its demo data.

    python eval/calibrate.py checkpoint=checkpoints/lift_dp_t budget=10 [bubble_blocks=5]
    python eval/calibrate.py checkpoint=... 'budget=[5,10,20]' 'bubble_blocks=[0,5]' sampler=ddim steps=20
    python eval/calibrate.py checkpoint=... budget=10 forecast_order=1   # for BAC+Taylor order 1
    python eval/calibrate.py checkpoint=... magcache=true                # diffusers' MagCache ratios
    python eval/calibrate.py checkpoint=... calls=1.5 bubble_blocks=0 sampler=ddim steps=10   # pooled budget
    python eval/calibrate.py checkpoint=... carry=true   # cross-chunk errors (policy_accel/cross_chunk.py)

One profile, one schedule per (budget, bubble_blocks). forecast_order=0 (default) is BAC's criterion;
1 chooses the steps against the error of BAC+Taylor's linear forecast. Files go to <checkpoint>/schedules/
under the names method strings look up (policy_accel/recipes.py).
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/calibrate.py` from the repo root

from eval.cli import hydra_app  # noqa: E402
from policy_accel.cache.peers import mag_ratios_name  # noqa: E402
from policy_accel.calibration import (  # noqa: E402
    blocks_to_profile,
    calibrate_mag_ratios,
    demo_observations,
    profile_blocks,
    schedule_from_profile,
)
from policy_accel.checkpoint import load_policy  # noqa: E402
from policy_accel.cross_chunk import CarryErrors, carry_file_name  # noqa: E402
from policy_accel.jsonfile import read_json  # noqa: E402
from policy_accel.recipes import pooled_schedule_name, schedule_name  # noqa: E402
from policy_accel.sampling import SamplerConfig  # noqa: E402


@dataclass
class CalibrateConfig:
    checkpoint: str | None = None  # required
    budget: Any = None  # an int or a list: one schedule per (budget, bubble_blocks); default 10 unless calls
    calls: Any = None  # instead of budget: pooled budgets in full-call equivalents (a float or a list)
    bubble_blocks: Any = 5
    sampler: str | None = None  # ddpm | ddim; default the checkpoint's native sampler
    steps: int | None = None
    observations: int = 64
    dataset: str | None = None  # default the checkpoint's training dataset
    blocks: str | None = None  # regex over module names; default the model's cache_blocks
    batch_size: int = 8
    seed: int = 0
    num_threads: int = 2
    out_dir: str | None = None  # default <checkpoint>/schedules
    forecast_order: int = 0  # 0: BAC's reuse criterion; 1: the order-1 forecast error (for BAC+Taylor o1)
    magcache: bool = False  # write diffusers' MagCache ratios (cache/peers.py) instead of BAC schedules
    carry: bool = False  # write the cross-chunk errors (policy_accel/cross_chunk.py) instead
    skip_current: bool = False  # do nothing when every file this would write exists for this checkpoint's weights


def _is_current(path: Path, checkpoint_hash: str) -> bool:
    try:
        return read_json(path, "calibration").get("checkpoint_hash") == checkpoint_hash
    except (FileNotFoundError, ValueError):  # missing or cut short: make it again
        return False


def run(cfg: CalibrateConfig) -> list[Path]:
    """What `python eval/calibrate.py ...` does: profile once, write one file per (budget, bubble_blocks)."""
    if not cfg.checkpoint:
        raise SystemExit("checkpoint=<folder> is required (e.g. checkpoint=checkpoints/lift_dp_t)")
    torch.set_num_threads(cfg.num_threads)
    if cfg.budget is not None and cfg.calls is not None:
        raise SystemExit(f"give budget= (per block) or calls= (pooled), not both: {cfg.budget} and {cfg.calls}")

    def listed(v):
        return [v] if isinstance(v, int | float) else list(v)

    budgets = [] if cfg.calls is not None else listed(10 if cfg.budget is None else cfg.budget)
    calls = [] if cfg.calls is None else [float(c) for c in listed(cfg.calls)]
    bubbles = [cfg.bubble_blocks] if isinstance(cfg.bubble_blocks, int) else list(cfg.bubble_blocks)
    policy = load_policy(cfg.checkpoint)
    native = policy.config.sampler
    policy.set_sampler(SamplerConfig(cfg.sampler or native.kind, cfg.steps or native.num_steps, native.num_train_steps))
    sampler = policy.sampler
    out_dir = Path(cfg.out_dir or Path(cfg.checkpoint) / "schedules")
    if cfg.carry:
        paths = [out_dir / f"{carry_file_name(sampler.kind, sampler.num_steps)}.json"]
    elif cfg.magcache:
        paths = [out_dir / f"{mag_ratios_name(sampler.kind, sampler.num_steps)}.json"]
    else:
        kinds = [(b, None) for b in budgets] + [(None, c) for c in calls]
        paths = [out_dir / (f"{schedule_name(b, bb, sampler.kind, sampler.num_steps, cfg.forecast_order)}.json"
                            if c is None else f"{pooled_schedule_name(c, bb, sampler.kind, sampler.num_steps)}.json")
                 for b, c in kinds for bb in bubbles]
    if cfg.skip_current and all(_is_current(p, policy.checkpoint_hash) for p in paths):
        print(f"up to date for checkpoint {policy.checkpoint_hash}: " + ", ".join(p.name for p in paths))
        return []
    dataset = cfg.dataset or policy.config.info.get("dataset")
    if not dataset:
        raise SystemExit(f"{cfg.checkpoint} names no training dataset; pass dataset=<path.zarr>")
    if cfg.carry:
        errors = CarryErrors.measure(policy, dataset, cfg.observations, cfg.seed)
        errors.save(paths[0])
        print(f"{paths[0]}: step-0 change from a chunk to the next, per block: "
              + ", ".join(f"{n.rsplit('.', 2)[-2]}.{n.rsplit('.', 1)[-1]} {e:.2f}" for n, e in errors.errors.items()))
        return paths
    obs = demo_observations(dataset, cfg.observations, policy.config.n_obs_steps, cfg.seed)
    description = f"{len(obs)} observation histories drawn from {dataset} (seed {cfg.seed})"
    if cfg.magcache:
        ratios = calibrate_mag_ratios(policy, np.stack(obs), description, cfg.seed)
        ratios.save(paths[0])
        print(f"{paths[0]}: {ratios.num_steps} MagCache ratios, {min(ratios.ratios):.3f} to {max(ratios.ratios):.3f}")
        return paths
    infos = blocks_to_profile(policy, cfg.blocks, budgets, cfg.forecast_order)
    profile = profile_blocks(policy, obs, infos, cfg.batch_size, cfg.seed)
    written = []
    for (budget, call, bubble), path in zip([(b, c, bb) for b, c in kinds for bb in bubbles], paths, strict=True):
        sched = schedule_from_profile(policy.binding(), profile, infos, budget, bubble, description, cfg.forecast_order,
                                      call)
        sched.save(path)
        written.append(path)
        print(f"{path}: computes {sched.computed_fraction():.1%} of block-steps, "
              f"stability (mean Jaccard) {sched.calibration['mean_jaccard_to_aggregate']:.2f}")
    return written


@hydra_app(CalibrateConfig, "calibrate")
def main(cfg: CalibrateConfig) -> list[Path]:
    return run(cfg)


if __name__ == "__main__":
    main()
