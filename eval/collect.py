"""Collect scripted-expert demos into a zarr dataset (envs/collect.py has what is recorded and how).

    python eval/collect.py env=lift episodes=200 seed=0 [noise=0.05] [out=data/lift.zarr] [overwrite=true]
    python eval/collect.py env=can episodes=200 seed=0 action_mode=abs rotations=rot6d  (-> data/can_abs_rot6d.zarr)
    python eval/collect.py env=mt10 episodes=500 seed=0 instructions=true  (-> data/mt10_lang.zarr; needs '.[lang]')

Same command -> identical data.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/collect.py` from the repo root

from envs.collect import CollectConfig, collect  # noqa: E402
from eval.cli import hydra_app  # noqa: E402


@hydra_app(CollectConfig, "collect")
def main(cfg: CollectConfig) -> Path:
    command = (f"python eval/collect.py env={cfg.env} episodes={cfg.episodes} seed={cfg.seed} noise={cfg.noise}"
               + (f" steps_after_success={cfg.steps_after_success}" if cfg.steps_after_success != 10 else "")
               + (f" action_mode={cfg.action_mode}" if cfg.action_mode != "delta" else "")
               + (f" rotations={cfg.rotations}" if cfg.rotations != "quat" else "")
               + (" instructions=true" if cfg.instructions else ""))
    path = collect(cfg.env, cfg.episodes, cfg.seed, cfg.noise, cfg.out, cfg.overwrite, cfg.max_attempts,
                   cfg.steps_after_success, command=command, action_mode=cfg.action_mode,
                   rotations=cfg.rotations, instructions=cfg.instructions)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
