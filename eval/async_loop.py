"""The asynchronous control loop in simulation: the robot keeps moving while the policy computes.

    python eval/rollout.py policy=lift method=ddim10 async_loop=true num_envs=1      # real inference time
    python eval/rollout.py policy=lift method=ddim10 async_loop=true inference_delay_ms=150  # injected

Real time (no injected delay): `PacedVectorEnv` holds every env step to the control period (1/control_hz)
of wall-clock time, sleeping out what the simulation did not use, while policy_accel's AsyncPolicy
computes the next chunk in its thread. The actions executed during an inference are as many as the
real latency allows, as on a robot. The simulation must step faster than the period (one robosuite env
takes ~8 ms of the 50): run few lockstep envs (num_envs=1..4); steps that overran the period are counted.
All envs of a lockstep batch share one inference (done envs included), so latency grows with num_envs.

Injected delay (inference_delay_ms=x): every chunk arrives exactly ceil(x / period) control steps after
its request, whatever the computation took; nothing is paced and the run is deterministic.
"""

import math
import time

import gymnasium as gym
import numpy as np

from policy_accel.async_policy import AsyncPolicy


class PacedVectorEnv(gym.vector.VectorWrapper):
    """A vector env whose step() returns one control period after the previous one (or after reset),
    sleeping out what the simulation did not use; a step that took longer is counted and restarts the clock."""

    def __init__(self, env, period: float):
        super().__init__(env)
        self.period = period
        self.overruns = 0  # steps whose simulation took longer than the period
        self.steps = 0
        self._last = None

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self._last = time.perf_counter()
        return out

    def step(self, actions):
        out = self.env.step(actions)
        due, now = self._last + self.period, time.perf_counter()
        if now < due:
            time.sleep(due - now)
            self._last = due
        else:
            self.overruns += 1
            self._last = now
        self.steps += 1
        return out


def delay_steps(inference_delay_ms: float, control_hz: float) -> int:
    """Control steps until a chunk that takes `inference_delay_ms` can be used (the next tick after it)."""
    return math.ceil(round(inference_delay_ms / 1000 * control_hz, 9))


class AsyncRunner:
    """`run_batch` of eval/rollout.py with an asynchronous control loop; sums the loop's counts in `stats`."""

    def __init__(self, control_hz: float = 20.0, inference_delay_ms: float | None = None):
        self.control_hz, self.inference_delay_ms = control_hz, inference_delay_ms
        self.stats = {"chunks": 0, "stalls": 0, "dropped": 0, "steps": 0, "overruns": 0}

    def __call__(self, policy, venv, seeds: list[int], record: list | None = None) -> np.ndarray:
        period = 1.0 / self.control_hz
        delay = None if self.inference_delay_ms is None else delay_steps(self.inference_delay_ms, self.control_hz)
        env = venv if delay is not None else PacedVectorEnv(venv, period)
        To, Ta = policy.config.n_obs_steps, policy.config.n_action_steps
        obs, _ = env.reset(seed=seeds)
        policy.reset()
        policy.seed(seeds[0])  # as run_batch: a batch's sampling noise depends on its seeds only
        history = [obs] * To
        success = np.zeros(len(seeds), dtype=bool)
        done = np.zeros(len(seeds), dtype=bool)
        with AsyncPolicy(policy, control_period=period, delay_steps=delay) as agent:
            for t in range(10**6):
                if record is not None and t % Ta == 0:
                    record.extend(np.stack(history, axis=1)[~done])
                obs, _, terminated, truncated, info = env.step(agent.act(obs))
                history = history[1:] + [obs]
                success |= info["success"]
                done |= success | terminated | truncated
                if done.all():
                    break
            else:
                raise RuntimeError("env never truncated")
        for key in ("chunks", "stalls", "dropped"):
            self.stats[key] += agent.stats[key]
        self.stats["steps"] += t + 1
        self.stats["overruns"] += getattr(env, "overruns", 0)
        return success
