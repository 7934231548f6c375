"""Scripted-expert success per task (the command line is eval/check_experts.py)."""

import time
from dataclasses import dataclass, field

import numpy as np

import envs
from envs.collect import run_episode


@dataclass
class CheckConfig:
    tasks: list[str] = field(default_factory=lambda: ["push2d", "push2d_multimodal", "mt10", "lift", "can", "square"])
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
