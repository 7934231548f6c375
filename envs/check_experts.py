"""Measure scripted-expert success per task (clean actions, no noise).

    python -m envs.check_experts [tasks=lift,can,square,push2d,push2d_multimodal,mt10] [episodes=50] [seed=0]

Prints: task, episodes, successes, success rate, mean length to first success. Options are
`key=value`, as for envs.collect.
"""

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import envs
from envs.collect import run_episode
from policy_accel.cli import load_config


@dataclass
class CheckConfig:
    tasks: Any = "push2d,push2d_multimodal,mt10,lift,can,square"
    episodes: int = 50
    seed: int = 0
    noise: float = 0.0


def check_expert(task: str, episodes: int, seed: int = 0, noise: float = 0.0) -> dict:
    env = envs.make_env(task)
    expert = envs.make_expert(task, env)
    lengths, steps, t0 = [], 0, time.perf_counter()
    for i in range(episodes):
        ep = run_episode(env, expert, seed + i, noise=noise, steps_after_success=0)
        steps += len(ep["action"])
        if ep["success"]:
            lengths.append(ep["success_step"])
    env.close()
    return {"task": task, "episodes": episodes, "successes": len(lengths), "rate": len(lengths) / episodes,
            "mean_len": float(np.mean(lengths)) if lengths else float("nan"),
            "steps_per_s": steps / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None):
    cfg = load_config(CheckConfig, sys.argv[1:] if argv is None else argv)
    tasks = cfg.tasks if not isinstance(cfg.tasks, str) else cfg.tasks.split(",")
    tasks = [str(t).strip() for t in tasks if str(t).strip()]
    print(f"{'task':<28}{'episodes':>9}{'successes':>10}{'rate':>7}{'mean_len':>9}{'steps/s':>9}", flush=True)
    for task in tasks:
        r = check_expert(task, cfg.episodes, cfg.seed, cfg.noise)
        print(f"{r['task']:<28}{r['episodes']:>9}{r['successes']:>10}{r['rate']:>7.2f}{r['mean_len']:>9.1f}"
              f"{r['steps_per_s']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
